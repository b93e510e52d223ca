"""fp16 arithmetic units of the element-wise datapath, bit-exact with ``models/fp16.py``.

The number format and its rules (RNE, flush-to-zero, saturation at +-65504, no NaN/Inf,
exponent 31 read as an ordinary binade) are defined in ``trilut.models.fp16``; each unit's
``model()`` is the corresponding function there, and the tests compare them bit for bit.

All three units are combinational (latency 0). They sit inside the fused element-wise
stream stages, which own the pipeline registers: at 250 MHz on UltraScale+ a stage holds one
DSP48E2 multiply or one normalize-and-round, so the stream wrapper registers the product /
the aligned sum before rounding. Keeping the units combinational leaves that split to the
one place that knows the stream's valid/ready timing. Port ``a``, ``b`` and ``y`` are raw
fp16 codes (``unsigned(16)``).

How the hardware reaches "exact result, rounded once":

* ``Fp16Mul``: the 11 x 11-bit significand product (22 bits; one DSP48E2) is exact; it is
  normalized by at most one place, and the bits below the kept 11 give the guard bit and a
  sticky bit for round-half-even.
* ``Fp16Add``: the operand of larger magnitude is found by an integer compare of the low 15
  bits (sign-magnitude codes order like integers); the smaller significand is shifted right
  by the exponent difference into three extra bits (guard, round, sticky -- the sticky ORs
  every bit shifted past it). With G, R and S an aligned add or subtract rounds correctly:
  a subtraction that cancels more than one leading bit only happens for exponent
  differences <= 1, where no bit was lost to the sticky.

The rounding rules' building blocks are shared with every element-wise block (fp16 and the
fp32 reductions) rather than copied: ``leading_zeros`` (a priority encoder),
``round_normalized`` (RNE of a significand whose leading one is at one of its top two bits)
and ``pack`` (flush, saturate, pack a code of either format).
"""

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from trilut.config import no_memory
from trilut.hdl.elementwise.lanes import FixedLatency, int_in_range
from trilut.models import fp16 as fp

__all__ = ["Fp16Mul", "Fp16Add", "IntToFp16"]

_MANT = fp.FP16.mantissa_bits               # 10
_BIAS = fp.FP16.bias                        # 15


def leading_zeros(m: Module, value, name: str) -> Signal:
    """Combinational count of leading zeros of ``value`` (``len(value)`` when zero)."""
    width = len(value)
    count = Signal(range(width + 1), name=name, init=width)
    for i in range(width):          # later (higher) bits win: a priority encoder
        with m.If(value[i]):
            m.d.comb += count.eq(width - 1 - i)
    return count


def pack(m: Module, y, fmt: fp.FloatFormat, *, sign, exponent, rounded, zero):
    """Drive code ``y`` of ``fmt`` (fp16 or fp32) from a rounded result: a signed biased
    ``exponent`` and the rounded significand ``rounded`` (hidden bit included). The rules of
    ``models.fp16``: flush below exponent 1, saturate above the largest finite exponent
    ``2 * bias``; ``zero`` forces a signed zero."""
    mant = fmt.mantissa_bits
    with m.If(zero | (exponent < 1)):
        m.d.comb += y.eq(Cat(Const(0, fmt.width - 1), sign))
    with m.Elif(exponent > 2 * fmt.bias):
        m.d.comb += y.eq(Cat(Const(fmt.max_code, fmt.width - 1), sign))
    with m.Else():
        m.d.comb += y.eq(Cat(rounded[:mant], exponent[:fmt.exponent_bits], sign))


def round_normalized(m: Module, value, precision: int, name: str):
    """RNE of ``value`` (leading one at its top bit or the one below) to ``precision`` bits.

    Returns ``(rounded, top)``: ``rounded`` has ``precision + 1`` bits (bit ``precision`` set
    when the round carried out, the mantissa bits then zero) and ``top`` is the leading-one
    position's offset (1 when it is the top bit). The exponent grows by ``top + carry``.
    """
    width = len(value)
    top = value[width - 1]
    kept = Signal(precision, name=f"{name}_kept")
    guard = Signal(name=f"{name}_guard")
    sticky = Signal(name=f"{name}_sticky")
    low = width - precision             # first kept bit when the top bit leads
    with m.If(top):
        m.d.comb += [kept.eq(value[low:width]), guard.eq(value[low - 1]),
                     sticky.eq(value[:low - 1].any() if low > 1 else 0)]
    with m.Else():
        m.d.comb += [kept.eq(value[low - 1:width - 1]), guard.eq(value[low - 2]),
                     sticky.eq(value[:low - 2].any() if low > 2 else 0)]
    rounded = Signal(precision + 1, name=f"{name}_rounded")
    m.d.comb += rounded.eq(kept + (guard & (sticky | kept[0])))
    return rounded, top


class Fp16Mul(FixedLatency, wiring.Component):
    """Combinational fp16 multiply: ``y = round(a * b)`` (``models.fp16.fp16_mul``).

    Zero product sign is ``a.sign ^ b.sign``. Latency 0; one 11 x 11 multiplier.
    """

    a: In(unsigned(16))
    b: In(unsigned(16))
    y: Out(unsigned(16))

    latency = 0

    def elaborate(self, platform):
        m = Module()
        a, b = self.a, self.b
        sign = a[15] ^ b[15]
        ea, eb = a[_MANT:15], b[_MANT:15]
        zero_in = (ea == 0) | (eb == 0)          # zero or subnormal (flushed)
        product = Signal(22)
        m.d.comb += product.eq(Cat(a[:_MANT], 1) * Cat(b[:_MANT], 1))   # in [2**20, 2**22)
        top = product[21]
        # Keep 11 bits below the leading one, then guard, then sticky.
        kept = Signal(11)
        guard = Signal()
        sticky = Signal()
        with m.If(top):
            m.d.comb += [kept.eq(product[11:22]), guard.eq(product[10]),
                         sticky.eq(product[:10].any())]
        with m.Else():
            m.d.comb += [kept.eq(product[10:21]), guard.eq(product[9]),
                         sticky.eq(product[:9].any())]
        rounded = Signal(12)
        m.d.comb += rounded.eq(kept + (guard & (sticky | kept[0])))
        exponent = Signal(signed(8))
        # rounded[11]: the round carried out (significand 2.0): exponent + 1, mantissa 0.
        m.d.comb += exponent.eq(ea + eb - _BIAS + top + rounded[11])
        pack(m, self.y, fp.FP16, sign=sign, exponent=exponent, rounded=rounded, zero=zero_in)
        return m

    def model(self, a, b) -> np.ndarray:
        return fp.fp16_mul(a, b)

    def memory_blocks(self) -> dict[str, float]:
        """None: one multiplier (a DSP48E2) and LUTs."""
        return no_memory()


class Fp16Add(FixedLatency, wiring.Component):
    """Combinational fp16 add: ``y = round(a + b)`` (``models.fp16.fp16_add``).

    An exact zero sum is +0 unless both operands are (flushed) negative zeros. Latency 0.
    """

    a: In(unsigned(16))
    b: In(unsigned(16))
    y: Out(unsigned(16))

    latency = 0

    def elaborate(self, platform):
        m = Module()
        # Flush subnormal operands to zero (sign kept).
        mag_a = Mux(self.a[_MANT:15] == 0, 0, self.a[:15])
        mag_b = Mux(self.b[_MANT:15] == 0, 0, self.b[:15])
        sign_a, sign_b = self.a[15], self.b[15]

        swap = Signal()
        m.d.comb += swap.eq(mag_b > mag_a)
        big, small = Signal(15), Signal(15)
        sign_big = Signal()
        m.d.comb += [
            big.eq(Mux(swap, mag_b, mag_a)),
            small.eq(Mux(swap, mag_a, mag_b)),
            sign_big.eq(Mux(swap, sign_b, sign_a)),
        ]
        exp_big, exp_small = big[_MANT:15], small[_MANT:15]
        sig_big = Mux(exp_big == 0, 0, Cat(big[:_MANT], 1))
        sig_small = Mux(exp_small == 0, 0, Cat(small[:_MANT], 1))

        # Align: the small significand, times 2**(3 - d), as 14 bits plus a sticky bit. A
        # shift beyond 15 moves every bit into the sticky, same as 15.
        diff = Signal(5)
        m.d.comb += diff.eq(exp_big - exp_small)
        shift = Mux(diff > 15, 15, diff)
        wide = Signal(27)
        m.d.comb += wide.eq(Cat(Const(0, 16), sig_small) >> shift)
        aligned = Signal(14)
        m.d.comb += aligned.eq(Cat(wide[13] | wide[:13].any(), wide[14:27]))

        subtract = sign_a ^ sign_b
        total = Signal(15)                        # |big| >= |small|: never negative
        m.d.comb += total.eq(Mux(subtract, Cat(Const(0, 3), sig_big) - aligned,
                                 Cat(Const(0, 3), sig_big) + aligned))

        # Normalize to a 14-bit value with the leading one at bit 13: shift right by one
        # after a carry (folding the lost bit into the sticky), else left by the leading
        # zeros (only > 1 after a cancellation, when the low bits are exact).
        norm = Signal(14)
        exponent = Signal(signed(8))
        lz = leading_zeros(m, total[:14], "leading_zeros")
        with m.If(total[14]):
            m.d.comb += [norm.eq(Cat(total[1] | total[0], total[2:15])),
                         exponent.eq(exp_big + 1)]
        with m.Else():
            m.d.comb += [norm.eq(total[:14] << lz), exponent.eq(exp_big - lz)]
        kept = norm[3:14]
        guard = norm[2]
        sticky = norm[:2].any()
        rounded = Signal(12)
        m.d.comb += rounded.eq(kept + (guard & (sticky | kept[0])))
        final_exponent = Signal(signed(8))
        m.d.comb += final_exponent.eq(exponent + rounded[11])

        zero_sum = total == 0
        sign = Mux(zero_sum, sign_a & sign_b, sign_big)
        pack(m, self.y, fp.FP16, sign=sign, exponent=final_exponent, rounded=rounded,
             zero=zero_sum)
        return m

    def model(self, a, b) -> np.ndarray:
        return fp.fp16_add(a, b)

    def memory_blocks(self) -> dict[str, float]:
        """None: LUTs and carries."""
        return no_memory()


class IntToFp16(FixedLatency, wiring.Component):
    """Combinational signed integer -> fp16: ``y = round(value)`` (``int_to_fp16``).

    ``width`` is the two's-complement input width (the TLMM accumulator's, 22 for kv260);
    magnitudes of 65520 and more saturate to +-65504. Latency 0.
    """

    def __init__(self, width: int):
        int_in_range("width", width, 2, 64)
        self.width = width
        super().__init__({"value": In(signed(width)), "y": Out(unsigned(16))})

    latency = 0

    def elaborate(self, platform):
        m = Module()
        w = self.width
        sign = self.value[w - 1]
        magnitude = Signal(w)                     # |-2**(w-1)| fits w unsigned bits
        m.d.comb += magnitude.eq(Mux(sign, -self.value, self.value))
        lz = leading_zeros(m, magnitude, "leading_zeros")
        # Left-align the leading one at bit w-1, then keep 11 bits, a guard and a sticky.
        aligned = Signal(max(w, 13))
        m.d.comb += aligned.eq(magnitude << lz << max(0, 13 - w))
        top = len(aligned)
        kept = aligned[top - 11:top]
        guard = aligned[top - 12]
        sticky = aligned[:top - 12].any() if top > 12 else Const(0)
        rounded = Signal(12)
        m.d.comb += rounded.eq(kept + (guard & (sticky | kept[0])))
        exponent = Signal(signed(9))
        m.d.comb += exponent.eq(_BIAS + (w - 1) - lz + rounded[11])
        pack(m, self.y, fp.FP16, sign=sign, exponent=exponent, rounded=rounded,
             zero=magnitude == 0)
        return m

    def model(self, value) -> np.ndarray:
        return fp.int_to_fp16(np.asarray(value, dtype=np.int64))

    def memory_blocks(self) -> dict[str, float]:
        """None: LUTs and carries."""
        return no_memory()
