"""The element-wise number format and its arithmetic, bit for bit (numerics level 2).

Everything between the ternary linears -- RMSNorm, activation quantization, dequantization,
the gated activation, residual adds -- runs in IEEE 754 binary16 (fp16), as in TeLLMe, with
these simplifications, which every model here and every RTL unit (``trilut.hdl.elementwise.fp16``)
reproduce exactly:

* **round to nearest, ties to even** on every operation, decided as if the exponent were
  unbounded (IEEE "tininess after rounding");
* **flush to zero**: a subnormal input reads as zero of its sign; a result whose rounded
  exponent is below the smallest normal one (2**-14) becomes zero of its sign;
* **saturation**: a result whose rounded exponent is above the largest one becomes
  +-65504 (``0x7BFF``). No Inf;
* **no NaN is ever produced**, and none is ever consumed: every value of the element-wise
  datapath starts as an int8 x ternary accumulator or a weight/norm parameter, so no NaN
  or Inf can enter. A code with the all-ones exponent (31) therefore never occurs; should
  one arrive, it reads as the finite number ``(1 + m/1024) * 2**16`` -- the decoder has no
  special case, which is what the hardware does -- and any result from it saturates;
* **exact zero sums** are +0, except (-0) + (-0) = -0 (IEEE's rule under round to nearest);
  products take the XOR of the signs, zeros included.

Reductions (RMSNorm's sum of squares) accumulate in binary32 (fp32) with the same rules
(RNE, FTZ below 2**-126, saturation at the fp32 maximum), in a fixed order: sequentially in
element order, or in the interleaved order of a unit taking several elements per cycle
(``ElementwiseArithmetic.sum_of_squares``). Scales are fp32 too.

How each op is computed exactly
-------------------------------
An op is defined as "the exact real result, rounded once" (``FloatFormat.round``), and the
exact result is computed in float64, which is exact where stated:

* one fp16 product: two 11-bit significands give a 22-bit one; float64 holds 53;
* one fp16 sum: both operands are multiples of 2**-24 (the ulp of the smallest normal) and
  below 2**17, so the exact sum fits 41 bits; float64 holds it exactly;
* an integer accumulator times an fp32 scale: the TLMM accumulator is 22 bits for kv260
  (``numerics.accumulator_width``), 46 bits with the scale; ``dequantize`` accepts up to 29;
* x times an fp32 scale (quantize: 35 bits), x times the rsqrt (30 bits), fp32 products
  (48 bits);
* an fp32 sum is not always exact in float64 (exponents may differ by more than 29), but
  rounding float64's correctly rounded result to 24 bits again is the correctly rounded
  result, because 53 >= 2 * 24 + 2 (double rounding is innocuous for +, -, x, / then:
  Figueroa, "When is double rounding innocuous?", 1995). The same holds for bf16.

Codes are ``np.uint16`` (fp16, bf16) or ``np.uint32`` (fp32) bit patterns; values are float64
arrays holding numbers of the format. ``ElementwiseArithmetic`` works on values for any
``FloatFormat`` (so ``trilut.models.fp16_error`` can compare fp16 with bf16 and fp32); the
``fp16_*`` functions are the hardware's contract on fp16 codes. docs/elementwise.md gives
each op in hardware terms and the measured error against the float model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = [
    "FloatFormat", "FP16", "BF16", "FP32", "ElementwiseArithmetic", "FP16_ARITH",
    "RSQRT_INDEX_BITS", "RSQRT_FRACTION_BITS", "rsqrt_table", "rsqrt_fp32",
    "SILU_SEGMENT_BITS", "SILU_LOW_EXPONENT", "SILU_HIGH_EXPONENT",
    "fp16_from_float", "fp16_to_float", "fp32_from_float", "fp32_to_float",
    "fp16_add", "fp16_mul", "int_to_fp16",
    "fp16_quantize_int8", "fp16_dequant_scale", "fp16_dequantize",
    "fp16_rmsnorm", "fp16_relu2", "fp16_silu", "fp16_gate_mul", "fp16_residual_add",
]


# --------------------------------------------------------------------------------------------
# Formats: rounding, encoding, decoding.


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format with trilut's rules (RNE, FTZ, saturation, no NaN).

    ``precision`` counts significand bits including the hidden one (fp16: 11).
    """

    name: str
    exponent_bits: int
    precision: int

    def __post_init__(self):
        for field, low, high in (("exponent_bits", 2, 11), ("precision", 2, 53)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{field} must be an integer from {low} to {high}, "
                                 f"not {value!r}")
        if self.width > 32:
            raise ValueError(f"{self.name}: formats up to 32 bits are supported, not "
                             f"{self.width}")

    @property
    def width(self) -> int:
        return self.exponent_bits + self.precision

    @property
    def mantissa_bits(self) -> int:
        return self.precision - 1

    @property
    def bias(self) -> int:
        return (1 << (self.exponent_bits - 1)) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite number (the all-ones exponent is never made)."""
        return self.bias

    @property
    def max_value(self) -> float:
        return math.ldexp(2.0 - math.ldexp(1.0, 1 - self.precision), self.emax)

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, self.emin)

    @property
    def max_code(self) -> int:
        """Code of the largest positive number (fp16: 0x7BFF = 65504)."""
        return ((2 * self.bias) << self.mantissa_bits) | ((1 << self.mantissa_bits) - 1)

    @property
    def code_dtype(self):
        return np.uint16 if self.width <= 16 else np.uint32

    def round(self, x) -> np.ndarray:
        """Round float64 ``x`` to this format: RNE with an unbounded exponent, then flush
        (exponent < ``emin``: zero of x's sign) or saturate (exponent > ``emax``: +-max).

        Exact for every finite float64 (``frexp``/``ldexp`` are exact, and ``rint`` rounds
        half to even). NaN and Inf are refused: the datapath cannot make them.
        """
        x = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{self.name} values are finite; got NaN or Inf")
        frac, exp = np.frexp(np.abs(x))                     # |x| = frac * 2**exp, frac in [.5, 1)
        sig = np.rint(np.ldexp(frac, self.precision))       # in [2**(p-1), 2**p], RNE
        carry = sig == float(1 << self.precision)
        sig = np.where(carry, float(1 << (self.precision - 1)), sig)
        exp = exp + carry
        value = np.ldexp(sig, exp - self.precision)
        unbiased = exp - 1                                  # value = 1.f * 2**unbiased
        value = np.where(unbiased < self.emin, 0.0, value)
        value = np.where(unbiased > self.emax, self.max_value, value)
        return np.copysign(value, x)

    def encode(self, values) -> np.ndarray:
        """Numbers of this format (as ``round`` makes them) -> their codes."""
        v = np.asarray(values, dtype=np.float64)
        frac, exp = np.frexp(np.abs(v))
        sig = np.ldexp(frac, self.precision).astype(np.int64)
        biased = np.where(sig == 0, 0, exp - 1 + self.bias).astype(np.int64)
        mant = np.where(sig == 0, 0, sig - (1 << self.mantissa_bits))
        if np.any((sig != 0) & ((biased < 1) | (biased > 2 * self.bias))) or np.any(
                np.ldexp(sig.astype(np.float64), exp - self.precision) != np.abs(v)):
            raise ValueError(f"values are not {self.name} numbers; round them first")
        sign = np.signbit(v).astype(np.int64) << (self.width - 1)
        return (sign | biased << self.mantissa_bits | mant).astype(self.code_dtype)

    def decode(self, codes) -> np.ndarray:
        """Codes -> float64 values: exponent 0 reads as zero of its sign (FTZ); the
        all-ones exponent reads as an ordinary finite binade (no Inf/NaN decoding)."""
        c = np.asarray(codes).astype(np.int64)
        if np.any((c < 0) | (c >> self.width != 0)):
            raise ValueError(f"{self.name} codes are unsigned {self.width}-bit integers")
        biased = (c >> self.mantissa_bits) & ((1 << self.exponent_bits) - 1)
        mant = c & ((1 << self.mantissa_bits) - 1)
        mag = np.where(biased == 0, 0.0, np.ldexp(
            (mant + (1 << self.mantissa_bits)).astype(np.float64),
            biased - self.bias - self.mantissa_bits))
        return np.where(c >> (self.width - 1), -mag, mag)

    def from_float(self, x) -> np.ndarray:
        """float64 -> codes, rounded once (``round`` then ``encode``)."""
        return self.encode(self.round(x))


FP16 = FloatFormat("fp16", exponent_bits=5, precision=11)
BF16 = FloatFormat("bf16", exponent_bits=8, precision=8)
FP32 = FloatFormat("fp32", exponent_bits=8, precision=24)


# --------------------------------------------------------------------------------------------
# rsqrt: an 8-bit LUT and one Newton step, in integers on the fp32 bits.

#: Table index: the exponent's parity and the top 7 mantissa bits (256 entries).
RSQRT_INDEX_BITS = 8
#: Fraction bits of the table entries and of the Newton result (values in (1/2, 1]).
RSQRT_FRACTION_BITS = 18


def rsqrt_table() -> np.ndarray:
    """``Y0[p << 7 | k]`` (int64, 18 bits): ``m**-1/2`` on the segment ``m in [m0, m1)``,
    ``m0 = (1 + k/128) * 2**p``, as ``round(2**18 * 2 / (sqrt(m0) + sqrt(m1)))`` -- the
    constant with the smallest worst relative error on the segment. ``math.sqrt`` is
    correctly rounded (IEEE 754), so the table is the same on every machine."""
    half = 1 << (RSQRT_INDEX_BITS - 1)
    out = []
    for p in (0, 1):
        for k in range(half):
            m0, m1 = (1 + k / half) * 2 ** p, (1 + (k + 1) / half) * 2 ** p
            out.append(round(2 ** RSQRT_FRACTION_BITS * 2 / (math.sqrt(m0) + math.sqrt(m1))))
    return np.array(out, dtype=np.int64)


_RSQRT_TABLE = rsqrt_table()


def rsqrt_fp32(v) -> np.ndarray:
    """``1 / sqrt(v)`` for fp32 values ``v > 0`` (float64 arrays), the hardware's way.

    With ``v = 1.f * 2**E`` (fp32 bits), ``p = E & 1``, ``M = (2**23 + f) << p`` (so
    ``m = M / 2**23`` in [1, 4)) and ``E2 = E - p`` (even), all in integers::

        Y0 = table[p << 7 | f >> 16]              # 18 fraction bits, ~ m**-1/2 (+-2**-9)
        S  = (Y0 * Y0) >> 18                      # y0**2                (floor)
        T  = (M * S) >> 23                        # m * y0**2            (floor)
        Y1 = (Y0 * ((3 << 18) - T)) >> 19         # y0 * (3 - m y0**2)/2 (floor), Newton
        r  = Y1 * 2**(-18 - E2/2)                 # exact in fp32: Y1 has <= 19 bits

    The worst relative error is about 2**-17 (docs/elementwise.md), far below an fp16 ulp.
    It runs once per row, so a single sequential multiplier serves it. ``v == 0`` (only
    with ``eps == 0``) gives the fp32 maximum.
    """
    v = np.asarray(v, dtype=np.float64)
    if np.any(v < 0):
        raise ValueError("rsqrt_fp32 needs non-negative values")
    codes = FP32.encode(FP32.round(v)).astype(np.int64)
    biased = codes >> 23
    f = codes & ((1 << 23) - 1)
    e = biased - FP32.bias
    p = e & 1
    m_fixed = ((1 << 23) + f) << p
    y0 = _RSQRT_TABLE[(p << (RSQRT_INDEX_BITS - 1)) | (f >> (24 - RSQRT_INDEX_BITS))]
    q = RSQRT_FRACTION_BITS
    s = (y0 * y0) >> q
    t = (m_fixed * s) >> 23
    y1 = (y0 * ((3 << q) - t)) >> (q + 1)
    r = np.ldexp(y1.astype(np.float64), -q - (e - p) // 2)
    return np.where(biased == 0, FP32.max_value, FP32.round(r))


# --------------------------------------------------------------------------------------------
# SiLU: a piecewise-linear sigmoid, one segment per (sign, binade, top 5 mantissa bits).

#: Segments per binade: the top 5 mantissa bits of |x| pick one (4 bits left 8.6 ulp of
#: SiLU near x = -5, where sigmoid ~ e**x curves fastest relative to its value).
SILU_SEGMENT_BITS = 5
#: Below 2**-4, sigmoid(x) = 1/2 + x/4 (error below x**3/48 < 1e-5); at and above 2**4 it is
#: 1 (x > 0) or 0 (x < 0), off by at most exp(-16) = 1.1e-7.
SILU_LOW_EXPONENT = -4
SILU_HIGH_EXPONENT = 4


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _silu_segments():
    """float64 ``(a, b)`` of shape ``[2 (sign), binades, 2**SILU_SEGMENT_BITS]`` and the
    integer ``shift[2, binades]``. On the segment ``|x| in [m0, m1)``,
    ``2**shift * sigmoid(+-|x|) ~ b + a * (|x| - m0)``: the chord, shifted by half its worst
    deviation (sampled on 257 points) so that the error is balanced.

    Two choices keep small sigmoids precise. Offsetting by the segment start keeps ``b`` near
    the result: a line through the origin needs an intercept several times the result on
    the negative side, and rounding it cost 13 ulp of SiLU near x = -5. The scale ``2**shift``
    (0 for x > 0; for x < 0 the smallest shift that lifts the binade's smallest sigmoid to
    at least 1/2) keeps ``a * (|x| - m0)`` clear of the flush-to-zero threshold: unscaled,
    that correction is about 6e-5 near x = -5.8 and flushed, an error of 20 ulp."""
    binades = SILU_HIGH_EXPONENT - SILU_LOW_EXPONENT
    n = 1 << SILU_SEGMENT_BITS
    a = np.zeros((2, binades, n))
    b = np.zeros((2, binades, n))
    shift = np.zeros((2, binades), dtype=np.int64)
    for s, sign in enumerate((1.0, -1.0)):
        for i in range(binades):
            e = SILU_LOW_EXPONENT + i
            if sign < 0:
                smallest = float(_sigmoid(-math.ldexp(1.0, e + 1)))
                shift[s, i] = max(0, -math.floor(math.log2(smallest)) - 1)
            scale = math.ldexp(1.0, int(shift[s, i]))
            for k in range(n):
                m0 = math.ldexp(1 + k / n, e)
                m1 = math.ldexp(1 + (k + 1) / n, e)
                f0, f1 = _sigmoid(sign * m0), _sigmoid(sign * m1)
                slope = (f1 - f0) / (m1 - m0)
                t = np.linspace(0.0, m1 - m0, 257)
                dev = _sigmoid(sign * (m0 + t)) - (f0 + slope * t)
                a[s, i, k] = slope * scale
                b[s, i, k] = (f0 + (dev.max() + dev.min()) / 2) * scale
    return a, b, shift


# --------------------------------------------------------------------------------------------
# The element-wise ops, on values of any format.


class ElementwiseArithmetic:
    """The element-wise datapath's ops on values (float64 arrays of ``fmt`` numbers).

    Reductions and scales are fp32 whatever ``fmt`` is. Each method states its exact
    arithmetic; ``round`` below is ``fmt.round`` and ``round32`` is ``FP32.round``.
    """

    def __init__(self, fmt: FloatFormat):
        if not isinstance(fmt, FloatFormat):
            raise TypeError(f"fmt must be a FloatFormat, not {fmt!r}")
        if 2 * fmt.precision + 2 > 53:
            raise ValueError(f"{fmt.name}: precision {fmt.precision} is too wide for exact "
                             f"float64 models (at most 25)")
        self.fmt = fmt

    def __repr__(self):
        return f"ElementwiseArithmetic({self.fmt.name})"

    # -- basic ops ------------------------------------------------------------------------

    def from_float(self, x) -> np.ndarray:
        return self.fmt.round(x)

    def add(self, a, b) -> np.ndarray:
        """``round(a + b)``."""
        return self.fmt.round(np.asarray(a, dtype=np.float64) + np.asarray(b, dtype=np.float64))

    def mul(self, a, b) -> np.ndarray:
        """``round(a * b)`` (the sign of a zero product is the XOR of the signs)."""
        return self.fmt.round(np.asarray(a, dtype=np.float64) * np.asarray(b, dtype=np.float64))

    def int_to_float(self, n) -> np.ndarray:
        """``round(n)`` for integers ``|n| < 2**53``."""
        n = np.asarray(n)
        if n.dtype.kind not in "iu":
            raise TypeError(f"int_to_float needs an integer array, not {n.dtype}")
        if n.size and np.abs(n.astype(np.int64)).max() >= 1 << 53:
            raise ValueError("integers must be below 2**53 in magnitude")
        return self.fmt.round(n.astype(np.float64))

    def relu2(self, x) -> np.ndarray:
        """``round(r * r)`` with ``r = x`` if ``x > 0`` else +0: one multiply, one rounding."""
        x = np.asarray(x, dtype=np.float64)
        r = np.where(x > 0, x, 0.0)
        return self.fmt.round(r * r)

    def gate_mul(self, act, up) -> np.ndarray:
        """``round(act * up)``: the gated activation times the up projection."""
        return self.mul(act, up)

    def residual_add(self, residual, update) -> np.ndarray:
        """``round(residual + update)``."""
        return self.add(residual, update)

    # -- SiLU -----------------------------------------------------------------------------

    @cached_property
    def silu_coefficients(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The sigmoid table ``(a, b, shift)``: ``a`` and ``b`` rounded to the format,
        ``[2, binades, 32]`` (index 0: x > 0, 1: x < 0), and the integer ``shift[2,
        binades]`` (see ``_silu_segments``)."""
        a, b, shift = _silu_segments()
        return self.fmt.round(a), self.fmt.round(b), shift

    def scaled_sigmoid(self, x) -> tuple[np.ndarray, np.ndarray]:
        """``(u, shift)`` with ``u = round(round(a * t) + b) ~ 2**shift * sigmoid(x)``.

        ``t = |x| - m0`` is the offset of ``|x|`` in its segment ``[m0, m1)``: the mantissa
        bits below the segment index, exact, no adder. ``(a, b)`` and ``shift`` come from
        the table entry of (sign, binade, top 5 mantissa bits) of x. Below 2**-4: ``m0 =
        0``, ``(a, b) = (+-1/4, 1/2)``, ``shift = 0``. From 2**4 up: ``(0, 1)`` for x > 0 and
        ``(0, 0)`` for x < 0.
        """
        x = np.asarray(x, dtype=np.float64)
        a_tab, b_tab, shift_tab = self.silu_coefficients
        mag = np.abs(x)
        frac, exp = np.frexp(mag)                       # mag = (2 frac) * 2**(exp - 1)
        binade = np.clip(exp - 1 - SILU_LOW_EXPONENT, 0, a_tab.shape[1] - 1)
        segment = np.floor((2 * frac - 1) * (1 << SILU_SEGMENT_BITS)).astype(np.int64)
        segment = np.clip(segment, 0, (1 << SILU_SEGMENT_BITS) - 1)
        start = np.ldexp(1.0 + segment / (1 << SILU_SEGMENT_BITS),
                         binade + SILU_LOW_EXPONENT)
        negative = (x < 0).astype(np.int64)
        low = mag < math.ldexp(1.0, SILU_LOW_EXPONENT)
        high = mag >= math.ldexp(1.0, SILU_HIGH_EXPONENT)
        a = np.where(low, np.where(x < 0, -0.25, 0.25),
                     np.where(high, 0.0, a_tab[negative, binade, segment]))
        b = np.where(low, 0.5, np.where(high, np.where(x > 0, 1.0, 0.0),
                                        b_tab[negative, binade, segment]))
        shift = np.where(low | high, 0, shift_tab[negative, binade])
        offset = np.where(low, mag, np.where(high, 0.0, mag - start))
        return self.add(self.mul(a, offset), b), shift

    def sigmoid(self, x) -> np.ndarray:
        """``round(u * 2**-shift)`` of ``scaled_sigmoid`` (what ``silu`` multiplies by)."""
        u, shift = self.scaled_sigmoid(x)
        return self.fmt.round(np.ldexp(u, -shift))

    def silu(self, x) -> np.ndarray:
        """``round(x * u * 2**-shift)`` with ``(u, shift) = scaled_sigmoid(x)``: the final
        multiply takes the shift in its exponent adder and rounds once. Per element: two
        multiplies, one add, a 512-entry table (a, b: 16 Kbit) and 16 shifts."""
        x = np.asarray(x, dtype=np.float64)
        u, shift = self.scaled_sigmoid(x)
        return self.fmt.round(np.ldexp(x * u, -shift))

    # -- quantization ---------------------------------------------------------------------

    def quantize_int8(self, x) -> tuple[np.ndarray, np.ndarray]:
        """Per-row absmax int8 quantization along the last axis -> ``(codes, absmax)``.

        ``A = max(max|x|, round(1e-5))`` (an exact compare tree; for fp16 the clamp is 0
        because 1e-5 is subnormal), ``s = round32(127 / A)`` once per row (0 if A = 0), and
        ``q = clamp(rint(x * s), -128, 127)`` with ``x * s`` exact (an 11 x 24-bit product:
        one DSP48E2 per lane) and ``rint`` half to even. ``numerics.int8_quantize`` does the
        same in float32 except that it rounds ``x * s`` to fp32 before ``rint``.
        ``x ~= q * A / 127``; ``A`` is what ``dequant_scale`` takes.
        """
        from .numerics import ACT_MAX, ACT_MIN, QUANT_EPS

        x = np.asarray(x, dtype=np.float64)
        absmax = np.maximum(np.abs(x).max(axis=-1, keepdims=True), self.fmt.round(QUANT_EPS))
        safe = np.where(absmax > 0, absmax, 1.0)
        scale = np.where(absmax > 0, FP32.round(ACT_MAX / safe), 0.0)
        codes = np.clip(np.rint(x * scale), ACT_MIN, ACT_MAX).astype(np.int8)
        return codes, absmax

    def dequant_scale(self, absmax, weight_scale) -> np.ndarray:
        """Per row: ``round32(A * w / 127)`` -- the weight scale ``w`` (fp32, one per tensor)
        times the activation scale ``A / 127``, rounded once.

        ``A * w`` is exact (35 bits); its quotient by 127 is never within 2**-41 (relative)
        of an fp32 rounding boundary without being on it, so float64's division followed by
        ``round32`` is the correctly rounded quotient. In hardware it is one multiply and a
        division by the constant 127 per row, off the element path.
        """
        from .numerics import ACT_MAX

        w = FP32.round(weight_scale)
        return FP32.round(np.asarray(absmax, dtype=np.float64) * w / ACT_MAX)

    def dequantize(self, acc, scale) -> np.ndarray:
        """``round(acc * scale)``: the TLMM accumulator (<= 22 bits) times the row's fp32
        ``dequant_scale``, exact (46 bits) and rounded once. Two DSP48E2 per lane."""
        acc = np.asarray(acc)
        if acc.dtype.kind not in "iu":
            raise TypeError(f"dequantize needs integer accumulators, not {acc.dtype}")
        if acc.size and np.abs(acc.astype(np.int64)).max() >= 1 << 29:
            raise ValueError("accumulators must stay below 2**29 for an exact product")
        return self.fmt.round(acc.astype(np.float64) * np.asarray(scale, dtype=np.float64))

    # -- RMSNorm --------------------------------------------------------------------------

    def sum_of_squares(self, x, partials: int = 1) -> np.ndarray:
        """``sum(x**2)`` along the last axis in fp32, in a fixed order.

        ``partials = 1`` (the contract): sequentially in element order, ``acc =
        round32(acc + round32(x_i * x_i))`` from ``acc = +0``. ``partials = P`` is the order
        of a unit that takes P elements per cycle: partial sum ``j`` adds elements ``j, j+P,
        j+2P, ...`` sequentially, then the P partials are added pairwise, level by level
        (``(0+1), (2+3), ...``; an odd one out moves up unchanged).

        For fp16 and bf16 each square is exact in fp32 (22 / 16 bits) and normal (>= 2**-28).
        Adding non-negative fp32 numbers never makes a subnormal, and IEEE float32 addition
        is RNE, so numpy's strictly sequential ``add.accumulate`` in float32 is this sum bit
        for bit up to overflow, which becomes Inf and is then saturated (the model's sum,
        once saturated, stays at the maximum since every further term is >= 0).
        """
        if isinstance(partials, bool) or not isinstance(partials, int) or partials < 1:
            raise ValueError(f"partials must be a positive integer, not {partials!r}")
        x = np.asarray(x, dtype=np.float64)
        squares = FP32.round(x * x).astype(np.float32)
        n = squares.shape[-1]
        if n == 0:
            return np.zeros(squares.shape[:-1])
        # Zero padding adds +0 to non-negative sums: no change.
        squares = np.concatenate(
            [squares, np.zeros((*squares.shape[:-1], (-n) % partials), np.float32)], axis=-1)
        squares = squares.reshape(*squares.shape[:-1], -1, partials)
        with np.errstate(over="ignore"):
            level = np.add.accumulate(squares, axis=-2, dtype=np.float32)[..., -1, :]
        return self.pairwise_sum(level)

    @staticmethod
    def pairwise_sum(level) -> np.ndarray:
        """The pairwise tree over non-negative fp32 partial sums (last axis; float32), as
        ``RmsScale`` adds them: neighbours pair up level by level, an odd one passes on."""
        level = np.asarray(level, dtype=np.float32)
        with np.errstate(over="ignore"):
            while level.shape[-1] > 1:
                pairs = level.shape[-1] // 2
                summed = level[..., 0:2 * pairs:2] + level[..., 1:2 * pairs:2]
                level = np.concatenate([summed, level[..., 2 * pairs:]], axis=-1)
        return np.minimum(level[..., 0].astype(np.float64), FP32.max_value)

    @staticmethod
    def rms_scale(ssq, n: int, eps: float) -> np.ndarray:
        """``r = rsqrt_fp32(round32(round32(ssq * round32(1/n)) + round32(eps)))``: the
        per-row scalar of :meth:`rmsnorm` from the fp32 sum of squares."""
        mean = FP32.round(np.asarray(ssq, dtype=np.float64) * FP32.round(1.0 / n))
        return rsqrt_fp32(FP32.round(mean + FP32.round(eps)))

    def rmsnorm(self, x, weight, eps: float, partials: int = 1) -> np.ndarray:
        """RMSNorm along the last axis, as the hardware computes it::

            ssq = sum_of_squares(x, partials)        # fp32, fixed order
            ms  = round32(ssq * round32(1 / n))      # mean: a constant multiply
            v   = round32(ms + round32(eps))
            r   = rsqrt_fp32(v)                      # LUT + one Newton step, <= 19-bit result
            y_i = round(round(x_i * r) * weight_i)   # x_i * r exact: 11 x 19 bits, one DSP

        The order follows the golden model (``weight * (x * rsqrt(mean + eps))``).
        """
        x = np.asarray(x, dtype=np.float64)
        n = x.shape[-1]
        r = self.rms_scale(self.sum_of_squares(x, partials)[..., None], n, eps)
        return self.mul(self.fmt.round(x * r), weight)


FP16_ARITH = ElementwiseArithmetic(FP16)


# --------------------------------------------------------------------------------------------
# The hardware contract on fp16 codes (np.uint16); scales and norms' internals are fp32.


def _f(codes):
    return FP16.decode(codes)


def fp16_from_float(x) -> np.ndarray:
    """float64 -> fp16 codes: RNE, FTZ below 2**-14, saturation at +-65504."""
    return FP16.from_float(x)


def fp16_to_float(codes) -> np.ndarray:
    """fp16 codes -> float64: subnormal codes read as signed zero, exponent 31 as a finite
    binade (it never occurs)."""
    return FP16.decode(codes)


def fp32_from_float(x) -> np.ndarray:
    """float64 -> fp32 codes (``np.uint32``): RNE, FTZ, saturation."""
    return FP32.from_float(x)


def fp32_to_float(codes) -> np.ndarray:
    return FP32.decode(codes)


def fp16_add(a, b) -> np.ndarray:
    """``round(a + b)`` on fp16 codes (``hdl.fp16.Fp16Add``)."""
    return FP16.encode(FP16_ARITH.add(_f(a), _f(b)))


def fp16_mul(a, b) -> np.ndarray:
    """``round(a * b)`` on fp16 codes (``hdl.fp16.Fp16Mul``)."""
    return FP16.encode(FP16_ARITH.mul(_f(a), _f(b)))


def int_to_fp16(n) -> np.ndarray:
    """Integers (|n| < 2**53) -> fp16 codes, rounded once (``hdl.fp16.IntToFp16``)."""
    return FP16.encode(FP16_ARITH.int_to_float(n))


def fp16_quantize_int8(x) -> tuple[np.ndarray, np.ndarray]:
    """fp16 row(s) -> ``(int8 codes, absmax as fp16 codes)``; see
    ``ElementwiseArithmetic.quantize_int8``. ``x ~= codes * absmax / 127``."""
    codes, absmax = FP16_ARITH.quantize_int8(_f(x))
    return codes, FP16.encode(absmax)


def fp16_dequant_scale(absmax, weight_scale) -> np.ndarray:
    """fp16 ``absmax`` codes and an fp32 weight scale (float or value) -> the per-row fp32
    dequantization scale as ``np.uint32`` codes: ``round32(A * w / 127)``."""
    return FP32.encode(FP16_ARITH.dequant_scale(_f(absmax), weight_scale))


def fp16_dequantize(acc, scale) -> np.ndarray:
    """Integer accumulators x fp32 scale codes (``fp16_dequant_scale``) -> fp16 codes,
    exact product, one rounding."""
    return FP16.encode(FP16_ARITH.dequantize(acc, FP32.decode(scale)))


def fp16_rmsnorm(x, weight, eps: float, partials: int = 1) -> np.ndarray:
    """RMSNorm on fp16 codes along the last axis with fp16 ``weight`` codes; see
    ``ElementwiseArithmetic.rmsnorm`` (``partials``: the sum of squares' order)."""
    return FP16.encode(FP16_ARITH.rmsnorm(_f(x), _f(weight), eps, partials))


def fp16_relu2(x) -> np.ndarray:
    """``relu(x)**2``, one rounding."""
    return FP16.encode(FP16_ARITH.relu2(_f(x)))


def fp16_silu(x) -> np.ndarray:
    """``x * sigmoid(x)`` with the piecewise-linear sigmoid (three roundings)."""
    return FP16.encode(FP16_ARITH.silu(_f(x)))


def fp16_gate_mul(act, up) -> np.ndarray:
    return FP16.encode(FP16_ARITH.gate_mul(_f(act), _f(up)))


def fp16_residual_add(residual, update) -> np.ndarray:
    return FP16.encode(FP16_ARITH.residual_add(_f(residual), _f(update)))
