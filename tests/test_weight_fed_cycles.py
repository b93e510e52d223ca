# amaranth: UnusedElaboratable=no
"""The DDR-fed blocks' cycle models in pure Python (no simulator): they refuse jobs they
cannot time with a message naming the value, and their event models agree with the children's
closed forms where those hold. The Verilator tests (test_linear_datapath_verilator.py,
test_bitlinear_verilator.py, test_ffn_block_verilator.py) hold them to the measured cycles."""

import random

import pytest

from trilut.config import DatapathConfig, DdrSimConfig, EngineConfig
from trilut.hdl.decoder.ffn_block import FfnBlock, FfnJob
from trilut.hdl.linear.bitlinear import BitLinear, BitLinearJob
from trilut.hdl.linear.weight_fed_tlmm import WeightFedJob, WeightFedTlmm
from trilut.hdl.memory.axi import AxiReadMaster, ReadJob
from trilut.hdl.memory.weight_buffer import WeightBuffer, WeightBufferJob

pytestmark = pytest.mark.fast

ENGINE = EngineConfig(group_size=3, tables_per_step=4, columns_per_cycle=4, accumulator_depth=16,
                      max_k=1024)
DATAPATH = DatapathConfig(ddr_word_bits=64, tile_beats=512, lanes=4)
DDR = DdrSimConfig(latency=20)


def q_proj_job(**changes) -> WeightFedJob:
    """A 256 x 256 decode row streamed in 256-beat tiles (what the host sends for q_proj)."""
    beats = 22 * 64                         # k_blocks x n_groups
    tiles = [(256, 1)] * (beats // 256) + [(beats % 256, 1)]
    reads = [(i * 256 * 2 * 8, length * 2) for i, (length, _) in enumerate(tiles)]
    job = dict(rows=1, k=256, n=256, reads=tuple(reads), tiles=tuple(tiles), ddr=DDR)
    job.update(changes)
    return WeightFedJob(**job)


def test_weight_fed_job_is_timed():
    block = WeightFedTlmm(ENGINE, DATAPATH)
    # Measured on Verilator (test_linear_datapath_verilator.py, decode-full-rate).
    assert block.expected_cycles(q_proj_job()) == 2978


@pytest.mark.parametrize("changes,message", [
    (dict(rows=0), "rows must be a positive integer, not 0"),
    (dict(k=2000), "max_k"),
    (dict(n=0), "n must be a positive integer, not 0"),
    (dict(ddr=None), "ddr must be a DdrSimConfig, not None"),
    (dict(tiles=((513, 1),)), r"tile length must be an integer in 1..512 \(tile_beats\), not 513"),
    (dict(tiles=((256, 0),)), r"tile replays must be an integer in 1..65535"),
    (dict(reads=((0, 10),)), "the reads carry 10 DDR words; the tiles load 2816"),
    (dict(rows=2), "the tiles stream 1408 weight beats; the engine takes 2816"),
    (dict(reads=((0, -1),)), r"read 0 must be \(byte address, words\), two integers >= 0"),
    (dict(reads=((0, 2816, 5),)), r"read 0 must be \(byte address, words\)"),
])
def test_weight_fed_model_refuses_bad_jobs(changes, message):
    block = WeightFedTlmm(ENGINE, DATAPATH)
    with pytest.raises((ValueError, TypeError), match=message):
        block.expected_cycles(q_proj_job(**changes))


def test_weight_fed_model_refuses_what_it_cannot_time():
    with pytest.raises(TypeError, match="job must be a WeightFedJob"):
        WeightFedTlmm(ENGINE, DATAPATH).expected_cycles((1, 256, 256))
    wide = WeightFedTlmm(ENGINE, DatapathConfig(ddr_word_bits=64, tile_beats=512, lanes=4,
                                                 max_outstanding=12))
    with pytest.raises(ValueError, match="max_outstanding 12 exceeds the DDR model's AR queue"):
        wide.expected_cycles(q_proj_job())
    with pytest.raises(TypeError, match="datapath must be a DatapathConfig"):
        WeightFedTlmm(ENGINE, {"ddr_word_bits": 64})


def test_axi_event_model_is_the_closed_form_when_latency_is_hidden():
    """Where ``hides_latency`` holds the event model is ``4 + latency + beat_cycles``; where it
    does not, it is never less."""
    rng = random.Random(3)
    for _ in range(200):
        master = AxiReadMaster(data_width=rng.choice([32, 64, 128]),
                               max_outstanding=rng.randint(1, 8),
                               max_burst=rng.choice([4, 16, 256]))
        # Lengths from 1: a zero-length command costs the splitter a cycle (the event model
        # counts it; the closed form does not).
        commands = [(rng.randrange(0, 1 << 16) * 8, rng.randint(1, 300))
                    for _ in range(rng.randint(1, 5))]
        window = rng.randint(1, 5)
        ddr = DdrSimConfig(latency=rng.randint(2, 200), beats_per_window=rng.randint(1, window),
                           window=window)
        total = sum(n for _, n in commands)
        closed = 0 if total == 0 else 4 + ddr.latency + AxiReadMaster.beat_cycles(
            total, beats_per_window=ddr.beats_per_window, window=window)
        job = ReadJob(commands, ddr)
        cycles = master.expected_cycles(job)
        if master.hides_latency(job):
            assert cycles == closed, (commands, ddr)
        else:
            assert cycles >= closed, (commands, ddr)


def test_weight_buffer_event_model_is_the_closed_form():
    """Words always offered, beats always taken: ``WeightBufferTiming`` beat by beat equals
    ``WeightBuffer.expected_cycles``."""
    rng = random.Random(5)
    for word_bits in (8, 64, 128):
        buffer = WeightBuffer(ENGINE, tile_beats=32, word_bits=word_bits)
        for _ in range(50):
            tiles = [(rng.randint(1, 32), rng.randint(1, 4)) for _ in range(rng.randint(1, 6))]
            timing = buffer.timing(tiles)
            last = None
            for i in range(len(tiles)):
                c = timing.command(i)
                timing.filled(i, c + timing.words(i))
                for _ in range(timing.beats(i)):
                    last = timing.beat_offered()
                    timing.beat_taken(last)
            assert last + 1 == buffer.expected_cycles(WeightBufferJob(tiles)), tiles


def test_bitlinear_and_ffn_models_time_the_measured_jobs():
    # Measured on Verilator: test_bitlinear_verilator.py decode-full-rate (q_proj 256 x 256).
    block = BitLinear(ENGINE, DATAPATH, max_k=256)
    assert block.expected_cycles(BitLinearJob(**vars(q_proj_job()))) == 2981


def ffn_job(rows=1, **changes) -> FfnJob:
    """The tiny model's FFN (256 -> 640 -> 256), every layer streamed in 256-beat tiles."""
    tiles, reads, address = [], [], 0
    for beats in (22 * 160, 22 * 160, 54 * 64):         # gate, up, down
        for start in range(0, beats, 256):
            length = min(256, beats - start)
            tiles.append((length, 1))
            reads.append((address, 2 * length))
            address += 16 * length
    job = dict(rows=rows, reads=tuple(reads) * rows, tiles=tuple(tiles) * rows, ddr=DDR)
    job.update(changes)
    return FfnJob(**job)


@pytest.mark.parametrize("make,message", [
    (lambda: BitLinearJob(**{**vars(q_proj_job()), "rows": 3}),
     "the cycle model times at most 2 rows, not 3"),
    (lambda: BitLinearJob(**{**vars(q_proj_job()), "k": 512}),
     r"k = 512 exceeds this BitLinear's max_k \(256\)"),
    (lambda: BitLinearJob(**{**vars(q_proj_job()), "rows": 0}),
     "rows must be a positive integer, not 0"),
    (lambda: q_proj_job(), "job must be a BitLinearJob"),
    (lambda: BitLinearJob(**{**vars(q_proj_job()), "tiles": ((256, 1),) * 5}),
     "the reads carry 2816 DDR words; the tiles load 2560"),
])
def test_bitlinear_model_refuses_bad_jobs(make, message):
    block = BitLinear(ENGINE, DATAPATH, max_k=256)
    with pytest.raises((ValueError, TypeError), match=message):
        block.expected_cycles(make())


@pytest.mark.parametrize("make,message", [
    (lambda: ffn_job(rows=3), "the cycle model times at most 2 rows, not 3"),
    (lambda: ffn_job(rows=0), "rows must be a positive integer, not 0"),
    (lambda: ffn_job(tiles=ffn_job().tiles[:-1], reads=ffn_job().reads[:-1]),
     "the tiles stream 10368 weight beats; the engine takes 10496"),
    (lambda: q_proj_job(), "job must be an FfnJob"),
    (lambda: ffn_job(ddr=(20, 1, 1)), "ddr must be a DdrSimConfig"),
])
def test_ffn_model_refuses_bad_jobs(make, message):
    block = FfnBlock(ENGINE, DATAPATH, hidden=256, ffn=640)
    with pytest.raises((ValueError, TypeError), match=message):
        block.expected_cycles(make())


def test_ffn_model_refuses_a_residual_fifo_of_one_row():
    block = FfnBlock(ENGINE, DATAPATH, hidden=256, ffn=640, residual_rows=1)
    with pytest.raises(ValueError, match="at most 1 rows, not 2"):
        block.expected_cycles(ffn_job(rows=2))
