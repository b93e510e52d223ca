"""The register map description, its exports, and the AXI4-Lite slave in Amaranth's simulator.

The slave is driven by hand here (AW before W, W before AW, both together, a slow B/R
handshake) and every response is compared with ``RegisterFileModel``; the independent master
(cocotbext-axi's AxiLiteMaster) runs in ``tests/test_regmap_verilator.py``.
"""

import json
import pathlib
import random

import pytest
from amaranth.sim import Simulator

from trilut.hdl.control.regmap import (RESP_OKAY, RESP_SLVERR, AxiLiteSlave, Field, Register,
                                        RegisterFileModel, RegisterMap, accelerator_registers)

pytestmark = pytest.mark.fast

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "register_map.md"


def test_offsets_follow_the_list_and_wide_registers_take_two_words():
    m = RegisterMap([Register("A", "rw", 8), Register("B", "ro", 64), Register("C", "w1p")])
    assert [(w.name, w.offset) for w in m.words] == [("A", 0), ("B_LO", 4), ("B_HI", 8),
                                                      ("C", 12)]
    assert m.offset("B") == 4 and m.offset("B_HI") == 8 and m.size == 16
    assert m.word_at(16) is None and m.word_at(13).name == "C"


@pytest.mark.parametrize("registers, message", [
    ([Register("A", "rw"), Register("A", "ro")], "duplicate register name 'A'"),
    ([Register("B", "rw", 64), Register("B_HI", "rw")], "duplicate register name 'B_HI'"),
    ([], "at least one register"),
])
def test_map_refusals(registers, message):
    with pytest.raises(ValueError, match=message):
        RegisterMap(registers)


@pytest.mark.parametrize("kwargs, message", [
    ({"width": 65}, "width must be an integer from 1 to 64, not 65"),
    ({"width": 0}, "width must be an integer from 1 to 64, not 0"),
    ({"access": "wo"}, "access must be one of"),
    ({"reset": 256, "width": 8}, "reset must fit in 8 bits, not 256"),
    ({"constant": True}, "only an ro register can be constant"),
    ({"fields": (Field("X", 7, 2),), "width": 8}, "field X .* overruns"),
])
def test_register_refusals(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Register("R", **{"access": "rw", **kwargs})


def test_map_must_fit_its_address_window():
    with pytest.raises(ValueError, match="needs 12 bytes, more than address_width=3"):
        RegisterMap([Register("A", "rw", 64), Register("B", "rw")], address_width=3)


def test_accelerator_map_exports():
    m = accelerator_registers()
    doc = m.to_json()
    json.dumps(doc)
    assert doc["data_width"] == 32 and doc["address_width"] == 12
    by_name = {r["name"]: r for r in doc["registers"]}
    assert list(by_name) == ["CONTROL", "MODE", "POSITION", "TOKENS", "WEIGHTS_BASE",
                             "NORMS_BASE", "ROPE_BASE", "KV_BASE", "ACT_BASE", "STATUS",
                             "ERROR", "CYCLES_PREFILL", "CYCLES_DECODE", "VERSION"]
    assert by_name["CONTROL"]["access"] == "w1p" and by_name["STATUS"]["access"] == "ro"
    assert by_name["WEIGHTS_BASE"] == {**by_name["WEIGHTS_BASE"], "offset": 0x10, "width": 64}
    assert [w["offset"] for w in by_name["KV_BASE"]["words"]] == [0x28, 0x2C]
    assert all(r["offset"] % 4 == 0 for r in doc["registers"])
    header = m.c_header()
    assert "#define TRILUT_CONTROL_OFFSET 0x000u" in header
    assert "#define TRILUT_WEIGHTS_BASE_HI_OFFSET 0x014u" in header
    assert "#define TRILUT_STATUS_DONE_MASK 0x2u" in header
    assert "#define TRILUT_VERSION_VALUE 0x10000u" in header
    assert "#define ACC_MODE_OFFSET" in m.c_header("ACC")


def test_doc_table_is_the_generated_one():
    assert accelerator_registers().markdown_table() in DOC.read_text()


# --- the slave in Amaranth's simulator --------------------------------------------------------

RO = {"STATUS": 0b101, "ERROR": 0x5A, "CYCLES_PREFILL": 0x1234_5678_9ABC_DEF0,
      "CYCLES_DECODE": 0x0FED_CBA9_8765_4321}


def _ops(regmap, rng):
    """Writes (in every AW/W order) and reads over every word and past the end."""
    ops = []
    orders = ["aw_first", "w_first", "together"]
    for w in regmap.words:
        ops.append(("w", w.offset, rng.getrandbits(32), 0xF, orders[len(ops) % 3]))
        ops.append(("r", w.offset))
        ops.append(("w", w.offset + 1, rng.getrandbits(32), 0b0010, orders[len(ops) % 3]))
        ops.append(("r", w.offset))
    for address in (regmap.size, 0xFFC):
        ops += [("w", address, 0xFFFF_FFFF, 0xF, "together"), ("r", address)]
    ops += [("r", w.offset) for w in regmap.words]
    return ops


def _simulate(regmap, ops, *, bready_delay):
    dut = AxiLiteSlave(regmap)
    a = dut.axil
    seen, pulses = [], []

    async def testbench(ctx):
        for name, value in RO.items():
            ctx.set(dut.register_port(name), value)
        for op in ops:
            if op[0] == "w":
                _, address, data, strb, order = op
                steps = {"aw_first": [("aw",), ("w",)], "w_first": [("w",), ("aw",)],
                         "together": [("aw", "w")]}[order]
                for step in steps:
                    if "aw" in step:
                        ctx.set(a("awaddr"), address)
                        ctx.set(a("awvalid"), 1)
                    if "w" in step:
                        ctx.set(a("wdata"), data)
                        ctx.set(a("wstrb"), strb)
                        ctx.set(a("wvalid"), 1)
                    for _ in range(100):
                        took = [ch for ch in step if ctx.get(a(f"{ch}ready"))]
                        await ctx.tick()
                        for ch in took:
                            ctx.set(a(f"{ch}valid"), 0)
                        step = [ch for ch in step if ch not in took]
                        if not step:
                            break
                    assert not step, f"{op}: channel never ready"
                    await ctx.tick().repeat(2)
                for _ in range(bready_delay):
                    await ctx.tick()
                ctx.set(a("bready"), 1)
                for _ in range(100):
                    if ctx.get(a("bvalid")):
                        break
                    await ctx.tick()
                seen.append(ctx.get(a("bresp")))
                await ctx.tick()
                ctx.set(a("bready"), 0)
                assert not ctx.get(a("bvalid"))
            else:
                _, address = op
                ctx.set(a("araddr"), address)
                ctx.set(a("arvalid"), 1)
                await ctx.tick().until(a("arready"))
                ctx.set(a("arvalid"), 0)
                for _ in range(bready_delay):
                    await ctx.tick()
                ctx.set(a("rready"), 1)
                await ctx.tick().until(a("rvalid"))
                seen.append((ctx.get(a("rdata")), ctx.get(a("rresp"))))
                ctx.set(a("rready"), 0)
        await ctx.tick()

    async def pulse_monitor(ctx):
        control = dut.register_port("CONTROL")
        async for _, _, value in ctx.tick().sample(control):
            if value:
                pulses.append(value)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(testbench)
    sim.add_process(pulse_monitor)
    sim.run()
    return dut, seen, pulses


@pytest.mark.parametrize("bready_delay", [0, 3])
def test_slave_matches_model_in_every_channel_order(bready_delay):
    regmap = accelerator_registers()
    ops = _ops(regmap, random.Random(bready_delay))
    model = RegisterFileModel(regmap, RO)
    expected = [model.write(op[1], op[2], op[3]) if op[0] == "w" else model.read(op[1])
                for op in ops]
    _, seen, pulses = _simulate(regmap, ops, bready_delay=bready_delay)
    assert seen == expected
    assert pulses == [value for _, value in model.pulses] and pulses
    # The checks bite: ro writes and unmapped offsets are refused, constants read back.
    assert model.write(regmap.offset("STATUS"), 0) == RESP_SLVERR
    assert model.read(regmap.size) == (0, RESP_SLVERR)
    assert model.read(regmap.offset("VERSION")) == (0x10000, RESP_OKAY)
    assert model.read(regmap.offset("CYCLES_DECODE_HI")) == (0x0FED_CBA9, RESP_OKAY)
    assert model.values["MODE"] in (0, 1)


def test_one_transaction_takes_expected_cycles():
    """Write (AW and W together) and read on an idle slave, ``bready``/``rready`` high: the
    handshake cycles counted inclusive equal ``expected_cycles``."""
    from trilut.hdl.control.regmap import AxiLiteJob
    regmap = accelerator_registers()
    dut = AxiLiteSlave(regmap)
    a = dut.axil
    measured = {}

    async def testbench(ctx):
        ctx.set(a("bready"), 1)
        ctx.set(a("rready"), 1)
        ctx.set(a("awaddr"), regmap.offset("MODE"))
        ctx.set(a("wdata"), 1)
        ctx.set(a("wstrb"), 0xF)
        ctx.set(a("awvalid"), 1)
        ctx.set(a("wvalid"), 1)
        assert ctx.get(a("awready")) and ctx.get(a("wready"))
        cycle = 0
        await ctx.tick()
        ctx.set(a("awvalid"), 0)
        ctx.set(a("wvalid"), 0)
        while not ctx.get(a("bvalid")):
            cycle += 1
            await ctx.tick()
        measured["write"] = cycle + 2            # the AW/W cycle and the B cycle, inclusive
        await ctx.tick()
        ctx.set(a("araddr"), regmap.offset("MODE"))
        ctx.set(a("arvalid"), 1)
        assert ctx.get(a("arready"))
        await ctx.tick()
        ctx.set(a("arvalid"), 0)
        cycle = 0
        while not ctx.get(a("rvalid")):
            cycle += 1
            await ctx.tick()
        measured["read"] = cycle + 2
        assert ctx.get(a("rdata")) == 1
        assert ctx.get(dut.register_port("MODE")) == 1

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(testbench)
    sim.run()
    assert measured == {"write": dut.expected_cycles(AxiLiteJob(write=True)),
                        "read": dut.expected_cycles(AxiLiteJob(write=False))}
    assert dut.memory_blocks() == {}
    assert dut.model().read(regmap.offset("MODE"))[1] == 0     # OKAY from the reset model
