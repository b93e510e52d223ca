"""The fp32 adder of RMSNorm's reduction, and the static schedule of its pairwise tree.

``Fp32AddNonNegative`` adds non-negative fp32 codes in two pipeline stages; ``RmsNorm`` runs
one per lane to accumulate the squares and ``RmsScale`` runs one through ``tree_schedule``'s
pairwise tree. Numerics are ``trilut.models.fp16.ElementwiseArithmetic(FP32)`` bit for bit.
"""

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from trilut.config import no_memory
from trilut.hdl.elementwise.fp16 import pack
from trilut.hdl.elementwise.lanes import FixedLatency
from trilut.models import fp16 as fp

__all__ = ["ADD_LATENCY", "Fp32AddNonNegative", "tree_schedule"]

_FP32 = fp.FP32
_FP32_ARITH = fp.ElementwiseArithmetic(fp.FP32)

#: Latency of ``Fp32AddNonNegative``: operands in one cycle, sum out the next.
ADD_LATENCY = 1


class Fp32AddNonNegative(FixedLatency, wiring.Component):
    """``y = round32(a + b)`` for non-negative fp32 codes, split over two pipeline stages.

    Every operand of RMSNorm's reduction is a square or a sum of squares (or eps), so the
    adder needs no subtraction, no cancellation and no leading-zero count: align the smaller
    significand with guard, round and sticky bits, add, shift right by at most one, round.
    Subnormal operands read as zero; overflow saturates to the fp32 maximum (trilut's rules).

    Latency 1: the aligned sum is registered (stage A: compare, shift, add; stage B:
    normalize, round, pack). At 250 MHz one fp32 add does not fit a 4 ns cycle, which is why
    ``RmsNorm`` keeps two partial sums per lane (``partials = 2 L``): each is updated every
    other cycle, matching this two-stage loop. ``y`` follows ``a``/``b`` of the cycle before.
    """

    a: In(unsigned(32))
    b: In(unsigned(32))
    y: Out(unsigned(32))

    latency = ADD_LATENCY

    def elaborate(self, platform):
        m = Module()
        mant = _FP32.mantissa_bits                   # 23
        mag_a = Mux(self.a[mant:31] == 0, 0, self.a[:31])
        mag_b = Mux(self.b[mant:31] == 0, 0, self.b[:31])
        big, small = Signal(31), Signal(31)
        m.d.comb += [big.eq(Mux(mag_b > mag_a, mag_b, mag_a)),
                     small.eq(Mux(mag_b > mag_a, mag_a, mag_b))]
        exp_big, exp_small = big[mant:31], small[mant:31]
        sig_big = Mux(exp_big == 0, 0, Cat(big[:mant], 1))
        sig_small = Mux(exp_small == 0, 0, Cat(small[:mant], 1))
        diff = Signal(8)
        m.d.comb += diff.eq(exp_big - exp_small)
        # The small significand times 2**(3 - diff): 27 bits, the last a sticky bit. A shift of
        # 27 or more moves every bit into the sticky.
        wide = Signal(51)
        m.d.comb += wide.eq(Cat(Const(0, 27), sig_small) >> Mux(diff > 27, 27, diff))
        aligned = Cat(wide[24] | wide[:24].any(), wide[25:51])
        total = Signal(28)
        exponent = Signal(8)
        m.d.sync += [total.eq(Cat(Const(0, 3), sig_big) + aligned), exponent.eq(exp_big)]

        # Stage B. Unless both are zero, total >= 2**26 (the big significand alone).
        norm = Signal(27)
        norm_exp = Signal(signed(10))
        with m.If(total[27]):
            m.d.comb += [norm.eq(Cat(total[1] | total[0], total[2:28])),
                         norm_exp.eq(exponent + 1)]
        with m.Else():
            m.d.comb += [norm.eq(total[:27]), norm_exp.eq(exponent)]
        rounded = Signal(25)
        m.d.comb += rounded.eq(norm[3:27] + (norm[2] & (norm[:2].any() | norm[3])))
        final_exp = Signal(signed(10))
        m.d.comb += final_exp.eq(norm_exp + rounded[24])
        pack(m, self.y, _FP32, sign=Const(0), exponent=final_exp, rounded=rounded,
              zero=total == 0)
        return m

    def model(self, a, b) -> np.ndarray:
        """fp32 codes -> ``round32(a + b)`` codes (``ElementwiseArithmetic(FP32).add``)."""
        return _FP32.encode(_FP32_ARITH.add(_FP32.decode(a), _FP32.decode(b)))

    def memory_blocks(self) -> dict[str, float]:
        """None: LUTs, carries and the stage register."""
        return no_memory()


def tree_schedule(partials: int, latency: int = ADD_LATENCY + 1):
    """Static schedule of the pairwise tree of ``sum_of_squares(partials=P)`` on one adder.

    Level by level, ``(0+1), (2+3), ...`` with an odd one out moving up unchanged (a register
    renaming, no add). An add is issued per cycle when its operands are ready; a sum can be
    used ``latency`` cycles after its add was issued. Returns ``(ops, final, steps)``:
    ``ops`` is a list of ``(step, a, b, dst)`` register indices, ``final`` the register that
    holds the total after ``steps`` cycles.
    """
    ready = {i: 0 for i in range(partials)}
    level = list(range(partials))
    ops = []
    step = -1
    while len(level) > 1:
        nxt = []
        for i in range(len(level) // 2):
            a, b = level[2 * i], level[2 * i + 1]
            step = max(step + 1, ready[a], ready[b])
            ops.append((step, a, b, a))             # the sum replaces its left operand
            ready[a] = step + latency
            nxt.append(a)
        nxt += level[2 * (len(level) // 2):]
        level = nxt
    steps = (step + latency) if ops else 0
    return ops, level[0], steps

