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

How long it takes: :meth:`WeightFedTlmm.expected_cycles` of a :class:`WeightFedJob` (the
shape, the two command lists and the simulated DDR's timing), exact when no stream stalls.
It chains the children's event models word by word and beat by beat
(``AxiReadTiming`` -> ``WeightBufferTiming`` -> the engine's take rule), each event the
latest of its inputs plus a fixed latency; ``docs/linear_datapath.md`` has the measured
figures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from trilut.config import DatapathConfig, DdrSimConfig, EngineConfig, sum_memory
from trilut.hdl.memory.axi import AxiReadMaster, ReadJob
from trilut.hdl.linear.tlmm_engine import TlmmEngine
from trilut.hdl.memory.weight_buffer import WeightBuffer
from trilut.models.checks import positive_int

__all__ = ["WeightFedTlmm", "WeightFedJob", "ENGINE_LATENCY", "ENGINE_HAZARD"]

#: ``TlmmEngine``: a last-block weight beat taken on cycle ``p`` leaves as a result beat on
#: ``p + 3`` (S1 lookups, S2 accumulate, output register).
ENGINE_LATENCY = 3
#: ``TlmmEngine``: a beat of a later K block waits until ``p + 3`` after the same column
#: group's beat of the block before (its accumulator write-back).
ENGINE_HAZARD = 3


@dataclass(frozen=True)
class WeightFedJob:
    """One stall-free run of :class:`WeightFedTlmm`: ``rows`` activation rows of a ``k`` x
    ``n`` ternary matmul, the AXI read commands ``reads`` (byte address, words) and the
    weight-buffer commands ``tiles`` (length in beats, replays), in the order the host sends
    them, against the simulated DDR ``ddr``."""
    rows: int
    k: int
    n: int
    reads: tuple[tuple[int, int], ...]
    tiles: tuple[tuple[int, int], ...]
    ddr: DdrSimConfig


class WeightFedTlmm(wiring.Component):
    """AXI read master -> weight buffer -> TLMM engine.

    Ports: ``axi`` (the master's AXI4 read channels), ``cmd`` (read commands: byte address,
    length in words), ``tiles`` (buffer commands), ``acts`` / ``results`` and the shape inputs
    ``k_blocks`` / ``n_groups`` (the engine's), ``error`` (a non-OKAY read response, sticky).
    The DDR word width, the buffer's bank depth and the bursts in flight come from the
    ``DatapathConfig`` (``ddr_word_bits``, ``tile_beats``, ``max_outstanding``).
    """

    def __init__(self, cfg: EngineConfig, datapath: DatapathConfig):
        if not isinstance(cfg, EngineConfig):
            raise TypeError(f"cfg must be an EngineConfig, not {cfg!r}")
        if not isinstance(datapath, DatapathConfig):
            raise TypeError(f"datapath must be a DatapathConfig, not {datapath!r}")
        self.cfg = cfg
        self.datapath_config = datapath
        self.master = AxiReadMaster(data_width=datapath.ddr_word_bits,
                                    max_outstanding=datapath.max_outstanding)
        self.buffer = WeightBuffer(cfg, tile_beats=datapath.tile_beats,
                                   word_bits=datapath.ddr_word_bits)
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

    # ---- what it computes, what it costs, how long it takes --------------------------------

    def model(self, acts, weights) -> np.ndarray:
        """Bit-exact model: the engine's (``TlmmEngine.model``) on ``acts[M, K]`` and the
        ternary ``weights[N, K]`` whose beats the DDR holds; the read master and the buffer
        only carry the weight beats, unchanged and in order (their own models)."""
        return self.engine.model(acts, weights)

    def memory_blocks(self, board=None) -> dict[str, float]:
        """The children's: the read master's buffer, the weight buffer's banks (on
        ``board``, URAM when it has them) and the engine's accumulators."""
        return sum_memory(self.master.memory_blocks(), self.buffer.memory_blocks(board),
                          self.engine.memory_blocks())

    def shape(self, k: int, n: int) -> tuple[int, int]:
        """The engine's ``(k_blocks, n_groups)`` for a ``k`` x ``n`` matmul (checked)."""
        cfg = self.cfg
        positive_int("k", k)
        positive_int("n", n)
        cfg.check_shape(k, n)
        return cfg.padded_k(k) // cfg.block_k, cfg.padded_n(n) // cfg.columns_per_cycle

    def check_feed(self, reads, tiles, ddr, beats: int) -> None:
        """Refuse commands that do not feed ``beats`` weight beats, quoting the counts."""
        if not isinstance(ddr, DdrSimConfig):
            raise TypeError(f"ddr must be a DdrSimConfig, not {ddr!r}")
        for q, read in enumerate(reads):
            if not (isinstance(read, tuple) and len(read) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                            for v in read)):
                raise ValueError(f"read {q} must be (byte address, words), two integers "
                                 f">= 0, not {read!r}")
        for i, tile in enumerate(tiles):
            if not (isinstance(tile, tuple) and len(tile) == 2):
                raise ValueError(f"tile {i} must be (length, replays), not {tile!r}")
            self.buffer._check_tile(*tile)
        words = sum(w for _, w in reads)
        need = sum(length for length, _ in tiles) * self.buffer.words_per_beat
        if words != need:
            raise ValueError(f"the reads carry {words} DDR words; the tiles load {need} "
                             f"({self.buffer.words_per_beat} per beat)")
        streamed = sum(length * replays for length, replays in tiles)
        if streamed != beats:
            raise ValueError(f"the tiles stream {streamed} weight beats; the engine takes "
                             f"{beats}")

    def timing(self, reads: Sequence[tuple[int, int]], tiles: Sequence[tuple[int, int]],
               ddr: DdrSimConfig, engine_rows: Sequence[tuple[int, int]],
               first_act: Callable[[int, list], int]) -> list[list[int]]:
        """The cycle of every result beat: per engine row (``(k_blocks, n_groups)`` each, in
        order), the cycles its result beats are offered, counted from the first command
        taken (cycle 0), with ``results`` never stalled.

        ``first_act(row, results)`` gives the earliest cycle the engine may take the row's
        first activation beat, from the result cycles of the rows before (``results``); the
        later beats of a row are taken as soon as the engine wants them (a parent whose
        activations could lag checks that they cannot). Event rules: the children's
        (``AxiReadTiming``, ``WeightBufferTiming``); the engine takes weight beat ``e`` on
        ``p_e = max(o_e, p_{e-D} + 3 if it is not of the first K block, first_act if it is
        the row's first)`` (``D`` the tile's column groups) and a last-block beat leaves 3
        cycles later.
        """
        self.check_feed(reads, tiles, ddr, sum(kb * ng for kb, ng in engine_rows))
        axi = self.master.timing(ReadJob(reads, ddr))
        buf = self.buffer.timing(tiles)
        depth = self.cfg.accumulator_depth
        # The engine's beats in stream order: (engine row, needs the hazard wait, tile depth,
        # last block) per beat, produced lazily as the buffer streams them.

        def engine_beats():
            for row, (k_blocks, n_groups) in enumerate(engine_rows):
                for start in range(0, n_groups, depth):
                    d_t = min(depth, n_groups - start)
                    for kb in range(k_blocks):
                        for d in range(d_t):
                            yield row, kb > 0, d_t, kb == k_blocks - 1, kb == start == d == 0
        beats = engine_beats()
        taken: list[int] = []
        results: list[list[int]] = [[] for _ in engine_rows]
        word = 0
        for i in range(len(tiles)):
            c = buf.command(i)
            f = None
            for _ in range(buf.words(i)):
                f = max(axi.offered(word), c + 1)
                axi.take(word, f)
                word += 1
            buf.filled(i, f)
            for _ in range(buf.beats(i)):
                row, hazard, d_t, last, first = next(beats)
                p = buf.beat_offered()
                if hazard:
                    p = max(p, taken[-d_t] + ENGINE_HAZARD)
                if first:
                    p = max(p, first_act(row, results[:row]))
                buf.beat_taken(p)
                taken.append(p)
                if last:
                    results[row].append(p + ENGINE_LATENCY)
        return results

    def expected_cycles(self, job: WeightFedJob) -> int:
        """Cycles from the first input beat taken (the first read and tile commands) to the
        last result beat, inclusive, when no stream stalls (activations always offered)."""
        if not isinstance(job, WeightFedJob):
            raise TypeError(f"job must be a WeightFedJob, not {job!r}")
        positive_int("rows", job.rows)
        shape = self.shape(job.k, job.n)
        results = self.timing(job.reads, job.tiles, job.ddr, [shape] * job.rows,
                              lambda row, done: 0)
        return results[-1][-1] + 1
