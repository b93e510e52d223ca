"""The gated activation of the FFN: ``act(gate) * up`` per lane (``GatedActivation``),
bit-exact with ``models/fp16.py``.

Stream protocol and latency convention: ``lanes.py``. Each pipeline stage holds one of the
combinational units of ``fp16.py`` (an fp16 multiply or add: a DSP48E2 product plus its
normalize-and-round); docs/lane_units.md gives the timing.
"""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

# The gated activations of the model family, squared ReLU (bitnet-b1.58-2B-4T) and SiLU
# (bitnet_b1_58): the configuration validates against the same tuple.
from trilut.config import ACTIVATIONS
from trilut.hdl.elementwise.fp16 import Fp16Add, Fp16Mul, leading_zeros
from trilut.config import memory_blocks, no_memory
from trilut.hdl.elementwise.lanes import (FixedLatency, Pipeline, check_lanes, join, lane_layout,
                                          lane_signature)
from trilut.models import fp16 as fp
from trilut.models.checks import one_of

__all__ = ["GatedActivation", "ACTIVATIONS"]

_MANT = fp.FP16.mantissa_bits                   # 10
_BIAS = fp.FP16.bias                            # 15
_FP16_ONE = int(fp.fp16_from_float(1.0))
_FP16_HALF = int(fp.fp16_from_float(0.5))
_FP16_QUARTER = int(fp.fp16_from_float(0.25))


class GatedActivation(FixedLatency, wiring.Component):
    """``y = round(act(gate) * up)`` per lane: ``fp16_gate_mul(fp16_relu2(gate), up)`` or
    ``fp16_gate_mul(fp16_silu(gate), up)``, the models' exact rounding sequence.

    * ``gate``, ``up`` in: ``lanes`` fp16 codes per beat; beat ``i`` of ``gate`` pairs with
      beat ``i`` of ``up`` (the gate and up projections of the same columns).
    * ``y`` out: ``lanes`` fp16 codes per beat, one per input pair.

    ``relu2`` (``latency`` 2): ``round(r * r)`` with ``r = gate`` if ``gate > 0`` else +0 |
    the gate multiply. 2 DSP48E2 a lane.

    ``silu`` (``latency`` 5): the sigmoid table read (sign, binade, top 5 mantissa bits of
    ``gate``: 512 x (a, b) fp16, one RAMB18 a lane) and the segment offset ``t`` (the
    mantissa bits below the segment index, exact, a 5-bit normalize) | ``round(a t)`` |
    ``u = round(a t + b)`` | ``round(gate * u * 2**-k)`` | the gate multiply. The SiLU multiply
    is one ``Fp16Mul`` followed by an exponent decrement of ``k``: where ``k > 0``,
    ``1/16 <= |gate| < 16`` and ``0.53 <= u <= 2804``, so ``gate * u`` (at most 22,432) stays
    in the normal range; rounding before the ``2**-k`` scale then equals rounding after it,
    and the flush is decided on the decremented exponent (the tests check all
    65,536 gate codes). 3 DSP48E2 a lane.
    """

    def __init__(self, *, lanes: int, activation: str):
        check_lanes(lanes)
        one_of("activation", activation, ACTIVATIONS)
        self.lanes = lanes
        self.activation = activation
        super().__init__({
            "gate": In(lane_signature(lanes)),
            "up": In(lane_signature(lanes)),
            "y": Out(lane_signature(lanes)),
        })

    @property
    def latency(self) -> int:
        return 2 if self.activation == "relu2" else 5

    def memory_blocks(self) -> dict[str, float]:
        """relu2: none. silu: the sigmoid table, 512 x (a, b) fp16 a lane, one RAMB18 each
        (docs/lane_units.md: 8 BRAM36 at 16 lanes)."""
        if self.activation == "relu2":
            return no_memory()
        return memory_blocks(32, 512, count=self.lanes)

    def elaborate(self, platform):
        m = Module()
        L = self.lanes
        joined = Signal()
        pipe = Pipeline(m, self.latency, in_valid=joined, out_ready=self.y.ready,
                         name=self.activation)
        join(m, self.gate, self.up, ready=pipe.in_ready, valid=joined)
        if self.activation == "relu2":
            act, up = self._relu2(m, pipe)
        else:
            act, up = self._silu(m, pipe)

        # ---- last stage: the gate multiply -----------------------------------------------
        out = Signal(lane_layout(L))
        for c in range(L):
            m.submodules[f"gate_mul{c}"] = mul = Fp16Mul()
            m.d.comb += [mul.a.eq(act[c]), mul.b.eq(up[c])]
            with m.If(pipe.take[-1]):
                m.d.sync += out[c].eq(mul.y)
        m.d.comb += [self.y.valid.eq(pipe.out_valid), self.y.payload.eq(out)]
        return m

    def _relu2(self, m, pipe):
        L = self.lanes
        act = [Signal(16, name=f"s1_act{c}") for c in range(L)]
        up = Signal(lane_layout(L), name="s1_up")
        with m.If(pipe.take[0]):
            m.d.sync += up.eq(self.up.payload)
        for c in range(L):
            g = self.gate.payload[c]
            positive = ~g[15] & (g[_MANT:15] != 0)        # a subnormal reads as zero
            r = Mux(positive, g, 0)
            m.submodules[f"square{c}"] = square = Fp16Mul()
            m.d.comb += [square.a.eq(r), square.b.eq(r)]
            with m.If(pipe.take[0]):
                m.d.sync += act[c].eq(square.y)
        return act, up

    def _silu(self, m, pipe):
        L = self.lanes
        a_tab, b_tab, shift_tab = fp.FP16_ARITH.silu_coefficients
        # ROM word: a in the low 16 bits, b in the high; index (negative, binade, segment).
        words = (fp.FP16.encode(a_tab).astype(np.int64)
                 | fp.FP16.encode(b_tab).astype(np.int64) << 16).reshape(-1)
        binades = a_tab.shape[1]
        seg_bits = fp.SILU_SEGMENT_BITS
        low_exp = fp.SILU_LOW_EXPONENT + _BIAS             # biased exponent of the first binade
        high_exp = fp.SILU_HIGH_EXPONENT + _BIAS
        index_width = 1 + (binades - 1).bit_length() + seg_bits
        assert len(words) == 1 << index_width

        # ---- stage 1: classify, table read, offset t --------------------------------------
        x1 = Signal(lane_layout(L), name="s1_x")
        up1 = Signal(lane_layout(L), name="s1_up")
        with m.If(pipe.take[0]):
            m.d.sync += [x1.eq(self.gate.payload), up1.eq(self.up.payload)]
        low1 = [Signal(name=f"s1_low{c}") for c in range(L)]
        high1 = [Signal(name=f"s1_high{c}") for c in range(L)]
        t1 = [Signal(16, name=f"s1_t{c}") for c in range(L)]
        k1 = [Signal(5, name=f"s1_shift{c}") for c in range(L)]
        rom_data = []
        for c in range(L):
            # One table per lane: a RAMB18 each. (Two lanes could share one through its two
            # ports; yosys maps a two-port ROM to LUTs, Vivado to one RAMB18.)
            m.submodules[f"sigmoid_table{c}"] = rom = Memory(
                shape=unsigned(32), depth=len(words), init=words.tolist())
            port = rom.read_port(domain="sync")
            g = self.gate.payload[c]
            exp, mant, neg = g[_MANT:15], g[:_MANT], g[15]
            binade = (exp - low_exp)[:binades.bit_length() - 1]
            segment = mant[_MANT - seg_bits:]
            low = exp < low_exp
            high = exp >= high_exp
            m.d.comb += [port.addr.eq(Cat(segment, binade, neg)), port.en.eq(pipe.take[0])]
            rom_data.append(port.data)

            # t = |x| - m0 = (mant mod 32) * 2**(e - 10): its leading one at bit j of the low
            # bits gives biased exponent exp - 10 + j (>= 1 inside the table's range).
            low_bits = mant[:_MANT - seg_bits]
            lz = leading_zeros(m, low_bits, f"offset_zeros{c}")
            offset = Signal(16, name=f"offset{c}")
            with m.If(low_bits != 0):
                normalized = (low_bits << lz)[:len(low_bits)]    # leading one at bit 4
                t_exp = exp - _MANT + (len(low_bits) - 1) - lz
                m.d.comb += offset.eq(Cat(Const(0, _MANT + 1 - len(low_bits)), normalized[:-1],
                                          t_exp[:5], Const(0, 1)))
            # |x| below 2**-4: t = |x| (a subnormal is flushed by the multiply that reads it).
            t = Mux(low, g[:15], Mux(high, 0, offset))
            shift = Signal(5, name=f"shift{c}")
            with m.Switch(Cat(binade, neg)):
                for key in range(2 * binades):
                    with m.Case(key):
                        m.d.comb += shift.eq(int(shift_tab[key // binades, key % binades]))
            with m.If(pipe.take[0]):
                m.d.sync += [low1[c].eq(low), high1[c].eq(high), t1[c].eq(t),
                             k1[c].eq(Mux(low | high, 0, shift))]

        # ---- stage 2: a * t ------------------------------------------------------------
        x2, up2 = Signal(lane_layout(L), name="s2_x"), Signal(lane_layout(L), name="s2_up")
        at2 = [Signal(16, name=f"s2_at{c}") for c in range(L)]
        b2 = [Signal(16, name=f"s2_b{c}") for c in range(L)]
        k2 = [Signal(5, name=f"s2_shift{c}") for c in range(L)]
        with m.If(pipe.take[1]):
            m.d.sync += [x2.eq(x1), up2.eq(up1)]
        for c in range(L):
            x = x1[c]
            negative = x[15] & (x[_MANT:15] != 0)          # x < 0 (a subnormal reads as -0)
            a = Mux(low1[c], Mux(negative, _FP16_QUARTER | 0x8000, _FP16_QUARTER),
                    Mux(high1[c], 0, rom_data[c][:16]))
            b = Mux(low1[c], _FP16_HALF,
                    Mux(high1[c], Mux(x[15], 0, _FP16_ONE), rom_data[c][16:]))
            m.submodules[f"slope_mul{c}"] = mul = Fp16Mul()
            m.d.comb += [mul.a.eq(a), mul.b.eq(t1[c])]
            with m.If(pipe.take[1]):
                m.d.sync += [at2[c].eq(mul.y), b2[c].eq(b), k2[c].eq(k1[c])]

        # ---- stage 3: u = a * t + b ------------------------------------------------------
        x3, up3 = Signal(lane_layout(L), name="s3_x"), Signal(lane_layout(L), name="s3_up")
        u3 = [Signal(16, name=f"s3_u{c}") for c in range(L)]
        k3 = [Signal(5, name=f"s3_shift{c}") for c in range(L)]
        with m.If(pipe.take[2]):
            m.d.sync += [x3.eq(x2), up3.eq(up2)]
        for c in range(L):
            m.submodules[f"intercept_add{c}"] = add = Fp16Add()
            m.d.comb += [add.a.eq(at2[c]), add.b.eq(b2[c])]
            with m.If(pipe.take[2]):
                m.d.sync += [u3[c].eq(add.y), k3[c].eq(k2[c])]

        # ---- stage 4: silu = round(x * u) * 2**-k ----------------------------------------
        act4 = [Signal(16, name=f"s4_act{c}") for c in range(L)]
        up4 = Signal(lane_layout(L), name="s4_up")
        with m.If(pipe.take[3]):
            m.d.sync += up4.eq(up3)
        for c in range(L):
            m.submodules[f"silu_mul{c}"] = mul = Fp16Mul()
            m.d.comb += [mul.a.eq(x3[c]), mul.b.eq(u3[c])]
            p = mul.y
            exponent = Signal(signed(7), name=f"silu_exp{c}")
            m.d.comb += exponent.eq(p[_MANT:15] - k3[c])
            with m.If(pipe.take[3]):
                m.d.sync += act4[c].eq(Mux(exponent < 1, Cat(Const(0, 15), p[15]),
                                           Cat(p[:_MANT], exponent[:5], p[15])))
        return act4, up4

    def model(self, gate, up) -> np.ndarray:
        act = fp.fp16_relu2(gate) if self.activation == "relu2" else fp.fp16_silu(gate)
        return fp.fp16_gate_mul(act, up)
