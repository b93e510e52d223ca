"""The per-beat part of the scores' dot product (``Fp32DotTree``), bit-exact with
``models.attention.fp32_dot`` on one beat.

Pipelining convention (``latency``, ``en``, registered ``y``): ``hdl/attention/fp32.py``.
"""

import numpy as np
from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from trilut.config import no_memory
from trilut.hdl.attention.fp32 import Fp16ToFp32Product, Fp32Add, enable_port
from trilut.hdl.elementwise.lanes import FixedLatency, lane_layout
from trilut.models.checks import power_of_two
from trilut.models import attention as att
from trilut.models import fp16 as fp

__all__ = ["Fp32DotTree"]

#: The widest beat (``lanes.check_lanes``'s limit).
MAX_LANES = 256


def _check_lanes(lanes) -> None:
    power_of_two("lanes", lanes, 1, MAX_LANES)


class Fp32DotTree(FixedLatency, wiring.Component):
    """``y``: the fp32 sum of ``a[i] * b[i]`` over one beat of ``lanes`` fp16 pairs, in
    ``fp32_dot``'s order: the exact products (``Fp16ToFp32Product``) added pairwise, level by
    level (``(0+1), (2+3), ...``), each add rounded (``Fp32Add``). The attention unit adds
    the beats of a row in order (``acc = round32(acc + y)``) with one more ``Fp32Add``.

    * ``a``, ``b`` in: ``lane_layout(lanes)`` (fp16 codes, lane 0 lowest), e.g. ``q`` and
      ``k``;
    * ``y`` out: an fp32 code.

    ``latency`` = 2 + 5 log2(lanes) (the product, then one adder per level), one beat per
    cycle: ``lanes`` DSP48E2s and ``lanes - 1`` adders. ``en`` holds the stages' enables in
    pipeline order: the products' two, then each level's five.
    """

    def __init__(self, *, lanes: int):
        _check_lanes(lanes)
        self.lanes = lanes
        self.levels = lanes.bit_length() - 1
        self.latency = Fp16ToFp32Product.latency + self.levels * Fp32Add.latency
        super().__init__({
            "a": In(lane_layout(lanes)),
            "b": In(lane_layout(lanes)),
            "en": enable_port(self.latency),
            "y": Out(32),
        })

    def elaborate(self, platform):
        m = Module()
        stage = Fp16ToFp32Product.latency
        level = []
        for i in range(self.lanes):
            m.submodules[f"product{i}"] = product = Fp16ToFp32Product()
            m.d.comb += [product.a.eq(self.a[i]), product.b.eq(self.b[i]),
                         product.en.eq(self.en[:stage])]
            level.append(product.y)
        for depth in range(self.levels):
            enable = self.en[stage:stage + Fp32Add.latency]
            stage += Fp32Add.latency
            sums = []
            for i in range(len(level) // 2):
                m.submodules[f"add{depth}_{i}"] = add = Fp32Add()
                m.d.comb += [add.a.eq(level[2 * i]), add.b.eq(level[2 * i + 1]),
                             add.en.eq(enable)]
                sums.append(add.y)
            level = sums
        m.d.comb += self.y.eq(level[0])
        return m

    def model(self, a, b) -> np.ndarray:
        """fp16 codes ``[..., lanes]`` -> fp32 codes ``[...]`` of ``fp32_dot`` over one beat."""
        a, b = np.asarray(a), np.asarray(b)
        if a.shape[-1:] != (self.lanes,) or b.shape != a.shape:
            raise ValueError(f"a and b must be [..., {self.lanes}], not {a.shape} and "
                             f"{b.shape}")
        return fp.FP32.encode(att.fp32_dot(fp.FP16.decode(a), fp.FP16.decode(b), self.lanes))

    def memory_blocks(self) -> dict[str, float]:
        """None: ``lanes`` DSP48E2 and the adders' stage registers."""
        return no_memory()
