"""The residual add: ``residual + update`` per lane (``ResidualAdd``), bit-exact with
``models/fp16.py``. Stream protocol and latency convention: ``lanes.py``.
"""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from trilut.hdl.elementwise.fp16 import Fp16Add
from trilut.config import no_memory
from trilut.hdl.elementwise.lanes import (FixedLatency, Pipeline, check_lanes, join, lane_layout,
                                          lane_signature)
from trilut.models import fp16 as fp

__all__ = ["ResidualAdd"]


class ResidualAdd(FixedLatency, wiring.Component):
    """``y = round(residual + update)`` per lane (``fp16_residual_add``).

    * ``residual``, ``update`` in: ``lanes`` fp16 codes per beat, paired beat by beat.
    * ``y`` out: ``lanes`` fp16 codes per beat.

    ``latency`` 1: one ``Fp16Add`` (align, add, normalize, round) per lane, no DSP.
    """

    def __init__(self, *, lanes: int):
        check_lanes(lanes)
        self.lanes = lanes
        super().__init__({
            "residual": In(lane_signature(lanes)),
            "update": In(lane_signature(lanes)),
            "y": Out(lane_signature(lanes)),
        })

    latency = 1

    def elaborate(self, platform):
        m = Module()
        L = self.lanes
        joined = Signal()
        pipe = Pipeline(m, self.latency, in_valid=joined, out_ready=self.y.ready, name="add")
        join(m, self.residual, self.update, ready=pipe.in_ready, valid=joined)
        out = Signal(lane_layout(L))
        for c in range(L):
            m.submodules[f"add{c}"] = add = Fp16Add()
            m.d.comb += [add.a.eq(self.residual.payload[c]), add.b.eq(self.update.payload[c])]
            with m.If(pipe.take[0]):
                m.d.sync += out[c].eq(add.y)
        m.d.comb += [self.y.valid.eq(pipe.out_valid), self.y.payload.eq(out)]
        return m

    def model(self, residual, update) -> np.ndarray:
        return fp.fp16_residual_add(residual, update)

    def memory_blocks(self) -> dict[str, float]:
        """None: one ``Fp16Add`` a lane (docs/lane_units.md: 0 BRAM)."""
        return no_memory()
