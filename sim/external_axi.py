"""An AXI master checked against an independent slave: cocotbext-axi's ``AxiRam``.

Our own ``DdrModel`` checks the AXI rules it knows; a protocol mistake the model shares with
the master would pass it. ``sim/tb_external_axi.py`` therefore also runs each AXI master
against ``cocotbext.axi.AxiRam`` (Alex Forencich's AXI models, cocotb 2.x compatible as of
0.1.28: checked here), a slave written by someone else.

:class:`FlatAxiPorts` is the simulation top for that: the block's ``axi`` member becomes
plain ports named ``axi_<signal>`` (``axi_awaddr``, ``axi_wdata``, ...), the names
``AxiBus.from_prefix(dut, "axi")`` looks for, with a constant ID port pair (``axi_awid`` /
``axi_bid`` or ``axi_arid`` / ``axi_rid``, 1 bit, always 0) for a master without IDs, since
cocotbext-axi requires them. Every other member of the block passes through under its name.
"""

from __future__ import annotations

from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from trilut.hdl.memory.axi import AxiReadSignature
from trilut.hdl.memory.axi_write import AxiWriteSignature
from trilut.sim.ddr_model import forward_members

__all__ = ["FlatAxiPorts"]


class FlatAxiPorts(wiring.Component):
    def __init__(self, block: wiring.Component):
        member = block.signature.members.get("axi")
        if member is None or member.is_port or not isinstance(
                member.signature, (AxiReadSignature, AxiWriteSignature)):
            raise ValueError(f"{type(block).__name__} has no AXI4 'axi' port")
        self.block = block
        self.kind = "write" if isinstance(member.signature, AxiWriteSignature) else "read"
        self._flat = {f"axi_{path[-1]}": (path, mb.flow, len(value)) for path, mb, value
                      in member.signature.flatten(block.axi)}
        self._forwarded = {n: mb for n, mb in block.signature.members.items() if n != "axi"}
        ports = {**self._forwarded,
                 **{name: (Out if flow == Out else In)(width)
                    for name, (_, flow, width) in self._flat.items()}}
        ids = ("axi_awid", "axi_bid") if self.kind == "write" else ("axi_arid", "axi_rid")
        self._ids = [i for i in ids if i not in ports]
        if self._ids:
            ports.update({ids[0]: Out(1), ids[1]: In(1)})
        super().__init__(ports)

    def elaborate(self, platform):
        m = Module()
        m.submodules.block = block = self.block
        for name, (path, flow, _) in self._flat.items():
            inner = block.axi
            for step in path:
                inner = getattr(inner, step)
            outer = getattr(self, name)
            m.d.comb += (outer.eq(inner) if flow == Out else inner.eq(outer))
        forward_members(m, self, block, self._forwarded)
        if self._ids:
            m.d.comb += getattr(self, self._ids[0]).eq(0)
        return m
