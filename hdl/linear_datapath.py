"""The ternary linear datapath fed from DDR, as a board feeds it.

``WeightFedTlmm``: an ``AxiReadMaster`` streams a layer's weight-beat words out of DDR into the
double-buffered ``WeightBuffer``, which feeds the ``TlmmEngine`` one beat per cycle while the
next tile loads. ``WeightFedTlmmHarness`` adds the simulation-only ``DdrModel`` (latency and
bandwidth, inside the simulated design, no Python per cycle).

The host programs two command streams per tile (``weight_schedule`` builds them from the
weight image): an AXI read of the tile's words and a buffer command (tile length in beats,
replays). A tile replayed R times serves R activation rows without reading DDR again, which is
possible when a row's whole weight stream fits one buffer tile; otherwise every row streams
the layer from DDR again (decode does exactly that: M = 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from trilut.config import EngineConfig
from trilut.hdl.axi import AxiReadMaster
from trilut.hdl.ddr_model import VIOLATION_LAYOUT, DdrModel
from trilut.hdl.tlmm_engine import TlmmEngine
from trilut.hdl.weight_buffer import WeightBuffer

__all__ = ["WeightFedTlmm", "WeightFedTlmmHarness", "TileCommand", "weight_schedule"]


@dataclass(frozen=True)
class TileCommand:
    address: int        # byte address of the tile's first word in DDR
    words: int          # DDR words to read
    beats: int          # weight beats in the tile
    replays: int        # how many activation rows stream this tile


#: Tile size when a row streams straight through (no replay): small tiles let the next tile's
#: fill overlap this one's stream from the start (a single tile would fill completely first).
STREAM_TILE_BEATS = 256


def weight_schedule(*, address: int, beats_per_row: int, rows: int, words_per_beat: int,
                    word_bytes: int, tile_beats: int) -> list[TileCommand]:
    """The (AXI read, buffer tile) commands that stream a layer of ``beats_per_row`` beats,
    stored at ``address``, to the engine for ``rows`` activation rows."""
    if rows > 1 and beats_per_row <= tile_beats:
        # The whole row's stream fits one bank: read it once, replay it for every row.
        return [TileCommand(address, beats_per_row * words_per_beat, beats_per_row, rows)]
    chunk = min(tile_beats, STREAM_TILE_BEATS)
    chunks = []
    for start in range(0, beats_per_row, chunk):
        beats = min(chunk, beats_per_row - start)
        chunks.append(TileCommand(address + start * words_per_beat * word_bytes,
                                  beats * words_per_beat, beats, 1))
    return chunks * rows


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


class WeightFedTlmmHarness(wiring.Component):
    """Simulation top: ``WeightFedTlmm`` reading a ``DdrModel``; every port a top port.

    ``load`` is the DDR model's backdoor (word address, data), used once to place the weight
    image; ``violations`` are the DDR model's sticky AXI4 rule flags.
    """

    def __init__(self, cfg: EngineConfig, *, ddr_words: int, word_bits: int = 128,
                 tile_beats: int = 4096, latency: int = 20, beats_per_window: int = 1,
                 window: int = 1, max_outstanding: int = 4):
        self.datapath = WeightFedTlmm(cfg, word_bits=word_bits, tile_beats=tile_beats,
                                      max_outstanding=max_outstanding)
        self.ddr = DdrModel(depth=ddr_words, data_width=word_bits, latency=latency,
                            beats_per_window=beats_per_window, window=window)
        dp = self.datapath
        super().__init__({
            "load": In(self.ddr.load.signature.flip()),
            "cmd": In(dp.cmd.signature.flip()),
            "tiles": In(dp.tiles.signature.flip()),
            "acts": In(dp.acts.signature.flip()),
            "results": Out(dp.results.signature),
            "k_blocks": In(len(dp.k_blocks)),
            "n_groups": In(len(dp.n_groups)),
            "error": Out(1),
            "violations": Out(VIOLATION_LAYOUT),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.datapath = dp = self.datapath
        m.submodules.ddr = ddr = self.ddr
        wiring.connect(m, dp.axi, ddr.axi)
        wiring.connect(m, wiring.flipped(self.load), ddr.load)
        for name in ("cmd", "tiles", "acts"):
            wiring.connect(m, wiring.flipped(getattr(self, name)), getattr(dp, name))
        wiring.connect(m, dp.results, wiring.flipped(self.results))
        m.d.comb += [dp.k_blocks.eq(self.k_blocks), dp.n_groups.eq(self.n_groups),
                     self.error.eq(dp.error), self.violations.eq(ddr.violations)]
        return m
