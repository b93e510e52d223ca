"""``2**x`` of the softmax (``Exp2Neg``), bit-exact with ``models.attention.exp2_neg``.

Pipelining convention (``latency``, ``en``, registered ``y``): ``hdl/attention/fp32.py``.
"""

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from trilut.config import memory_blocks
from trilut.hdl.attention.fp32 import enable_port, load_stage
from trilut.hdl.elementwise.lanes import FixedLatency
from trilut.models import attention as att
from trilut.models import fp16 as fp

__all__ = ["Exp2Neg", "exp2_rom"]


_FRACTION = att.EXP2_FRACTION_BITS                 # 10: X has 10 fraction bits
_MANT32 = fp.FP32.mantissa_bits                    # 23
#: |x| >= 2**4 gives X >= 16 * 1024, n >= 16: every such result flushes (n > 14 always does).
_FLUSH_EXPONENT = fp.FP32.bias + 4


def exp2_rom() -> list[int]:
    """The ROM's 11-bit words: ``T[k] - 1024`` for ``T = exp2_table()``. ``T[k]`` is in
    1025 .. 2047 for ``k > 0`` (the fp16 mantissa in bits 0-9, bit 10 clear) and 2048 for
    ``k = 0`` (word 1024: mantissa 0, bit 10 the exponent's increment)."""
    words = att.exp2_table() - (1 << fp.FP16.mantissa_bits)
    assert words.min() >= 0 and words.max() < 1 << (fp.FP16.mantissa_bits + 1)
    return [int(w) for w in words]


class Exp2Neg(FixedLatency, wiring.Component):
    """``y``: the fp16 code of ``exp2_neg(x)`` for an fp32 code ``x <= 0``.

    ``X = rne(|x| * 2**10)`` (fixed point, 10 fraction bits), ``n = X >> 10``, ``k = X &
    1023``: ``2**x ~ T[k] * 2**(-11 - n)``, an fp16 number with mantissa ``T[k] - 1024`` and
    biased exponent ``14 - n`` (``15 - n`` when ``k = 0``, ``T[0] = 2048``), flushed to +0 below
    2**-14 (``n > 13``, or ``n > 14`` when ``k = 0``). No multiplier.

    The table is a 1024 x 11-bit ROM, ``amaranth.lib.memory.Memory`` with ``init`` and a
    synchronous read port: it maps to one RAMB18E2 (1024 x 18 mode), and its read register is
    the pipeline register between the address and the exponent assembly. As LUTs the same ROM
    costs about 200 (11 outputs of a 10-input function: 16 LUT6 and the F7/F8 muxes each), and
    an attention unit needs only one or two exp2s (one per score), so the half BRAM36 is the
    cheaper of the two; a distributed ROM's read would also need its own register stage.

    ``latency`` 3, one result per cycle:

    1. the fixed-point conversion: ``|x|``'s significand shifted right by ``140 - e`` (10 ..
       25, clamped: every larger shift gives 0), guard and sticky, the round-half-even
       increment (a barrel shift, three levels, and the 15-bit carry chain); ``|x| >= 16``
       marks the result for flushing (its fixed point is not needed);
    2. the ROM read at ``k``; beside it the biased exponent ``14 - n + (k == 0)`` and the
       flush decision;
    3. pack the fp16 code (one LUT level).

    The sign bit of ``x`` is not read: the softmax only ever passes ``x = t - m <= 0`` (or
    ``m_old - m_new``), and a positive ``x`` gives ``exp2_neg(-x)``. A subnormal ``x`` reads
    as zero (``2**0 = 1``), and the all-ones exponent (never produced) as an ordinary binade,
    which flushes.
    """

    x: In(unsigned(32))
    en: enable_port(3)
    y: Out(unsigned(16))

    latency = 3

    def elaborate(self, platform):
        m = Module()
        en, x = self.en, self.x
        m.submodules.rom = rom = Memory(shape=unsigned(_FRACTION + 1), depth=1 << _FRACTION,
                                        init=exp2_rom())
        read = rom.read_port(domain="sync")

        # Stage 1: X = rne(M * 2**(e - 140)), M = the 24-bit significand, e the biased exponent.
        exponent = x[_MANT32:31]
        significand = Cat(x[:_MANT32], exponent != 0)
        shift = Signal(range(16))                          # (140 - e) - 10, clamped to 15
        m.d.comb += shift.eq(Mux(exponent <= 130 - 15, 15, 130 - exponent))
        # 15 zero bits below M: after the shift, the integer part is bits 25..38.
        shifted = Signal(39)
        m.d.comb += shifted.eq(Cat(Const(0, 15), significand) >> shift)
        integer, guard, sticky = shifted[25:39], shifted[24], shifted[:24].any()
        s1_fixed = Signal(15, name="s1_fixed")             # X <= 2**14 when |x| < 16
        s1_big = Signal(name="s1_big")                     # |x| >= 16: flush
        load_stage(m, en[0],
               s1_fixed.eq(integer + (guard & (sticky | integer[0]))),
               s1_big.eq(exponent >= _FLUSH_EXPONENT))

        # Stage 2: the table (the read port's register is this stage's), exponent, flush.
        n = s1_fixed[_FRACTION:]
        k_zero = s1_fixed[:_FRACTION] == 0
        m.d.comb += [read.addr.eq(s1_fixed[:_FRACTION]), read.en.eq(en[1])]
        s2_exp = Signal(5, name="s2_exp")
        s2_flush = Signal(name="s2_flush")
        load_stage(m, en[1],
               s2_exp.eq(14 - n + k_zero),
               s2_flush.eq(s1_big | (n > 13 + k_zero)))

        # Stage 3: pack. Bit 10 of the word is already in the exponent (k = 0).
        load_stage(m, en[2], self.y.eq(Mux(s2_flush, 0, Cat(read.data[:_FRACTION], s2_exp, 0))))
        return m

    def model(self, x) -> np.ndarray:
        """fp32 codes of values ``<= 0`` -> fp16 codes of ``exp2_neg``."""
        return fp.FP16.encode(att.exp2_neg(fp.FP32.decode(x)))

    def memory_blocks(self) -> dict[str, float]:
        """The 1024 x 11-bit ROM: one RAMB18E2, 0.5 BRAM36 (docs/attention_arith.md)."""
        return memory_blocks(_FRACTION + 1, 1 << _FRACTION)
