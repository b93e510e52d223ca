# amaranth: UnusedElaboratable=no
"""Cycle-accurate tier: the double-buffered weight buffer on Verilator (cocotb).

Each configuration is built once (cached by the hash of its Verilog) and runs all its cases
as the phases of one run of the generic testbench (``sim/stream_testbench.py``): several
tiles with replays, full and one-beat tiles, random idle cycles on ``tiles`` and ``fill`` and
random backpressure on ``beats``; every beat must equal ``WeightBuffer.model`` bit for bit,
and nothing may follow a case's last beat. Runs without stalls must take exactly
``WeightBuffer.expected_cycles``, and show that filling overlaps streaming.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from amaranth import Module
from amaranth.lib import wiring

from trilut.config import EngineConfig
from trilut.hdl.linear.tlmm_engine import TlmmEngine
from trilut.hdl.memory.weight_buffer import WeightBuffer, WeightBufferJob
from trilut.sim.transport import run_stream_on
from trilut.transport import StreamPhase, StreamRun

pytestmark = pytest.mark.rtl

SMALL = EngineConfig(group_size=3, tables_per_step=2, columns_per_cycle=2, accumulator_depth=4,
                     max_k=256)                          # 2 x 2 x 5 = 20-bit beats
G4 = EngineConfig(group_size=4, tables_per_step=2, columns_per_cycle=4, accumulator_depth=8,
                  max_k=256)                             # 4 x 2 x 7 = 56-bit beats

CONFIGS = {
    # A beat spans 3 words; the last word carries 4 padding bits.
    "beat20-word8": dict(cfg=SMALL, word_bits=8, tile_beats=16),
    # A beat is exactly one word; a bank depth that is not a power of two.
    "beat20-word20": dict(cfg=SMALL, word_bits=20, tile_beats=24),
    # One word with 8 padding bits; a 3-bit replay count used up to its limit.
    "beat56-word64": dict(cfg=G4, word_bits=64, tile_beats=8, max_replays=7),
    # Both banks in one memory (bank = top address bit), 12-deep banks at 0 and 16.
    "beat20-word8-one-memory": dict(cfg=SMALL, word_bits=8, tile_beats=12, one_memory=True),
}


@dataclass
class Case:
    name: str
    tiles: list[tuple[int, int]]
    fill_idle: float = 0.0
    tiles_idle: float = 0.0
    beats_stall: float = 0.0
    seed: int = 0
    words: list[int] = field(default_factory=list)

    @property
    def stalls(self) -> bool:
        return bool(self.fill_idle or self.tiles_idle or self.beats_stall)


def _cases(buffer: WeightBuffer) -> list[Case]:
    rng = random.Random(buffer.beat_bits * 1000 + buffer.word_bits)
    depth, wpb, top = buffer.tile_beats, buffer.words_per_beat, min(buffer.max_replays, 5)

    def random_tiles(count):
        return [(rng.randint(1, depth), rng.randint(1, top)) for _ in range(count)]

    cases = [
        Case("stall-0.3", random_tiles(8), 0.3, 0.3, 0.3, seed=1),
        # The engine stalls most: the fill side waits for a bank to drain.
        Case("beats-stall-0.7", random_tiles(6), beats_stall=0.7, seed=2),
        # DDR stalls most: the stream side waits for a bank to fill.
        Case("fill-idle-0.7", random_tiles(6), fill_idle=0.7, beats_stall=0.2, seed=3),
        Case("edge-tiles-stall", [(1, 1), (depth, 1), (1, buffer.max_replays if
                                                        buffer.max_replays < 100 else 9),
                                  (1, 2), (depth, top), (depth, 1), (1, 1)],
             0.4, 0.2, 0.5, seed=4),
        # No stalls: cycle-exact against expected_cycles.
        Case("balanced", [(depth, wpb)] * 6),             # fill ~ stream per tile
        Case("fill-bound", [(depth, 1)] * 4),
        Case("stream-bound", [(depth, min(buffer.max_replays, 3 * wpb))] * 4),
        Case("mixed", random_tiles(8)),
    ]
    for case in cases:
        n_words = sum(length for length, _ in case.tiles) * wpb
        # Random padding bits too: the buffer must ignore them.
        case.words = [rng.getrandbits(buffer.word_bits) for _ in range(n_words)]
    return cases


def weight_buffer_run(buffer: WeightBuffer, cases: list[Case]) -> StreamRun:
    """One phase per case: its tile commands and fill words in, ``WeightBuffer.model``'s
    beats expected, each stream idle or backpressured with its own probability; after each
    phase nothing more may come out."""
    return StreamRun(phases=[StreamPhase(
        name=c.name, seed=c.seed,
        stream_stalls={"tiles": c.tiles_idle, "fill": c.fill_idle, "beats": c.beats_stall},
        inputs={"tiles": [buffer.command(length, replays) for length, replays in c.tiles],
                "fill": c.words},
        expected={"beats": buffer.model(c.words, c.tiles)},
        # The performance model is cycle-exact without stalls.
        expected_cycles=None if c.stalls else buffer.expected_cycles(WeightBufferJob(c.tiles)),
        settle_cycles=16,
    ) for c in cases])


@pytest.mark.parametrize("name", CONFIGS)
def test_weight_buffer_on_verilator(name, tmp_path):
    buffer = WeightBuffer(**CONFIGS[name])
    cases = _cases(buffer)
    run = weight_buffer_run(buffer, cases)
    # The testbench checks every beat bit for bit, in order, the silence after each phase
    # and the stall-free cycles against ``expected_cycles``.
    seen = run_stream_on(buffer, run, name="weight_buffer", run_dir=tmp_path)
    for case, phase, result in zip(cases, run.phases, seen, strict=True):
        got = result.outputs["beats"]
        assert got == buffer.model(case.words, case.tiles), case.name
        assert len(got) == sum(length * replays for length, replays in case.tiles)
        expected = buffer.expected_cycles(WeightBufferJob(case.tiles))
        if case.stalls:
            assert phase.stalls and phase.expected_cycles is None
            assert result.cycles >= expected, case.name
            continue
        assert phase.expected_cycles == expected
        assert result.cycles == expected, (case.name, result.cycles, expected)
        # A tile's first beat leaves 3 cycles after its last word when the stream side idles.
        first_beat = result.handshakes["beats"][0] - result.handshakes["tiles"][0]
        assert first_beat == case.tiles[0][0] * buffer.words_per_beat + 3
        fill = [1 + length * buffer.words_per_beat for length, _ in case.tiles]
        stream = [length * replays for length, replays in case.tiles]
        serial = sum(fill) + sum(stream) + 2
        overlapped = fill[0] + sum(max(f, s) for f, s in zip(fill[1:], stream[:-1])) \
            + stream[-1] + 2
        print(f"{name} {case.name}: {result.cycles} cycles; fill {sum(fill)} + stream "
              f"{sum(stream)} = {serial} serial, {overlapped} with full overlap")
        # Filling overlaps streaming: max(fill, stream) per tile, not their sum.
        assert result.cycles == overlapped
        if case.name == "balanced":
            assert result.cycles < 0.65 * serial


def test_beats_connect_to_the_engine():
    """``beats`` carries the engine's weight-beat layout: ``wiring.connect`` accepts them."""
    cfg = SMALL
    m = Module()
    m.submodules.buffer = buffer = WeightBuffer(cfg, tile_beats=16, word_bits=8)
    m.submodules.engine = engine = TlmmEngine(cfg)
    wiring.connect(m, buffer.beats, engine.weights)
    assert buffer.beats.payload.shape().size == cfg.weight_beat_bits == 20


def test_model_and_image_round_trip():
    buffer = WeightBuffer(SMALL, tile_beats=16, word_bits=8)
    beats = [0xFFFFF, 0x12345, 0, 0xABCDE]
    words = buffer.image_words(beats)
    assert words == [0xFF, 0xFF, 0x0F, 0x45, 0x23, 0x01, 0, 0, 0, 0xDE, 0xBC, 0x0A]
    assert buffer.model(words, [(3, 2), (1, 1)]) == beats[:3] * 2 + beats[3:]
    with pytest.raises(ValueError, match="need 12 fill words"):
        buffer.model(words[:-1], [(3, 2), (1, 1)])
    with pytest.raises(ValueError, match=r"tile length must be an integer in 1\.\.16"):
        buffer.command(17, 1)
    with pytest.raises(ValueError, match=r"replays must be an integer in 1\.\.65535"):
        buffer.command(1, 0)
    with pytest.raises(ValueError, match="word_bits must be a positive integer, not 0"):
        WeightBuffer(SMALL, tile_beats=16, word_bits=0)
