"""The Q/K/V projection block of a decoder layer's attention half, weights fed from DDR
through one engine.

    h -> RmsNorm(input_layernorm) -> ActQuantizer ──acts──> WeightFedTlmm (DDR -> AXI ->
                                     │ absmax (x3)           buffer -> engine)
                                     v                           │ results: q | k | v
                                 Dequantizer (q_scale, k_scale, v_scale by phase) <──┘
                                     │
                                     └──> y: q (q_out values), k (kv_out), v (kv_out) per row

One quantization of each normalized row serves the three projections, as in the FFN block's
gate and up (``hdl.decoder.ffn_block``). The three share K = hidden, so the engine runs them
as ONE engine row of ``N = q_out + 2 kv_out`` columns over the rows of q, k and v stacked:
the quantized row is replayed ``EngineConfig.output_tiles(N)`` times, and the engine's shape
inputs never change. That is the same engine work as three rows (no tile straddles two
matrices: ``q_out`` and ``kv_out`` are whole tiles, ``C * accumulator_depth`` columns,
checked at construction), without the empty-engine switch the FFN's down needs.

Sequencing (two counters): ``res_phase`` (q, k, v) counts the engine's result beats and sets
the dequantizer's ``n_groups`` for the segment it is taking; ``abs_phase`` offers the
quantizer's absmax three times, with the q, k, then v weight scale (``DequantScale`` reads
``weight_scale`` only on the edge that takes ``absmax``), and takes it on the third. The
dequantized beats go to ``y`` in engine order, which is q, k, v.

The host streams the three layers' weight schedules (``weight_schedule`` per layer,
concatenated q, k, v per row) on ``cmd`` / ``tiles``.

How long it takes: :meth:`QkvBlock.expected_cycles`, exact when no stream stalls, composed as
``BitLinear``'s from the children's models (see the method).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from trilut.config import DatapathConfig, DdrSimConfig, EngineConfig, sum_memory
from trilut.hdl.linear.sequencing import norm_quant_matmul_cycles
from trilut.hdl.elementwise.act_quant import ActQuantizer
from trilut.hdl.elementwise.dequant import DequantScale, Dequantizer
from trilut.hdl.elementwise.lanes import lane_layout
from trilut.hdl.elementwise.rmsnorm import RmsNorm
from trilut.hdl.linear.bitlinear import quantizer_latency
from trilut.hdl.linear.weight_fed_tlmm import WeightFedTlmm
from trilut.models import numerics as nm
from trilut.models.checks import positive_int

__all__ = ["QkvBlock", "QkvJob"]

Q, K, V = 0, 1, 2


@dataclass(frozen=True)
class QkvJob:
    """One stall-free run of :class:`QkvBlock` (whose shapes are fixed at construction):
    ``rows`` residual rows, the read and tile commands of the weight schedules (q, k, v per
    row, in the order the host sends them) and the simulated DDR."""
    rows: int
    reads: tuple[tuple[int, int], ...]
    tiles: tuple[tuple[int, int], ...]
    ddr: DdrSimConfig


class QkvBlock(wiring.Component):
    """``q, k, v = q_proj(x), k_proj(x), v_proj(x)`` with ``x = norm(h)``, per row of
    ``hidden`` fp16 values.

    Streams: ``h`` (the residual rows, ``hidden / C`` beats each), ``norm_weight`` (the input
    norm's weights, one row per ``h`` row), ``y`` (per row ``q_out / C`` beats of q, then
    ``kv_out / C`` of k, then ``kv_out / C`` of v); ``cmd`` / ``tiles`` (the weight schedule of
    q, k, v per row); ``axi`` to DDR. Scalar inputs (held): ``q_scale``, ``k_scale``,
    ``v_scale`` (fp32 codes). The shapes are fixed at construction; the DDR word width, tile
    depth, bursts in flight and the norm's epsilon come from the ``DatapathConfig``.
    """

    def __init__(self, engine: EngineConfig, *, hidden: int, q_out: int, kv_out: int,
                 datapath: DatapathConfig):
        self.datapath = WeightFedTlmm(engine, datapath)     # checks both configurations
        cfg = engine
        C = cfg.columns_per_cycle
        if datapath.lanes != C:
            raise ValueError(f"datapath.lanes ({datapath.lanes}) must equal the engine's "
                             f"columns_per_cycle ({C})")
        for name, n in (("hidden", hidden), ("q_out", q_out), ("kv_out", kv_out)):
            positive_int(name, n)
            if n % C:
                raise ValueError(f"{name} = {n} must be a multiple of C = {C}")
        tile = C * cfg.accumulator_depth
        for name, n in (("q_out", q_out), ("kv_out", kv_out)):
            if n % tile:
                raise ValueError(f"{name} = {n} must be whole engine tiles of C * "
                                 f"accumulator_depth = {tile} columns (one engine row serves "
                                 "q, k and v)")
        self.n = q_out + 2 * kv_out
        cfg.check_shape(hidden, self.n)
        if cfg.padded_n(self.n) != self.n:
            raise ValueError(f"q_out + 2 kv_out = {self.n} must be unpadded")
        self.cfg, self.hidden, self.q_out, self.kv_out = cfg, hidden, q_out, kv_out
        self.eps = datapath.norm_eps
        self.hidden_beats = hidden // C
        self.norm = RmsNorm(lanes=C, max_n=hidden, eps=self.eps)
        self.quant = ActQuantizer(cfg, lanes=C, max_n=hidden)
        self.dequant = Dequantizer(cfg)
        self.k_blocks = cfg.padded_k(hidden) // cfg.block_k
        self.n_groups = {Q: q_out // C, K: kv_out // C, V: kv_out // C}
        self.quant_tiles = cfg.output_tiles(self.n)
        dp = self.datapath
        lanes = stream.Signature(lane_layout(C))
        super().__init__({
            "h": In(lanes),
            "norm_weight": In(lanes),
            "y": Out(lanes),
            "axi": Out(dp.axi.signature),
            "cmd": In(dp.cmd.signature.flip()),
            "tiles": In(dp.tiles.signature.flip()),
            "q_scale": In(unsigned(32)),
            "k_scale": In(unsigned(32)),
            "v_scale": In(unsigned(32)),
            "error": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        for name in ("norm", "quant", "datapath", "dequant"):
            m.submodules[name] = getattr(self, name)
        norm, quant, dp, deq = self.norm, self.quant, self.datapath, self.dequant
        m.d.comb += [norm.n.eq(self.hidden), quant.n.eq(self.hidden),
                     quant.tiles.eq(self.quant_tiles),
                     dp.k_blocks.eq(self.k_blocks),
                     dp.n_groups.eq(self.n // self.cfg.columns_per_cycle),
                     self.error.eq(dp.error)]
        wiring.connect(m, wiring.flipped(self.h), norm.x)
        wiring.connect(m, wiring.flipped(self.norm_weight), norm.weight)
        wiring.connect(m, norm.y, quant.x)
        wiring.connect(m, quant.acts, dp.acts)
        wiring.connect(m, wiring.flipped(self.axi), dp.axi)
        wiring.connect(m, wiring.flipped(self.cmd), dp.cmd)
        wiring.connect(m, wiring.flipped(self.tiles), dp.tiles)

        # ---- res_phase: which matrix's segment the dequantizer is taking ------------------
        res_phase = Signal(range(3))
        res_count = Signal(range(max(self.n_groups.values())))
        res_groups = Mux(res_phase == Q, self.n_groups[Q], self.n_groups[K])
        m.d.comb += deq.n_groups.eq(res_groups)
        wiring.connect(m, dp.results, deq.acc)
        with m.If(dp.results.valid & dp.results.ready):
            with m.If(res_count == res_groups - 1):
                m.d.sync += [res_count.eq(0),
                             res_phase.eq(Mux(res_phase == V, Q, res_phase + 1))]
            with m.Else():
                m.d.sync += res_count.eq(res_count + 1)

        # ---- abs_phase: the row's absmax, offered once per matrix --------------------------
        abs_phase = Signal(range(3))
        m.d.comb += [
            deq.absmax.payload.eq(quant.absmax.payload),
            deq.absmax.valid.eq(quant.absmax.valid),
            quant.absmax.ready.eq((abs_phase == V) & deq.absmax.ready),
            deq.weight_scale.eq(Mux(abs_phase == Q, self.q_scale,
                                    Mux(abs_phase == K, self.k_scale, self.v_scale))),
        ]
        with m.If(deq.absmax.valid & deq.absmax.ready):
            m.d.sync += abs_phase.eq(Mux(abs_phase == V, Q, abs_phase + 1))

        wiring.connect(m, deq.y, wiring.flipped(self.y))
        return m

    # ---- what it computes ----------------------------------------------------------------

    def model(self, h, norm_weight, q_values, k_values, v_values, q_scale: float,
              k_scale: float, v_scale: float) -> np.ndarray:
        """Bit-exact (level 2): fp16 codes ``h[M, hidden]`` -> fp16 codes
        ``[M, q_out + 2 kv_out]``, each row q | k | v as ``y`` carries it."""
        q, k, v = nm.fp16_qkv(h, norm_weight, q_values, k_values, v_values,
                              (q_scale, k_scale, v_scale), eps=self.eps,
                              lanes=self.cfg.columns_per_cycle)
        return np.concatenate([q, k, v], axis=1)

    # ---- what it costs, how long it takes ------------------------------------------------

    #: Rows the cycle model times (as ``BitLinear``'s: a third row would wait for a
    #: quantizer bank and backpressure the norm).
    MAX_TIMED_ROWS = 2

    def memory_blocks(self, board=None) -> dict[str, float]:
        """The children's: the weight feed (on ``board``), the norm, the quantizer and the
        dequantizer."""
        return sum_memory(self.datapath.memory_blocks(board), self.norm.memory_blocks(),
                          self.quant.memory_blocks(), self.dequant.memory_blocks())

    def expected_cycles(self, job: QkvJob) -> int:
        """Cycles from the first input beat taken (``h``, ``cmd``, ``tiles`` together) to the
        last ``y`` beat, inclusive, when no stream stalls.

        As ``BitLinear.expected_cycles`` with the one engine row of ``q_out + 2 kv_out``
        columns: row ``r``'s last normalized beat reaches the quantizer on
        ``RmsNorm.expected_cycles(hidden, r + 1) - 1``, its first activation beat is offered
        ``bitlinear.quantizer_latency`` later, the engine starts the row no earlier
        (``WeightFedTlmm.timing``), and each result beat leaves the dequantizer
        ``Dequantizer.latency`` after the engine offers it. The three per-row scales never
        wait: each segment (q, k, v) has at least ``DequantScale.interval`` column groups
        (checked), so the next scale is computed while the current segment streams. Exact
        for at most ``MAX_TIMED_ROWS`` rows and tiles the quantizer keeps up with (refused
        otherwise).
        """
        if not isinstance(job, QkvJob):
            raise TypeError(f"job must be a QkvJob, not {job!r}")
        positive_int("rows", job.rows)
        if job.rows > self.MAX_TIMED_ROWS:
            raise ValueError(f"the cycle model times at most {self.MAX_TIMED_ROWS} rows, "
                             f"not {job.rows}")
        if min(self.n_groups.values()) < DequantScale.interval:
            raise ValueError(f"a segment of {min(self.n_groups.values())} column groups is "
                             f"shorter than the dequantizer's {DequantScale.interval}-cycle "
                             "scale interval: the cycle model is exact only without that wait")
        groups = self.n // self.cfg.columns_per_cycle
        return norm_quant_matmul_cycles(self, "q/k/v", self.hidden, (self.k_blocks, groups),
                                        job, quantizer_latency(self.quant))
