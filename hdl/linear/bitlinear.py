"""A complete BitLinear layer in TeLLMe's streaming dataflow, weights fed from DDR.

    x (fp16 lanes) -> RmsNorm -> ActQuantizer -> [WeightFedTlmm: DDR -> AXI -> WeightBuffer
                                  |  absmax           -> TlmmEngine] -> Dequantizer -> y (fp16)
                                  +---------------------------------------^

The norm, the quantizer and the dequantizer work on the row while the engine works on the
matmul; their latency hides behind it when the matmul is long (it is, for every real shape).
Lanes: the element-wise stages move ``C`` fp16 values per beat, the engine's output width.
"""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Module, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from trilut.config import DatapathConfig, EngineConfig
from trilut.hdl.elementwise.dequant import Dequantizer
from trilut.hdl.linear.weight_fed_tlmm import WeightFedTlmm
from trilut.hdl.elementwise.act_quant import ActQuantizer
from trilut.hdl.elementwise.rmsnorm import RmsNorm
from trilut.models import numerics as nm

__all__ = ["BitLinear"]


class BitLinear(wiring.Component):
    """RMSNorm -> int8 quantization -> TLMM (weights from DDR) -> dequantization.

    Streams: ``x`` (a row of K fp16 values, C per beat), ``norm_weight`` (the norm's K weights,
    one row per input row), ``y`` (the N fp16 outputs, C per beat); ``cmd`` / ``tiles`` (the
    weight schedule, ``trilut.host.schedule.weight_schedule``); ``axi`` to DDR.
    Shape and scalar inputs, held while a row is in flight: ``k`` (K), ``k_blocks``,
    ``n_groups``, ``tiles_per_row`` (output tiles, ``ActQuantizer.tiles_for(N)``) and
    ``weight_scale`` (the layer's fp32 weight scale code).
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
