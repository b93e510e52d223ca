"""The ternary linear datapath fed from DDR, as a board feeds it.

``WeightFedTlmm``: an ``AxiReadMaster`` streams a layer's weight-beat words out of DDR into the
double-buffered ``WeightBuffer``, which feeds the ``TlmmEngine`` one beat per cycle while the
next tile loads. In simulation ``trilut.sim.ddr_model.DdrHarness`` puts the DDR model behind
its ``axi`` port.

The host programs two command streams per tile (``trilut.host.schedule.weight_schedule``
builds them from the weight image): an AXI read of the tile's words and a buffer command (tile length in beats,
replays). A tile replayed R times serves R activation rows without reading DDR again, which is
possible when a row's whole weight stream fits one buffer tile; otherwise every row streams
the layer from DDR again (decode does exactly that: M = 1).
"""

from __future__ import annotations

from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from trilut.config import EngineConfig
from trilut.hdl.memory.axi import AxiReadMaster
from trilut.hdl.linear.tlmm_engine import TlmmEngine
from trilut.hdl.memory.weight_buffer import WeightBuffer

__all__ = ["WeightFedTlmm"]


class WeightFedTlmm(wiring.Component):
    """AXI read master -> weight buffer -> TLMM engine.

    Ports: ``axi`` (the master's AXI4 read channels), ``cmd`` (read commands: byte address,
    length in words), ``tiles`` (buffer commands), ``acts`` / ``results`` and the shape inputs
    ``k_blocks`` / ``n_groups`` (the engine's), ``error`` (a non-OKAY read response, sticky).
    """

    def __init__(self, cfg: EngineConfig, *, word_bits: int = 128, tile_beats: int = 4096,
                 max_outstanding: int = 4):
        self.cfg = cfg
        self.master = AxiReadMaster(data_width=word_bits, max_outstanding=max_outstanding)
        self.buffer = WeightBuffer(cfg, tile_beats=tile_beats, word_bits=word_bits)
        self.engine = TlmmEngine(cfg)
        super().__init__({
            "axi": Out(self.master.axi.signature),
            "cmd": In(self.master.cmd.signature.flip()),
            "tiles": In(self.buffer.tiles.signature.flip()),
            "acts": In(self.engine.acts.signature.flip()),
            "results": Out(self.engine.results.signature),
            "k_blocks": In(len(self.engine.k_blocks)),
            "n_groups": In(len(self.engine.n_groups)),
            "error": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.master = master = self.master
        m.submodules.buffer = buffer = self.buffer
        m.submodules.engine = engine = self.engine
        wiring.connect(m, wiring.flipped(self.axi), master.axi)
        wiring.connect(m, wiring.flipped(self.cmd), master.cmd)
        wiring.connect(m, wiring.flipped(self.tiles), buffer.tiles)
        wiring.connect(m, master.data, buffer.fill)
        wiring.connect(m, buffer.beats, engine.weights)
        wiring.connect(m, wiring.flipped(self.acts), engine.acts)
        wiring.connect(m, engine.results, wiring.flipped(self.results))
        m.d.comb += [engine.k_blocks.eq(self.k_blocks), engine.n_groups.eq(self.n_groups),
                     self.error.eq(master.error)]
        return m
