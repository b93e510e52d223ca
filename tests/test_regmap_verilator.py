# amaranth: UnusedElaboratable=no
"""The AXI4-Lite register slave against an independent master: cocotbext-axi's AxiLiteMaster.

A small harness ties every ro register to a constant and counts the cycles each w1p pulse is
high. The master writes every rw word in full and in part (``wstrb`` 0b0010 and 0b1100),
reads every word back, pulses CONTROL, writes an ro register and touches unmapped offsets,
with and without random pauses on all five channels; every response, every value read and
the final port values must match ``RegisterFileModel``, and the pulse counter must equal the
number of nonzero pulses (so each lasts exactly one cycle).
"""

import random

import pytest
from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from trilut.hdl.control.regmap import (RESP_OKAY, RESP_SLVERR, AxiLiteSlave, RegisterFileModel,
                                        accelerator_registers)
from trilut.sim.runner import run_case

pytestmark = pytest.mark.rtl

RO = {"STATUS": 0b110, "ERROR": 0xA5, "CYCLES_PREFILL": 0x0123_4567_89AB_CDEF,
      "CYCLES_DECODE": 0xFEDC_BA98_7654_3210}
PULSE_COUNT_WIDTH = 16


class RegisterHarness(wiring.Component):
    """``AxiLiteSlave`` with its ro inputs tied to ``ro_values``; each w1p register ``x`` gets
    ``x_pulses`` (cycles its port was nonzero) and ``x_last`` (its last nonzero value)."""

    def __init__(self, regmap, ro_values):
        self.slave = AxiLiteSlave(regmap)
        self.ro_values = ro_values
        members = {name: member for name, member in self.slave.signature.members.items()
                   if name.startswith("s_axil_") or regmap[name.upper()].access == "rw"}
        self.pulsed = [r for r in regmap.registers if r.access == "w1p"]
        for reg in self.pulsed:
            members[f"{reg.port_name}_pulses"] = Out(PULSE_COUNT_WIDTH)
            members[f"{reg.port_name}_last"] = Out(reg.width)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        m.submodules.slave = slave = self.slave
        for name, member in slave.signature.members.items():
            if name in self.signature.members:
                outer, inner = getattr(self, name), getattr(slave, name)
                m.d.comb += outer.eq(inner) if member.flow == Out else inner.eq(outer)
        for name, value in self.ro_values.items():
            m.d.comb += slave.register_port(name).eq(value)
        for reg in self.pulsed:
            port = getattr(slave, reg.port_name)
            with m.If(port != 0):
                m.d.sync += [getattr(self, f"{reg.port_name}_pulses").eq(
                                 getattr(self, f"{reg.port_name}_pulses") + 1),
                             getattr(self, f"{reg.port_name}_last").eq(port)]
        return m


def _ops(regmap, rng):
    ops = []
    for w in regmap.words:
        if w.register.access == "rw":
            ops += [("w", w.offset, rng.randbytes(4)), ("r", w.offset, 4),
                    ("w", w.offset + 1, rng.randbytes(1)), ("r", w.offset, 4),
                    ("w", w.offset + 2, rng.randbytes(2)), ("r", w.offset, 4)]
        else:
            ops.append(("r", w.offset, 4))
    control = regmap.offset("CONTROL")
    ops += [("w", control, bytes([1, 0, 0, 0])), ("w", control, bytes(4)),
            ("w", control, bytes([1, 0, 0, 0])), ("w", control, bytes([3, 0, 0, 0]))]
    ops += [("w", regmap.offset("STATUS"), b"\xff" * 4), ("w", regmap.offset("VERSION"), bytes(4))]
    for address in (regmap.size, 0xFFC):
        ops += [("w", address, b"\xff" * 4), ("r", address, 4)]
    ops += [("r", w.offset, 4) for w in regmap.words]
    return ops


def _expected(model, ops):
    out = []
    for kind, address, arg in ops:
        lane = address % 4
        if kind == "w":
            data = int.from_bytes(arg, "little") << 8 * lane
            strb = ((1 << len(arg)) - 1) << lane
            out.append([model.write(address, data, strb)])
        else:
            data, resp = model.read(address)
            out.append([data.to_bytes(4, "little")[lane:lane + arg].hex(), resp])
    return out


@pytest.mark.parametrize("stall", [0.0, 0.4])
def test_register_map_against_cocotbext_axil_master(stall, tmp_path):
    regmap = accelerator_registers()
    harness = RegisterHarness(regmap, RO)
    ops = _ops(regmap, random.Random(11))
    rw_ports = [r.port_name for r in regmap.registers if r.access == "rw"]
    case = {"ops": [[k, a, d.hex() if k == "w" else d] for k, a, d in ops],
            "ports": rw_ports + ["control_pulses", "control_last"],
            "stall": stall, "seed": 3}
    seen, _ = run_case(harness, name="axil_regmap", test_module="trilut.sim.tb_axil",
                       case=case, run_dir=tmp_path)
    model = RegisterFileModel(regmap, RO)
    expected = _expected(model, ops)
    assert seen["ops"] == expected
    assert seen["ports"] == {**{r.port_name: model.values[r.name] for r in regmap.registers
                                if r.access == "rw"},
                             "control_pulses": len(model.pulses),
                             "control_last": model.pulses[-1][1]}
    # What the comparison covers: three nonzero pulses, refused ro and unmapped accesses.
    assert len(model.pulses) == 3 and model.pulses[-1] == ("CONTROL", 3)
    resps = [e[-1] for e in expected]
    assert resps.count(RESP_SLVERR) == 6 and resps.count(RESP_OKAY) == len(ops) - 6
