"""The fp32 arithmetic of the attention units, bit-exact with ``models/attention.py``.

``Fp32Add`` (signed add: the scores' adder tree, ``l``, ``o``, ``m - t``), ``Fp32Mul``
(``dot * C``, ``l * c``, ``o * c``) and ``Fp16ToFp32Product`` (the exact ``q_i k_i`` and
``p v_i``). The rules are ``models/fp16.py``'s for fp32: round to nearest even, subnormal
inputs read as zero of their sign, results below 2**-126 flush to zero of their sign, results
above the largest finite number saturate to it, an exact zero sum is +0 except (-0) + (-0),
a product's sign is the XOR of the signs (zeros included). No NaN or Inf is made; a code with
the all-ones exponent (never produced) reads as an ordinary binade, as the models decode it.

Pipelining (every block of ``hdl/attention``'s arithmetic, docs/attention_arith.md): a block
of ``latency`` L has L register stages, and its output ``y`` is the last stage's register
(nothing combinational after it, so blocks chain without adding to a stage's path). Port
``en`` (L bits, all ones when left unconnected) is a clock enable per stage: on a clock edge
with ``en[s]`` high, stage ``s + 1`` loads (stage 1 samples the operands); a stage whose enable
is low holds. With every enable high, operands applied before edge ``e`` appear on ``y`` after
edge ``e + L - 1``, one result per cycle. A stream unit drives ``en`` from its
``lanes.Pipeline`` (``Cat(*pipe.take)``, per stage, with bubbles squeezed out) or from one
global stall (``ce.replicate(L)``).

The timing budget for 250 MHz on UltraScale+ is about one carry chain (24 - 31 bits) and three
LUT levels, or five LUT levels, between registers (4 ns less clock-to-out, setup and skew; a
LUT with its net about 0.45 ns). A DSP48E2 multiply is one stage into its M register; the
partial products' sum (cascade or post-adder) is a second, into its P register.
"""

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from trilut.config import no_memory
from trilut.hdl.elementwise.fp16 import leading_zeros, pack, round_normalized
from trilut.hdl.elementwise.lanes import FixedLatency
from trilut.models import fp16 as fp

__all__ = ["enable_port", "load_stage", "Fp32Add", "Fp32Mul", "Fp16ToFp32Product"]

_FP32 = fp.FP32
_FP32_ARITH = fp.ElementwiseArithmetic(fp.FP32)
_MANT = _FP32.mantissa_bits                      # 23
_BIAS = _FP32.bias                               # 127


def enable_port(latency: int):
    """The per-stage clock enables of a block with ``latency`` register stages: ``latency``
    bits, all ones when nothing drives them (a free-running pipeline)."""
    return In(unsigned(latency), init=(1 << latency) - 1)


def load_stage(m: Module, enable, *assignments) -> None:
    """Register ``assignments`` (``target.eq(value)`` statements) when ``enable`` is high."""
    with m.If(enable):
        m.d.sync += list(assignments)


class Fp32Add(FixedLatency, wiring.Component):
    """``y = round32(a + b)`` on fp32 codes, either sign (``ElementwiseArithmetic(FP32).add``).

    Subtraction is an addition with the second operand's sign bit flipped. ``latency`` 5, one
    result per cycle; no DSP. The stages (each within the budget above):

    1. flush subnormal operands; compare the magnitudes (an integer compare of the low 31
       bits: sign-magnitude codes order like integers); swap so that ``big >= small``; the
       exponent difference, clamped to 27 (one carry chain, two LUT levels);
    2. align the small significand into 27 bits (3 below the big one's last: guard, round,
       sticky), the sticky from a mask of the difference (the ``diff >= j + 3`` thermometer,
       in parallel with the shifter, not after it); add or subtract (three LUT levels and the
       28-bit carry chain);
    3. count the leading zeros of the 28-bit total and detect an exact zero (a priority
       encoder, three levels);
    4. normalize (right by one after a carry, folding the lost bit into the sticky, else left
       by the leading zeros -- more than one only after a cancellation, which happens only
       for exponent differences <= 1, when no bit went into the sticky) and round to nearest
       even (a barrel shift, three levels, and the 24-bit increment);
    5. the round's carry into the exponent, flush below exponent 1, saturate above 254, the
       sign of an exact zero, pack (two levels).

    An exact zero sum is +0 unless both operands are negative zeros (subnormals included).
    """

    a: In(unsigned(32))
    b: In(unsigned(32))
    en: enable_port(5)
    y: Out(unsigned(32))

    latency = 5

    def elaborate(self, platform):
        m = Module()
        en = self.en
        a, b = self.a, self.b

        # Stage 1: flush, compare, swap, exponent difference.
        exp_a, exp_b = a[_MANT:31], b[_MANT:31]
        mag_a = Mux(exp_a == 0, 0, a[:31])
        mag_b = Mux(exp_b == 0, 0, b[:31])
        swap = Signal()
        m.d.comb += swap.eq(mag_b > mag_a)
        big, small = Signal(31), Signal(31)
        m.d.comb += [big.eq(Mux(swap, mag_b, mag_a)), small.eq(Mux(swap, mag_a, mag_b))]
        # Both differences at once, picked by the compare: no subtract after the swap.
        diff = Signal(8)
        m.d.comb += diff.eq(Mux(swap, exp_b - exp_a, exp_a - exp_b))
        s1_big = Signal(24, name="s1_big")                 # significands, hidden bit included
        s1_small = Signal(24, name="s1_small")
        s1_diff = Signal(range(28), name="s1_diff")
        s1_exp = Signal(8, name="s1_exp")
        s1_sub = Signal(name="s1_subtract")
        s1_sign = Signal(name="s1_sign")                   # the result's sign unless zero
        s1_zero_sign = Signal(name="s1_zero_sign")         # an exact zero's: (-0) + (-0) only
        load_stage(m, en[0],
               s1_big.eq(Cat(big[:_MANT], big[_MANT:] != 0)),
               s1_small.eq(Cat(small[:_MANT], small[_MANT:] != 0)),
               s1_diff.eq(Mux(diff > 27, 27, diff)),
               s1_exp.eq(big[_MANT:]),
               s1_sub.eq(a[31] ^ b[31]),
               s1_sign.eq(Mux(swap, b[31], a[31])),
               s1_zero_sign.eq(a[31] & b[31]))

        # Stage 2: align (small * 2**(3 - diff), bit 0 the sticky), add or subtract.
        upper = Signal(26)
        m.d.comb += upper.eq(Cat(Const(0, 2), s1_small) >> s1_diff)
        # Bit j of the small significand lands at 3 + j - diff; at 0 or below it is sticky.
        mask = Cat(*[s1_diff >= j + 3 for j in range(24)])
        aligned = Cat((s1_small & mask).any(), upper)
        base = Cat(Const(0, 3), s1_big)
        s2_total = Signal(28, name="s2_total")             # |big| >= |small|: never negative
        s2_exp = Signal(8, name="s2_exp")
        s2_sign, s2_zero_sign = Signal(name="s2_sign"), Signal(name="s2_zero_sign")
        load_stage(m, en[1],
               s2_total.eq(Mux(s1_sub, base - aligned, base + aligned)),
               s2_exp.eq(s1_exp), s2_sign.eq(s1_sign), s2_zero_sign.eq(s1_zero_sign))

        # Stage 3: leading zeros below the carry bit, exact zero.
        lz = leading_zeros(m, s2_total[:27], "leading_zeros")
        s3_total = Signal(28, name="s3_total")
        s3_lz = Signal(range(28), name="s3_lz")
        s3_exp = Signal(8, name="s3_exp")
        s3_zero = Signal(name="s3_zero")
        s3_sign = Signal(name="s3_sign")
        load_stage(m, en[2],
               s3_total.eq(s2_total), s3_lz.eq(lz), s3_exp.eq(s2_exp),
               s3_zero.eq(s2_total == 0),
               s3_sign.eq(Mux(s2_total == 0, s2_zero_sign, s2_sign)))

        # Stage 4: normalize to 27 bits with the leading one at bit 26, round.
        norm = Signal(27)
        norm_exp = Signal(signed(10))
        with m.If(s3_total[27]):
            m.d.comb += [norm.eq(Cat(s3_total[1] | s3_total[0], s3_total[2:28])),
                         norm_exp.eq(s3_exp + 1)]
        with m.Else():
            m.d.comb += [norm.eq(s3_total[:27] << s3_lz), norm_exp.eq(s3_exp - s3_lz)]
        s4_rounded = Signal(25, name="s4_rounded")
        s4_exp = Signal(signed(10), name="s4_exp")
        s4_zero, s4_sign = Signal(name="s4_zero"), Signal(name="s4_sign")
        load_stage(m, en[3],
               s4_rounded.eq(norm[3:27] + (norm[2] & (norm[:2].any() | norm[3]))),
               s4_exp.eq(norm_exp), s4_zero.eq(s3_zero), s4_sign.eq(s3_sign))

        # Stage 5: the round's carry, flush / saturate, pack.
        final_exp = Signal(signed(10))
        m.d.comb += final_exp.eq(s4_exp + s4_rounded[24])
        code = Signal(32)
        pack(m, code, _FP32, sign=s4_sign, exponent=final_exp, rounded=s4_rounded, zero=s4_zero)
        load_stage(m, en[4], self.y.eq(code))
        return m

    def model(self, a, b) -> np.ndarray:
        """fp32 codes -> ``round32(a + b)`` codes."""
        return _FP32.encode(_FP32_ARITH.add(_FP32.decode(a), _FP32.decode(b)))

    def memory_blocks(self) -> dict[str, float]:
        """None: LUTs, carries and stage registers (docs/attention_arith.md)."""
        return no_memory()


class Fp32Mul(FixedLatency, wiring.Component):
    """``y = round32(a * b)`` on fp32 codes (``ElementwiseArithmetic(FP32).mul``).

    ``latency`` 4, one result per cycle, one 24 x 24-bit significand multiply (yosys and
    Vivado split it over two DSP48E2s: a 27 x 18 signed multiplier takes 26 x 17 unsigned
    bits). The stages:

    1. the significand product into the DSPs' M registers; the sign, the exponent sum and
       the zero flag (a subnormal operand reads as zero) beside it;
    2. the partial products summed (the second DSP's cascade adder) into its P register;
    3. normalize by at most one place (the product of two significands in [1, 2) is in
       [1, 4)) and round to nearest even (a mux, the sticky OR tree beside it, and the
       24-bit increment);
    4. the round's carry into the exponent, flush below exponent 1, saturate above 254,
       pack. A zero product is a zero of the XOR of the signs.

    ``output`` (keyword, default ``FP32``) is the result's format: with ``FP16``, ``y`` is
    the fp16 code of ``FP16.round(a * b)``, the exact 48-bit product rounded *once* to 11
    bits (the softmax's ``round16(o * (1/l))``; rounding to fp32 first and then to fp16 is
    not the same: a 24-bit significand that rounds up to fp32's half-ulp tie of fp16 rounds
    to even the second time). The same stages and DSPs; stage 3 keeps 11 bits and the
    exponent is rebiased for fp16 (flush below 2**-14, saturate at 65504, after rounding).
    """

    latency = 4

    def __init__(self, *, output: fp.FloatFormat = fp.FP32):
        if output is not fp.FP32 and output is not fp.FP16:
            raise ValueError(f"Fp32Mul's output must be models.fp16.FP32 or FP16, not "
                             f"{output!r}")
        self.output = output
        super().__init__({
            "a": In(unsigned(32)),
            "b": In(unsigned(32)),
            "en": enable_port(self.latency),
            "y": Out(unsigned(output.width)),
        })

    def elaborate(self, platform):
        m = Module()
        en = self.en
        a, b = self.a, self.b
        out = self.output
        exp_a, exp_b = a[_MANT:31], b[_MANT:31]
        s1_product = Signal(48, name="s1_product")
        s1_exp = Signal(signed(10), name="s1_exp")          # biased; fp32 -127 .. 383
        s1_sign, s1_zero = Signal(name="s1_sign"), Signal(name="s1_zero")
        load_stage(m, en[0],
               s1_product.eq(Cat(a[:_MANT], exp_a != 0) * Cat(b[:_MANT], exp_b != 0)),
               # The product's exponent, biased for the output format.
               s1_exp.eq(exp_a + exp_b - _BIAS - (_BIAS - out.bias)),
               s1_sign.eq(a[31] ^ b[31]),
               s1_zero.eq((exp_a == 0) | (exp_b == 0)))

        s2_product = Signal(48, name="s2_product")
        s2_exp = Signal(signed(10), name="s2_exp")
        s2_sign, s2_zero = Signal(name="s2_sign"), Signal(name="s2_zero")
        load_stage(m, en[1], s2_product.eq(s1_product), s2_exp.eq(s1_exp),
               s2_sign.eq(s1_sign), s2_zero.eq(s1_zero))

        # The product is in [2**46, 2**48) unless an operand is zero.
        rounded, top = round_normalized(m, s2_product, out.precision, "round")
        s3_rounded = Signal(out.precision + 1, name="s3_rounded")
        s3_exp = Signal(signed(10), name="s3_exp")
        s3_sign, s3_zero = Signal(name="s3_sign"), Signal(name="s3_zero")
        load_stage(m, en[2], s3_rounded.eq(rounded), s3_exp.eq(s2_exp + top),
               s3_sign.eq(s2_sign), s3_zero.eq(s2_zero))

        final_exp = Signal(signed(11))
        m.d.comb += final_exp.eq(s3_exp + s3_rounded[out.precision])
        code = Signal(out.width)
        pack(m, code, out, sign=s3_sign, exponent=final_exp, rounded=s3_rounded,
             zero=s3_zero)
        load_stage(m, en[3], self.y.eq(code))
        return m

    def model(self, a, b) -> np.ndarray:
        """fp32 codes -> codes of ``a * b`` rounded once to the output format (the float64
        product of two fp32 values is exact)."""
        if self.output is fp.FP16:
            return fp.FP16.encode(fp.FP16.round(_FP32.decode(a) * _FP32.decode(b)))
        return _FP32.encode(_FP32_ARITH.mul(_FP32.decode(a), _FP32.decode(b)))

    def memory_blocks(self) -> dict[str, float]:
        """None: two DSP48E2 and stage registers (docs/attention_arith.md)."""
        return no_memory()


class Fp16ToFp32Product(FixedLatency, wiring.Component):
    """``y``: the fp32 code of the exact product of fp16 codes ``a`` and ``b`` (the product
    terms of ``models.attention.fp32_dot``: ``q_i k_i``, and ``p v_i`` of the softmax).

    Two 11-bit significands give 22 bits, which fp32's 24 hold: no rounding. The exponent
    stays in fp32's normal range (2**-28 up to 2**34 with exponent-31 codes), so nothing
    flushes or saturates; a subnormal fp16 operand reads as zero, and a zero product is a
    zero of the XOR of the signs.

    ``latency`` 2, one result per cycle, one DSP48E2 (11 x 11 bits):

    1. the significand product into the DSP's M register; sign, exponent sum, zero flag;
    2. normalize by at most one place (a mux), add it to the exponent, pack (the DSP's
       ALU passes M through without its P register; two LUT levels after it).
    """

    a: In(unsigned(16))
    b: In(unsigned(16))
    en: enable_port(2)
    y: Out(unsigned(32))

    latency = 2

    def elaborate(self, platform):
        m = Module()
        en = self.en
        a, b = self.a, self.b
        mant16 = fp.FP16.mantissa_bits                     # 10
        exp_a, exp_b = a[mant16:15], b[mant16:15]
        s1_product = Signal(22, name="s1_product")
        s1_exp = Signal(8, name="s1_exp")                  # fp32 biased, before normalizing
        s1_sign, s1_zero = Signal(name="s1_sign"), Signal(name="s1_zero")
        load_stage(m, en[0],
               s1_product.eq(Cat(a[:mant16], 1) * Cat(b[:mant16], 1)),
               # (ea - 15) + (eb - 15) + 127: 99 .. 159 for normal operands.
               s1_exp.eq(exp_a + exp_b + (_BIAS - 2 * fp.FP16.bias)),
               s1_sign.eq(a[15] ^ b[15]),
               s1_zero.eq((exp_a == 0) | (exp_b == 0)))

        top = s1_product[21]
        mant = Mux(top, Cat(Const(0, 2), s1_product[:21]), Cat(Const(0, 3), s1_product[:20]))
        code = Mux(s1_zero, Cat(Const(0, 31), s1_sign),
                   Cat(mant, (s1_exp + top)[:8], s1_sign))
        load_stage(m, en[1], self.y.eq(code))
        return m

    def model(self, a, b) -> np.ndarray:
        """fp16 codes -> fp32 codes of their exact product (rounding it changes nothing)."""
        exact = fp.FP16.decode(a) * fp.FP16.decode(b)
        return _FP32.encode(_FP32.round(exact))

    def memory_blocks(self) -> dict[str, float]:
        """None: one DSP48E2 and stage registers (docs/attention_arith.md)."""
        return no_memory()
