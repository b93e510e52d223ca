"""A complete BitLinear layer in TeLLMe's streaming dataflow, weights fed from DDR.

    x (fp16 lanes) -> RmsNorm -> ActQuantizer -> [WeightFedTlmm: DDR -> AXI -> WeightBuffer
                                  |  absmax           -> TlmmEngine] -> Dequantizer -> y (fp16)
                                  +---------------------------------------^

The norm, the quantizer and the dequantizer work on the row while the engine works on the
matmul; their latency hides behind it when the matmul is long (it is, for every real shape).
Lanes: the element-wise stages move ``C`` fp16 values per beat, the engine's output width.

How long it takes: :meth:`BitLinear.expected_cycles` of a :class:`BitLinearJob`, exact when no
stream stalls, composed from the children's models: ``RmsNorm.expected_cycles`` gives when
each row's last normalized beat reaches the quantizer, ``ActQuantizer.expected_cycles`` of
one activation block the quantizer's latency from a row's last element to its first
activation beat, ``WeightFedTlmm.timing`` the engine's result beats with that first beat as
the row's start, and ``Dequantizer.latency`` the last step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from amaranth.hdl import Module, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from trilut.config import DatapathConfig, EngineConfig, sum_memory
from trilut.hdl.elementwise.dequant import Dequantizer
from trilut.hdl.linear.weight_fed_tlmm import WeightFedJob, WeightFedTlmm
from trilut.hdl.elementwise.act_quant import ActQuantizer, ActQuantJob
from trilut.hdl.elementwise.rmsnorm import RmsNorm
from trilut.hdl.linear.sequencing import norm_quant_matmul_cycles
from trilut.models import numerics as nm
from trilut.models.checks import positive_int

__all__ = ["BitLinear", "BitLinearJob", "quantizer_latency"]


def quantizer_latency(quant: ActQuantizer) -> int:
    """Cycles from a row's last element taken by ``quant`` to its first activation beat
    offered: ``ActQuantizer.expected_cycles`` of a one-block row, less that row's input
    beats (the path from the last element on does not depend on the row's length)."""
    block = quant.block
    one_block = ActQuantJob(n=block, rows=1, tiles=1)
    return quant.expected_cycles(one_block) - -(-block // quant.lanes)


@dataclass(frozen=True)
class BitLinearJob(WeightFedJob):
    """One stall-free run of :class:`BitLinear`: ``rows`` rows of ``k`` fp16 inputs through
    the norm to ``n`` outputs, the weight schedule's read and tile commands, the simulated
    DDR (the fields of :class:`WeightFedJob`)."""


class BitLinear(wiring.Component):
    """RMSNorm -> int8 quantization -> TLMM (weights from DDR) -> dequantization.

    Streams: ``x`` (a row of K fp16 values, C per beat), ``norm_weight`` (the norm's K weights,
    one row per input row), ``y`` (the N fp16 outputs, C per beat); ``cmd`` / ``tiles`` (the
    weight schedule, ``trilut.host.schedule.weight_schedule``); ``axi`` to DDR.
    Shape and scalar inputs, held while a row is in flight: ``k`` (K), ``k_blocks``,
    ``n_groups``, ``tiles_per_row`` (output tiles, ``EngineConfig.output_tiles(N)``) and
    ``weight_scale`` (the layer's fp32 weight scale code). The DDR word width, tile depth,
    bursts in flight and the norm's epsilon come from the ``DatapathConfig``.
    """

    def __init__(self, cfg: EngineConfig, datapath: DatapathConfig, *, max_k: int):
        self.datapath = WeightFedTlmm(cfg, datapath)        # checks both configurations
        if datapath.lanes != cfg.columns_per_cycle:
            raise ValueError(f"datapath.lanes ({datapath.lanes}) must equal the engine's "
                             f"columns_per_cycle ({cfg.columns_per_cycle})")
        cfg.check_shape(max_k, 1)
        self.cfg = cfg
        lanes = cfg.columns_per_cycle
        self.norm = RmsNorm(lanes=lanes, max_n=max_k, eps=datapath.norm_eps)
        self.quant = ActQuantizer(cfg, lanes=lanes, max_n=max_k)
        self.dequant = Dequantizer(cfg)
        dp = self.datapath
        super().__init__({
            "x": In(self.norm.x.signature.flip()),
            "norm_weight": In(self.norm.weight.signature.flip()),
            "y": Out(self.dequant.y.signature),
            "axi": Out(dp.axi.signature),
            "cmd": In(dp.cmd.signature.flip()),
            "tiles": In(dp.tiles.signature.flip()),
            "k": In(len(self.norm.n)),
            "k_blocks": In(len(dp.k_blocks)),
            "n_groups": In(len(dp.n_groups)),
            "tiles_per_row": In(len(self.quant.tiles)),
            "weight_scale": In(unsigned(32)),
            "error": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.norm = norm = self.norm
        m.submodules.quant = quant = self.quant
        m.submodules.datapath = dp = self.datapath
        m.submodules.dequant = deq = self.dequant
        wiring.connect(m, wiring.flipped(self.x), norm.x)
        wiring.connect(m, wiring.flipped(self.norm_weight), norm.weight)
        wiring.connect(m, norm.y, quant.x)
        wiring.connect(m, quant.acts, dp.acts)
        wiring.connect(m, quant.absmax, deq.absmax)
        wiring.connect(m, dp.results, deq.acc)
        wiring.connect(m, deq.y, wiring.flipped(self.y))
        wiring.connect(m, wiring.flipped(self.axi), dp.axi)
        wiring.connect(m, wiring.flipped(self.cmd), dp.cmd)
        wiring.connect(m, wiring.flipped(self.tiles), dp.tiles)
        m.d.comb += [
            norm.n.eq(self.k), quant.n.eq(self.k), quant.tiles.eq(self.tiles_per_row),
            dp.k_blocks.eq(self.k_blocks), dp.n_groups.eq(self.n_groups),
            deq.n_groups.eq(self.n_groups), deq.weight_scale.eq(self.weight_scale),
            self.error.eq(dp.error),
        ]
        return m

    def model(self, x_codes, norm_weight_codes, values, weight_scale: float) -> np.ndarray:
        """Bit-exact: fp16 codes ``x[M, K]`` -> fp16 codes ``y[M, N]`` (level 2 numerics)."""
        return nm.fp16_bitlinear(x_codes, norm_weight_codes, values, weight_scale,
                                 eps=self.norm.eps, lanes=self.norm.lanes)

    # ---- how long it takes ---------------------------------------------------------------

    #: Rows the cycle model times: a third row would wait for a quantizer bank (the first
    #: row's activations are replayed until its matmul ends) and backpressure the norm,
    #: which the children's stall-free models do not describe.
    MAX_TIMED_ROWS = 2

    def act_latency(self) -> int:
        """Cycles from a row's last element taken by the quantizer to its first activation
        beat offered (:func:`quantizer_latency`)."""
        return quantizer_latency(self.quant)

    def memory_blocks(self, board=None) -> dict[str, float]:
        """The children's: the weight feed (on ``board``), the norm, the quantizer and the
        dequantizer."""
        return sum_memory(self.datapath.memory_blocks(board), self.norm.memory_blocks(),
                          self.quant.memory_blocks(), self.dequant.memory_blocks())

    def expected_cycles(self, job: BitLinearJob) -> int:
        """Cycles from the first input beat taken (``x``, ``cmd``, ``tiles`` together) to the
        last ``y`` beat, inclusive, when no stream stalls.

        Row ``r``'s last normalized beat reaches the quantizer on
        ``RmsNorm.expected_cycles(k, r + 1) - 1`` (the norm is never backpressured with at
        most two rows in flight), its first activation beat is offered :meth:`act_latency`
        later, the engine starts the row no earlier (``WeightFedTlmm.timing``), and each
        result beat leaves the dequantizer ``Dequantizer.latency`` cycles after the engine
        offers it (the row's scale is ready long before: it starts with the quantizer's
        second pass). Exact when every engine tile has at least :meth:`act_latency` column
        groups (the quantizer then always has the next activation beat ready in time;
        refused otherwise, as are more than ``MAX_TIMED_ROWS`` rows).
        """
        if not isinstance(job, BitLinearJob):
            raise TypeError(f"job must be a BitLinearJob, not {job!r}")
        positive_int("rows", job.rows)
        if job.rows > self.MAX_TIMED_ROWS:
            raise ValueError(f"the cycle model times at most {self.MAX_TIMED_ROWS} rows, "
                             f"not {job.rows}")
        if job.k > self.norm.max_n:
            raise ValueError(f"k = {job.k} exceeds this BitLinear's max_k ({self.norm.max_n})")
        return norm_quant_matmul_cycles(self, "BitLinear", job.k,
                                        self.datapath.shape(job.k, job.n), job,
                                        self.act_latency())
