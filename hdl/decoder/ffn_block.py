"""The FFN block in TeLLMe's streaming dataflow, weights fed from DDR through one engine.

    h ─┬─> RmsNorm(post_attention_layernorm) -> ActQuantizer ──acts──┐ (one row, replayed
       │                                       │ absmax              v  for gate and up)
       │             Dequantizer <── results ── WeightFedTlmm (DDR -> AXI -> buffer -> engine)
       │                 │ (routed by phase: gate, up, down)          ^
       │  gate -> FIFO ──┤                                            │ acts
       │                 v                                            │
       │          GatedActivation(act(gate) * up) -> RmsNorm(ffn_sub_norm) -> ActQuantizer
       │                 │ down
       └─> residual FIFO ──> ResidualAdd -> y

One ``WeightFedTlmm`` is time-shared by the three matmuls (TeLLMe uses one engine), in the
order gate, up, down for every row. The norm and quantizer in front of gate / up serve both:
the quantized row is replayed ``2 * EngineConfig.output_tiles(ffn)`` times, so gate and up are two engine rows
of the same shape (K = hidden, N = ffn). Down is one engine row of shape (K = ffn,
N = hidden).

Sequencing (four small counters, no host involvement beyond the weight schedule):

* ``res_phase`` (gate, up, down) counts the engine's result beats; it selects the engine's and
  the dequantizer's shape (``k_blocks``, ``n_groups``) and where a dequantized beat goes.
* ``act_phase`` counts the activation beats the engine takes; the engine takes a beat of the
  shape class (gate/up or down) only while ``res_phase`` is in the same class, so the shape
  inputs switch only when the engine is empty (its last result beat of the class has left).
* ``abs_phase`` orders the dequantizer's per-row scales: the gate/up quantizer's absmax is
  offered twice (with the gate, then the up weight scale), the down quantizer's once.
  ``DequantScale`` reads ``weight_scale`` only on the edge that takes ``absmax``.
* the dequantizer's outputs are routed by their own counter (``out_phase``).

The host streams the three layers' weight schedules (``weight_schedule`` per layer,
concatenated in phase order per row) on ``cmd`` / ``tiles``.

How long it takes: :meth:`FfnBlock.expected_cycles` of an :class:`FfnJob`, exact when no
stream stalls, composed from the children's models (see the method): the weight feed and the
engine's result beats from ``WeightFedTlmm.timing``, each engine row started no earlier than
its activations (the norms' ``expected_cycles``, the quantizers' latency) and the phase
sequencing allow; the dequantizer, gated activation and residual add as their latencies. The
gate FIFO (``SyncFIFOBuffered``: a beat written on ``t`` is offered on ``t + 2``) is never on
the critical path: every gate beat is in it long before its up beat.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from trilut.config import DatapathConfig, DdrSimConfig, EngineConfig, memory_blocks, sum_memory
from trilut.hdl.elementwise.activation import GatedActivation
from trilut.hdl.elementwise.dequant import Dequantizer
from trilut.hdl.elementwise.lanes import lane_layout
from trilut.hdl.elementwise.residual import ResidualAdd
from trilut.hdl.linear.sequencing import check_quantizer_keeps_up, norm_last_beats
from trilut.hdl.linear.bitlinear import quantizer_latency
from trilut.hdl.linear.weight_fed_tlmm import WeightFedTlmm
from trilut.hdl.elementwise.act_quant import ActQuantizer
from trilut.hdl.elementwise.rmsnorm import RmsNorm, RmsNormJob
from trilut.models import numerics as nm
from trilut.models.checks import positive_int

__all__ = ["FfnBlock", "FfnJob"]

GATE, UP, DOWN = 0, 1, 2


@dataclass(frozen=True)
class FfnJob:
    """One stall-free run of :class:`FfnBlock` (whose shapes are fixed at construction):
    ``rows`` residual rows, the read and tile commands of the weight schedules (gate, up,
    down per row, in the order the host sends them) and the simulated DDR."""
    rows: int
    reads: tuple[tuple[int, int], ...]
    tiles: tuple[tuple[int, int], ...]
    ddr: DdrSimConfig


class FfnBlock(wiring.Component):
    """``y = h + down(sub_norm(act(gate(norm(h))) * up(norm(h))))`` per row of ``hidden`` fp16.

    Streams: ``h`` (the residual rows, ``hidden / C`` beats each), ``norm_weight`` (the
    post-attention norm's weights, one row per ``h`` row), ``sub_norm_weight`` (``ffn_sub_norm``
    weights, ``ffn / C`` beats, one row per ``h`` row), ``y`` (``hidden / C`` beats per row);
    ``cmd`` / ``tiles`` (the weight schedule of gate, up, down per row); ``axi`` to DDR.
    Scalar inputs (held): ``gate_scale``, ``up_scale``, ``down_scale`` (fp32 codes).
    The shapes are fixed at construction (``hidden``, ``ffn``); the DDR word width, tile
    depth, bursts in flight, gated activation and norm epsilon come from the
    ``DatapathConfig``. ``residual_rows``: rows of ``h`` the residual FIFO holds.
    """

    def __init__(self, cfg: EngineConfig, datapath: DatapathConfig, *, hidden: int, ffn: int,
                 residual_rows: int = 2):
        self.datapath = WeightFedTlmm(cfg, datapath)        # checks both configurations
        C = cfg.columns_per_cycle
        if datapath.lanes != C:
            raise ValueError(f"datapath.lanes ({datapath.lanes}) must equal the engine's "
                             f"columns_per_cycle ({C})")
        positive_int("residual_rows", residual_rows)
        activation, eps = datapath.activation, datapath.norm_eps
        for name, n in (("hidden", hidden), ("ffn", ffn)):
            cfg.check_shape(n, n)
            if n % C or cfg.padded_n(n) != n:
                raise ValueError(f"{name} = {n} must be a multiple of C = {C} (unpadded)")
        self.cfg, self.hidden, self.ffn, self.activation = cfg, hidden, ffn, activation
        self.eps = eps
        self.hidden_beats, self.ffn_beats = hidden // C, ffn // C
        self.norm = RmsNorm(lanes=C, max_n=hidden, eps=eps)
        self.quant = ActQuantizer(cfg, lanes=C, max_n=hidden)
        self.sub_norm = RmsNorm(lanes=C, max_n=ffn, eps=eps)
        self.sub_quant = ActQuantizer(cfg, lanes=C, max_n=ffn)
        self.dequant = Dequantizer(cfg)
        self.gated = GatedActivation(lanes=C, activation=activation)
        self.residual = ResidualAdd(lanes=C)
        self.residual_rows = residual_rows
        # Plain FIFOs of lane beats (16 C bits); their stream views connect to the lanes.
        self.gate_fifo = fifo.SyncFIFOBuffered(width=16 * C, depth=self.ffn_beats)
        self.residual_fifo = fifo.SyncFIFOBuffered(width=16 * C,
                                                   depth=residual_rows * self.hidden_beats)
        # Engine shapes per class: gate/up (K = hidden, N = ffn), down (K = ffn, N = hidden).
        self.k_blocks = {GATE: cfg.padded_k(hidden) // cfg.block_k,
                         DOWN: cfg.padded_k(ffn) // cfg.block_k}
        self.n_groups = {GATE: ffn // C, DOWN: hidden // C}
        self.quant_tiles = 2 * cfg.output_tiles(ffn)
        self.sub_quant_tiles = cfg.output_tiles(hidden)
        dp = self.datapath
        lanes = stream.Signature(lane_layout(C))
        super().__init__({
            "h": In(lanes),
            "norm_weight": In(lanes),
            "sub_norm_weight": In(lanes),
            "y": Out(lanes),
            "axi": Out(dp.axi.signature),
            "cmd": In(dp.cmd.signature.flip()),
            "tiles": In(dp.tiles.signature.flip()),
            "gate_scale": In(unsigned(32)),
            "up_scale": In(unsigned(32)),
            "down_scale": In(unsigned(32)),
            "error": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        for name in ("norm", "quant", "sub_norm", "sub_quant", "datapath", "dequant", "gated",
                     "residual", "gate_fifo", "residual_fifo"):
            m.submodules[name] = getattr(self, name)
        norm, quant, sub_norm, sub_quant = self.norm, self.quant, self.sub_norm, self.sub_quant
        dp, deq, gated, res = self.datapath, self.dequant, self.gated, self.residual
        gfifo, rfifo = self.gate_fifo, self.residual_fifo
        m.d.comb += [norm.n.eq(self.hidden), quant.n.eq(self.hidden),
                     quant.tiles.eq(self.quant_tiles),
                     sub_norm.n.eq(self.ffn), sub_quant.n.eq(self.ffn),
                     sub_quant.tiles.eq(self.sub_quant_tiles),
                     self.error.eq(dp.error)]

        # ---- h forks to the norm and the residual FIFO ------------------------------------
        rfifo_in = rfifo.w_stream
        m.d.comb += [norm.x.payload.eq(self.h.payload), rfifo_in.payload.eq(self.h.payload),
                     norm.x.valid.eq(self.h.valid & rfifo_in.ready),
                     rfifo_in.valid.eq(self.h.valid & norm.x.ready),
                     self.h.ready.eq(norm.x.ready & rfifo_in.ready)]
        wiring.connect(m, wiring.flipped(self.norm_weight), norm.weight)
        wiring.connect(m, norm.y, quant.x)
        wiring.connect(m, wiring.flipped(self.sub_norm_weight), sub_norm.weight)
        wiring.connect(m, gated.y, sub_norm.x)
        wiring.connect(m, sub_norm.y, sub_quant.x)
        wiring.connect(m, wiring.flipped(self.axi), dp.axi)
        wiring.connect(m, wiring.flipped(self.cmd), dp.cmd)
        wiring.connect(m, wiring.flipped(self.tiles), dp.tiles)

        # ---- res_phase: the engine's result beats (and the dequantizer's inputs) ----------
        res_phase = Signal(range(3))
        res_count = Signal(range(max(self.n_groups.values())))
        res_down = res_phase == DOWN
        res_groups = Mux(res_down, self.n_groups[DOWN], self.n_groups[GATE])
        m.d.comb += [dp.k_blocks.eq(Mux(res_down, self.k_blocks[DOWN], self.k_blocks[GATE])),
                     dp.n_groups.eq(res_groups), deq.n_groups.eq(res_groups)]
        wiring.connect(m, dp.results, deq.acc)
        with m.If(dp.results.valid & dp.results.ready):
            with m.If(res_count == res_groups - 1):
                m.d.sync += [res_count.eq(0), res_phase.eq(Mux(res_down, GATE, res_phase + 1))]
            with m.Else():
                m.d.sync += res_count.eq(res_count + 1)

        # ---- act_phase: the engine's activation beats -------------------------------------
        gate_act_beats = self.k_blocks[GATE] * self.cfg.output_tiles(self.ffn)   # per engine row
        down_act_beats = self.k_blocks[DOWN] * self.sub_quant_tiles
        act_phase = Signal(range(3))
        act_count = Signal(range(max(gate_act_beats, down_act_beats)))
        act_down = act_phase == DOWN
        act_beats = Mux(act_down, down_act_beats, gate_act_beats)
        open_ = act_down == res_down            # same shape class as the results
        m.d.comb += [
            dp.acts.payload.eq(Mux(act_down, sub_quant.acts.payload.as_value(),
                                   quant.acts.payload.as_value())),
            dp.acts.valid.eq(open_ & Mux(act_down, sub_quant.acts.valid, quant.acts.valid)),
            quant.acts.ready.eq(open_ & ~act_down & dp.acts.ready),
            sub_quant.acts.ready.eq(open_ & act_down & dp.acts.ready),
        ]
        with m.If(dp.acts.valid & dp.acts.ready):
            with m.If(act_count == act_beats - 1):
                m.d.sync += [act_count.eq(0), act_phase.eq(Mux(act_down, GATE, act_phase + 1))]
            with m.Else():
                m.d.sync += act_count.eq(act_count + 1)

        # ---- abs_phase: per-row scales into the dequantizer -------------------------------
        abs_phase = Signal(range(3))
        abs_down = abs_phase == DOWN
        m.d.comb += [
            deq.absmax.payload.eq(Mux(abs_down, sub_quant.absmax.payload, quant.absmax.payload)),
            deq.absmax.valid.eq(Mux(abs_down, sub_quant.absmax.valid, quant.absmax.valid)),
            quant.absmax.ready.eq((abs_phase == UP) & deq.absmax.ready),
            sub_quant.absmax.ready.eq(abs_down & deq.absmax.ready),
            deq.weight_scale.eq(Mux(abs_phase == GATE, self.gate_scale,
                                    Mux(abs_phase == UP, self.up_scale, self.down_scale))),
        ]
        with m.If(deq.absmax.valid & deq.absmax.ready):
            m.d.sync += abs_phase.eq(Mux(abs_down, GATE, abs_phase + 1))

        # ---- out_phase: route the dequantized beats ---------------------------------------
        out_phase = Signal(range(3))
        out_count = Signal(range(max(self.n_groups.values())))
        out_down = out_phase == DOWN
        out_groups = Mux(out_down, self.n_groups[DOWN], self.n_groups[GATE])
        payload = deq.y.payload.as_value()
        gfifo_in = gfifo.w_stream
        m.d.comb += [
            gfifo_in.payload.eq(payload), gated.up.payload.eq(payload),
            res.update.payload.eq(payload),
            gfifo_in.valid.eq(deq.y.valid & (out_phase == GATE)),
            gated.up.valid.eq(deq.y.valid & (out_phase == UP)),
            res.update.valid.eq(deq.y.valid & out_down),
            deq.y.ready.eq(Mux(out_phase == GATE, gfifo_in.ready,
                               Mux(out_phase == UP, gated.up.ready, res.update.ready))),
        ]
        with m.If(deq.y.valid & deq.y.ready):
            with m.If(out_count == out_groups - 1):
                m.d.sync += [out_count.eq(0), out_phase.eq(Mux(out_down, GATE, out_phase + 1))]
            with m.Else():
                m.d.sync += out_count.eq(out_count + 1)
        wiring.connect(m, gfifo.r_stream, gated.gate)
        wiring.connect(m, rfifo.r_stream, res.residual)
        wiring.connect(m, res.y, wiring.flipped(self.y))
        return m

    # ---- what it computes ----------------------------------------------------------------

    def model(self, h, norm_weight, sub_norm_weight, gate_values, up_values, down_values,
              gate_scale: float, up_scale: float, down_scale: float) -> np.ndarray:
        """Bit-exact (level 2): fp16 codes ``h[M, hidden]`` -> fp16 codes ``y[M, hidden]``,
        the RTL's rounding sequence."""
        return nm.fp16_ffn(h, norm_weight, sub_norm_weight, gate_values, up_values, down_values,
                           (gate_scale, up_scale, down_scale), activation=self.activation,
                           eps=self.eps, lanes=self.cfg.columns_per_cycle)

    # ---- how long it takes ---------------------------------------------------------------

    def memory_blocks(self, board=None) -> dict[str, float]:
        """The children's (the weight feed on ``board``, the norms and quantizers, the
        element-wise units) and the gate and residual FIFOs (``SyncFIFOBuffered``: depth - 1
        words in memory)."""
        C = self.cfg.columns_per_cycle
        return sum_memory(
            self.datapath.memory_blocks(board), self.norm.memory_blocks(),
            self.quant.memory_blocks(), self.sub_norm.memory_blocks(),
            self.sub_quant.memory_blocks(), self.dequant.memory_blocks(),
            self.gated.memory_blocks(), self.residual.memory_blocks(),
            memory_blocks(16 * C, self.gate_fifo.depth - 1),
            memory_blocks(16 * C, self.residual_fifo.depth - 1))

    def expected_cycles(self, job: FfnJob) -> int:
        """Cycles from the first input beat taken (``h``, ``cmd``, ``tiles`` together) to the
        last ``y`` beat, inclusive, when no stream stalls.

        Per row ``r`` the engine runs three rows, gate, up and down, on the weight feed
        (``WeightFedTlmm.timing``), each started no earlier than:

        * gate: the row's last normalized beat (``RmsNorm.expected_cycles(hidden, r + 1) - 1``)
          plus the quantizer's latency to its first activation beat
          (``bitlinear.quantizer_latency``), and the cycle after the previous row's last down
          result (the engine takes gate/up activations only once the down results are out);
        * up: nothing (the same quantized row, replayed);
        * down: the cycle after the last up result, and the sub-norm path: an up result
          offered on ``t`` leaves the dequantizer on ``t + Dequantizer.latency`` and the gated
          activation ``GatedActivation.latency`` later into the sub-norm, whose last
          normalized beat follows its last input as in ``RmsNorm.expected_cycles(ffn, 1)``,
          then the sub-quantizer's latency.

        ``y``: a down result's beat leaves the dequantizer and the residual add
        ``Dequantizer.latency + ResidualAdd.latency`` after the engine offers it. Exact for at
        most ``min(2, residual_rows)`` rows (more would stall the residual FIFO or a
        quantizer bank, which the children's stall-free models do not describe; refused).
        """
        if not isinstance(job, FfnJob):
            raise TypeError(f"job must be an FfnJob, not {job!r}")
        positive_int("rows", job.rows)
        most = min(2, self.residual_rows)
        if job.rows > most:
            raise ValueError(f"the cycle model times at most {most} rows, not {job.rows}")
        up_front = quantizer_latency(self.quant)
        down_front = quantizer_latency(self.sub_quant)
        for name, groups, latency in (("gate/up", self.n_groups[GATE], up_front),
                                      ("down", self.n_groups[DOWN], down_front)):
            check_quantizer_keeps_up(self.cfg, name, groups, latency)
        norm_last = norm_last_beats(self.norm, self.hidden, job.rows)
        # The sub-norm's last output after its last input (one row at a time: a row's up
        # results come long after the previous row's sub-norm is done).
        sub_norm = self.sub_norm.expected_cycles(RmsNormJob(n=self.ffn, rows=1)) - self.ffn_beats
        to_sub_norm = self.dequant.latency + self.gated.latency

        def first_act(row: int, done: list) -> int:
            r, phase = divmod(row, 3)
            if phase == GATE:
                start = norm_last[r] + up_front
                return max(start, done[row - 1][-1] + 1) if r else start
            if phase == UP:
                return 0
            last_up = done[row - 1][-1]
            return max(last_up + 1, last_up + to_sub_norm + sub_norm + down_front)

        shapes = {GATE: (self.k_blocks[GATE], self.n_groups[GATE]),
                  UP: (self.k_blocks[GATE], self.n_groups[GATE]),
                  DOWN: (self.k_blocks[DOWN], self.n_groups[DOWN])}
        rows = [shapes[phase] for _ in range(job.rows) for phase in (GATE, UP, DOWN)]
        results = self.datapath.timing(job.reads, job.tiles, job.ddr, rows, first_act)
        return results[-1][-1] + self.dequant.latency + self.residual.latency + 1
