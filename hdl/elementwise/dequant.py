"""Dequantization behind the TLMM engine: ``acc * S`` per lane, ``S = round32(A * w / 127)``
once per row (``DequantScale``, ``Dequantizer``), bit-exact with ``models/fp16.py``.

Stream protocol and latency convention: ``lanes.py``. Each pipeline stage holds one
combinational step (a DSP48E2 product, or a normalize-and-round); docs/lane_units.md gives
the timing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from trilut.config import EngineConfig, no_memory
from trilut.hdl.elementwise.fp16 import leading_zeros, pack
from trilut.hdl.elementwise.lanes import Pipeline, lane_layout, lane_signature
from trilut.hdl.linear.tlmm_engine import N_GROUPS_WIDTH
from trilut.models import fp16 as fp
from trilut.models.checks import positive_int

__all__ = ["DequantScale", "DequantScaleJob", "Dequantizer", "DequantJob"]

_MANT = fp.FP16.mantissa_bits                   # 10
_BIAS = fp.FP16.bias                            # 15
_F32_MANT = fp.FP32.mantissa_bits               # 23
_F32_BIAS = fp.FP32.bias                        # 127
_F32_EXP_MAX = 2 * _F32_BIAS                    # 254
_ACT_MAX = 127                                  # numerics.ACT_MAX: A / 127 is the act scale


@dataclass(frozen=True)
class DequantScaleJob:
    """``rows`` absmax beats offered to :class:`DequantScale` back to back, each scale taken
    at once."""

    rows: int

    def __post_init__(self):
        positive_int("rows", self.rows)


@dataclass(frozen=True)
class DequantJob:
    """``rows`` rows of ``n_groups`` accumulator beats through :class:`Dequantizer`, every
    ``absmax`` offered ahead, streams never stalling."""

    rows: int
    n_groups: int

    def __post_init__(self):
        positive_int("rows", self.rows)
        positive_int("n_groups", self.n_groups)


class DequantScale(wiring.Component):
    """The once-per-row scalar path: ``scale = round32(absmax * w / 127)``
    (``models.fp16.fp16_dequant_scale``), sequential.

    * ``absmax`` in: one fp16 code per row, the row's absmax ``A`` from the quantizer.
    * ``weight_scale``: the tensor's fp32 weight scale ``w`` as fp32 bits (a register; hold it
      while rows are in flight). A code with exponent 255 reads as the finite binade
      ``2**128 (1 + m)``, which the model rounds to the fp32 maximum, and so does this unit.
    * ``scale`` out: the row's fp32 scale code; a one-beat output register.

    How: the 11 x 24-bit significand product (exact, 35 bits; one DSP48E2) is divided by the
    constant 127 by restoring long division, ``DIVIDE_BITS`` quotient bits a cycle (two 8-bit
    compare-subtracts in a row), so the quotient and remainder are exact; then one
    round-to-nearest-even of the quotient, with the remainder in the sticky bit.

    Timing: ``absmax`` is taken in an idle cycle, on the edge that registers the product; the
    scale is in the output register ``latency`` = 16 edges later (15 division steps, then the
    rounding). It waits in the working registers while the output still holds the previous
    row's scale, so one scale is computed ahead (double buffering). The next ``absmax`` is
    taken the cycle after the result moved to the output: at most one row every
    ``interval`` = 17 cycles.
    """

    #: Quotient bits per division step.
    DIVIDE_BITS = 2
    #: ``A * w`` has 35 bits; its top 5 are below 127, so they seed the remainder.
    _PRODUCT_BITS = 35
    _SEED_BITS = 5
    _STEPS = (_PRODUCT_BITS - _SEED_BITS) // DIVIDE_BITS
    #: Edges from taking ``absmax`` to the scale being in the output register (the division
    #: steps and the rounding); it is offered right after.
    latency = 1 + _STEPS
    #: Fewest cycles between two ``absmax`` beats (the unit is busy in between).
    interval = latency + 1

    def __init__(self):
        super().__init__({
            "absmax": In(stream.Signature(unsigned(16))),
            "weight_scale": In(unsigned(32)),
            "scale": Out(stream.Signature(unsigned(32))),
        })

    def elaborate(self, platform):
        m = Module()
        a, w = self.absmax.payload, self.weight_scale
        dividend_bits = self._PRODUCT_BITS - self._SEED_BITS          # 30

        # The weight scale as the model reads it: exponent 0 is zero, exponent 255 saturates.
        w_exp = w[_F32_MANT:31]
        w_inf = w_exp == 0xFF
        w_sig = Mux(w_inf, (1 << 24) - 1, Cat(w[:_F32_MANT], 1))
        w_exp_eff = Mux(w_inf, _F32_EXP_MAX, w_exp)
        a_exp = a[_MANT:15]
        product = Signal(self._PRODUCT_BITS)
        m.d.comb += product.eq(Cat(a[:_MANT], 1) * w_sig)             # in [2**33, 2**35)

        dividend = Signal(dividend_bits)
        remainder = Signal(7)                                          # always < 127
        quotient = Signal(dividend_bits)                               # floor(A*w / 127) < 2**29
        exp_sum = Signal(9)
        sign = Signal()
        zero = Signal()
        step = Signal(range(self._STEPS))

        out_valid = Signal()
        out_payload = Signal(32)
        m.d.comb += [self.scale.valid.eq(out_valid), self.scale.payload.eq(out_payload)]
        out_free = ~out_valid | self.scale.ready
        with m.If(self.scale.ready):
            m.d.sync += out_valid.eq(0)

        # One restoring-division step per quotient bit: shift in a dividend bit, subtract 127
        # if it fits. The remainder stays below 127, so 8 bits hold every partial remainder.
        partial = remainder
        bits = []
        for i in range(self.DIVIDE_BITS):
            shifted = Cat(dividend[dividend_bits - 1 - i], partial)   # 8 bits
            fits = shifted >= _ACT_MAX
            bits.append(fits)
            partial = Mux(fits, shifted - _ACT_MAX, shifted)[:7]

        with m.FSM(name="scale_fsm"):
            with m.State("IDLE"):
                m.d.comb += self.absmax.ready.eq(1)
                with m.If(self.absmax.valid):
                    m.d.sync += [
                        dividend.eq(product[:dividend_bits]),
                        remainder.eq(product[dividend_bits:]),
                        quotient.eq(0),
                        exp_sum.eq(a_exp + w_exp_eff),
                        sign.eq(a[15] ^ w[31]),
                        zero.eq((a_exp == 0) | (w_exp == 0)),
                        step.eq(0),
                    ]
                    m.next = "DIVIDE"
            with m.State("DIVIDE"):
                m.d.sync += [
                    dividend.eq(dividend << self.DIVIDE_BITS),
                    remainder.eq(partial),
                    quotient.eq(Cat(*reversed(bits), quotient)),
                    step.eq(step + 1),
                ]
                with m.If(step == self._STEPS - 1):
                    m.next = "ROUND"
            with m.State("ROUND"):
                with m.If(out_free):
                    m.d.sync += [out_valid.eq(1),
                                 out_payload.eq(self._round(m, quotient, remainder, exp_sum,
                                                            sign, zero))]
                    m.next = "IDLE"
        return m

    @staticmethod
    def _round(m: Module, quotient, remainder, exp_sum, sign, zero) -> Signal:
        """fp32 code of ``quotient + remainder/127`` times ``2**(exp_sum - 175)``.

        ``A * w / 127 = (P / 127) * 2**(eA - 25 + ew - 150)`` and ``P / 127`` lies in
        ``[2**26, 2**28.02)``: its leading one is bit 26, 27 or 28 of the quotient.
        """
        code = Signal(32, name="scale_code")
        kept, guard, sticky = Signal(24), Signal(), Signal()
        lead = Signal(range(29))
        for position in (26, 27, 28):       # later wins: the highest set bit
            with m.If(quotient[position]):
                m.d.comb += [lead.eq(position),
                             kept.eq(quotient[position - 23:position + 1]),
                             guard.eq(quotient[position - 24]),
                             sticky.eq(quotient[:position - 24].any() | (remainder != 0))]
        rounded = Signal(25)
        m.d.comb += rounded.eq(kept + (guard & (sticky | kept[0])))
        exponent = Signal(signed(11))
        m.d.comb += exponent.eq(exp_sum + lead - 48 + rounded[24])
        with m.If(zero | (exponent < 1)):
            m.d.comb += code.eq(Cat(Const(0, 31), sign))
        with m.Elif(exponent > _F32_EXP_MAX):
            m.d.comb += code.eq(Cat(Const(fp.FP32.max_code, 31), sign))
        with m.Else():
            m.d.comb += code.eq(Cat(rounded[:_F32_MANT], exponent[:8], sign))
        return code

    def model(self, absmax, weight_scale) -> np.ndarray:
        """fp16 ``absmax`` codes, fp32 ``weight_scale`` code -> fp32 scale codes."""
        return fp.fp16_dequant_scale(absmax, fp.fp32_to_float(np.uint32(weight_scale)))

    def expected_cycles(self, job: DequantScaleJob) -> int:
        """Cycles from the first ``absmax`` taken to the last ``scale`` out, inclusive: one
        row every ``interval`` cycles, each scale out ``latency + 1`` edges after its
        ``absmax``."""
        return (job.rows - 1) * self.interval + self.latency + 2

    def memory_blocks(self) -> dict[str, float]:
        """None: the divider and the product (one DSP48E2) are registers and LUTs."""
        return no_memory()


class Dequantizer(wiring.Component):
    """TLMM accumulators -> fp16: ``y = round(acc * S)`` per lane, ``S`` the row's fp32
    scale ``round32(A * w / 127)`` (``fp16_dequantize`` of ``fp16_dequant_scale``).

    Streams and inputs:

    * ``acc`` in: the engine's ``results`` beats (``wiring.connect`` them directly): ``C``
      signed accumulators of ``acc_width`` bits, ``n_groups`` beats per row, in column order.
    * ``absmax`` in: one fp16 code per row, the row's absmax ``A`` from the quantizer. It may
      (and should) arrive ahead of the row: the scale is computed while the previous row
      streams.
    * ``weight_scale``: the tensor's weight scale ``w``, fp32 bits (see ``DequantScale``).
    * ``n_groups``: beats per row (at least 1), as the engine's; hold it and ``weight_scale``
      constant while rows are in flight.
    * ``y`` out: ``C`` fp16 lanes per beat, one beat per ``acc`` beat, same order.

    Pipeline (``latency`` = 3): normalize ``|acc|`` (leading-zero count and shift) | the
    ``acc_width`` x 24-bit significand product (exact; 2 DSP48E2 a lane at 22 bits) | round
    to 11 bits and pack. The scalar path (``DequantScale``) makes the first beat of a row wait
    until ``scale_latency`` = 17 edges after its ``absmax`` was taken, and a row takes at least
    ``DequantScale.interval`` = 17 cycles: rows of 17 or more groups stream with no bubble
    (the kv260 FFN has 96..256 groups of 16 per row).
    """

    def __init__(self, cfg: EngineConfig):
        if not isinstance(cfg, EngineConfig):
            raise TypeError(f"cfg must be an EngineConfig, not {cfg!r}")
        self.cfg = cfg
        self.lanes = cfg.columns_per_cycle
        self.acc_width = cfg.acc_width
        super().__init__({
            "acc": In(stream.Signature(data.ArrayLayout(signed(self.acc_width), self.lanes))),
            "absmax": In(stream.Signature(unsigned(16))),
            "weight_scale": In(unsigned(32)),
            "n_groups": In(unsigned(N_GROUPS_WIDTH)),
            "y": Out(lane_signature(self.lanes)),
        })

    latency = 3

    @property
    def scale_latency(self) -> int:
        """Edges from taking a row's ``absmax`` to the earliest edge its first beat is taken."""
        return DequantScale.latency + 1

    def expected_cycles(self, job: DequantJob) -> int:
        """Edges from the first ``absmax`` taken to the last ``y`` beat out, inclusive of
        both, when no stream ever stalls and every ``absmax`` is offered ahead."""
        period = max(job.n_groups, DequantScale.interval)
        return (self.scale_latency + (job.rows - 1) * period + (job.n_groups - 1)
                + self.latency + 1)

    def memory_blocks(self) -> dict[str, float]:
        """None (docs/lane_units.md: 0 BRAM36): pipeline registers, DSP48E2 and the scalar
        path's ``DequantScale``."""
        return no_memory()

    def elaborate(self, platform):
        m = Module()
        C, aw = self.lanes, self.acc_width
        m.submodules.scale_unit = scale_unit = DequantScale()
        m.d.comb += [scale_unit.weight_scale.eq(self.weight_scale)]
        wiring.connect(m, wiring.flipped(self.absmax), scale_unit.absmax)
        scale = scale_unit.scale

        pipe = Pipeline(m, 3, in_valid=self.acc.valid & scale.valid, out_ready=self.y.ready,
                         name="dq")
        taken = self.acc.valid & self.acc.ready

        # Beats of the current row; the row's scale is released with its last beat.
        group = Signal(N_GROUPS_WIDTH)
        last = group + 1 == self.n_groups
        m.d.comb += [self.acc.ready.eq(pipe.in_ready & scale.valid),
                     scale.ready.eq(taken & last)]
        with m.If(taken):
            m.d.sync += group.eq(Mux(last, 0, group + 1))

        # ---- stage 1: sign, |acc| normalized to a leading one at bit aw-1 ---------------
        s1_scale = Signal(32)
        s1_norm = [Signal(aw, name=f"s1_norm{c}") for c in range(C)]
        s1_lz = [Signal(range(aw + 1), name=f"s1_lz{c}") for c in range(C)]
        s1_neg = [Signal(name=f"s1_neg{c}") for c in range(C)]
        s1_zero = [Signal(name=f"s1_zero{c}") for c in range(C)]
        with m.If(pipe.take[0]):
            m.d.sync += s1_scale.eq(scale.payload)
        for c in range(C):
            acc = self.acc.payload[c]
            magnitude = Signal(aw, name=f"magnitude{c}")      # |-2**(aw-1)| fits aw bits
            m.d.comb += magnitude.eq(Mux(acc < 0, -acc, acc))
            lz = leading_zeros(m, magnitude, f"leading_zeros{c}")
            with m.If(pipe.take[0]):
                m.d.sync += [s1_norm[c].eq(magnitude << lz), s1_lz[c].eq(lz),
                             s1_neg[c].eq(acc < 0), s1_zero[c].eq(magnitude == 0)]

        # ---- stage 2: the exact significand product ------------------------------------
        # value = norm * 2**-lz * sig * 2**(es - 150); norm * sig has its leading one at bit
        # aw + 22 or aw + 23, so the fp16 biased exponent is es - lz + aw + 22 - 135 (+ top).
        width = aw + 24
        scale_exp = s1_scale[_F32_MANT:31]
        scale_sig = Cat(s1_scale[:_F32_MANT], 1)
        s2_product = [Signal(width, name=f"s2_product{c}") for c in range(C)]
        s2_exp = [Signal(signed(12), name=f"s2_exp{c}") for c in range(C)]
        s2_sign = [Signal(name=f"s2_sign{c}") for c in range(C)]
        s2_zero = [Signal(name=f"s2_zero{c}") for c in range(C)]
        for c in range(C):
            with m.If(pipe.take[1]):
                m.d.sync += [
                    s2_product[c].eq(s1_norm[c] * scale_sig),
                    s2_exp[c].eq(scale_exp - s1_lz[c] + (aw + 22 - _F32_BIAS - _F32_MANT
                                                          + _BIAS)),
                    s2_sign[c].eq(s1_neg[c] ^ s1_scale[31]),
                    s2_zero[c].eq(s1_zero[c] | (scale_exp == 0)),
                ]

        # ---- stage 3: round once to 11 bits, flush or saturate, pack --------------------
        out = Signal(lane_layout(C))
        for c in range(C):
            p = s2_product[c]
            top = p[width - 1]
            kept, guard, sticky = (Signal(11, name=f"kept{c}"), Signal(name=f"guard{c}"),
                                   Signal(name=f"sticky{c}"))
            with m.If(top):
                m.d.comb += [kept.eq(p[width - 11:width]), guard.eq(p[width - 12]),
                             sticky.eq(p[:width - 12].any())]
            with m.Else():
                m.d.comb += [kept.eq(p[width - 12:width - 1]), guard.eq(p[width - 13]),
                             sticky.eq(p[:width - 13].any())]
            rounded = Signal(12, name=f"rounded{c}")
            m.d.comb += rounded.eq(kept + (guard & (sticky | kept[0])))
            exponent = Signal(signed(13), name=f"exponent{c}")
            m.d.comb += exponent.eq(s2_exp[c] + top + rounded[11])
            code = Signal(16, name=f"code{c}")
            pack(m, code, fp.FP16, sign=s2_sign[c], exponent=exponent, rounded=rounded,
                 zero=s2_zero[c])
            with m.If(pipe.take[2]):
                m.d.sync += out[c].eq(code)
        m.d.comb += [self.y.valid.eq(pipe.out_valid), self.y.payload.eq(out)]
        return m

    def model(self, acc, absmax, weight_scale) -> np.ndarray:
        """``acc[rows, n]`` integers, ``absmax[rows]`` fp16 codes, ``weight_scale`` fp32 code
        -> fp16 codes ``[rows, n]``."""
        acc = np.asarray(acc)
        scale = fp.fp16_dequant_scale(absmax, fp.fp32_to_float(np.uint32(weight_scale)))
        return fp.fp16_dequantize(acc, np.asarray(scale)[..., None])
