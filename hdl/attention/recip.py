"""The softmax's normalising reciprocal (``Recip32``), bit-exact with
``models.attention.recip_fp32``.

Pipelining convention (``latency``, ``en``, registered ``y``): ``hdl/attention/fp32.py``.
"""

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from trilut.config import no_memory
from trilut.hdl.attention.fp32 import enable_port, load_stage
from trilut.hdl.elementwise.lanes import FixedLatency
from trilut.models import attention as att
from trilut.models import fp16 as fp

__all__ = ["Recip32", "NEWTON_CORRECTION_BITS"]

_MANT = fp.FP32.mantissa_bits                      # 23
_INDEX = att.RECIP_INDEX_BITS                      # 7
_Q = att.RECIP_FRACTION_BITS                       # 18
#: Width of the signed Newton correction ``E = 2**18 - T``: ``|E| <= 1020`` over every
#: mantissa (checked exhaustively by the tests), so 12 bits hold it and ``Y0 * E`` is one
#: DSP48E2 multiply (18 x 12 bits) instead of an 18 x 19-bit one.
NEWTON_CORRECTION_BITS = 12


class Recip32(FixedLatency, wiring.Component):
    """``y = recip_fp32(v)`` on an fp32 code ``v > 0``, in the integers of its docstring.

    With ``M = 2**23 + f`` and ``Y0 = table[f >> 16]`` (18 bits, ``2**17 < Y0 < 2**18``)::

        T  = (M * Y0) >> 23          = ((M << 17) + M * (Y0 - 2**17)) >> 23
        Y1 = (Y0 * (2**19 - T)) >> 18 = Y0 + ((Y0 * E) >> 18),  E = 2**18 - T (signed)

    Splitting off ``Y0``'s top bit and ``2**18`` makes both multiplies fit one DSP48E2 each
    (24 x 17 and 18 x 12 bits; the added terms are the post-adder's ``C`` input). ``Y1`` is in
    ``[2**16, 2**18)``: the result's significand is ``Y1`` normalised by a one-place mux,
    its biased exponent ``253 - e`` (``252 - e`` when ``Y1 < 2**17``), flushed to +0 below 1
    (``v`` from 2**126 up, or from 2**125 when ``Y1 < 2**17``). Nothing saturates: the largest
    result is below 2**126.

    The 128 x 18-bit table is a LUT ROM (``Memory`` with a combinational read port: 18 outputs
    of a 7-input function, two LUT6 and a MUXF7 each); a RAMB18 would be mostly empty.

    ``latency`` 7, one result per cycle: (1) the table lookup; (2) ``M * (Y0 - 2**17)`` into
    the first DSP's M register; (3) ``+ (M << 17)`` into its P register; (4) ``E`` (a 12-bit
    subtract, registered as the second DSP's A input); (5) ``Y0 * E`` into its M register;
    (6) ``Y1`` into its P register; (7) normalise and pack. The reciprocal runs once per
    query row, so its latency costs nothing in throughput.

    The sign bit of ``v`` is not read (``1/|v|``; the softmax's ``l`` is at least 1). A zero
    or subnormal ``v``, which ``recip_fp32`` refuses, gives the fp32 maximum (as
    ``rsqrt_fp32`` does for 0). The all-ones exponent (never produced) flushes to +0, as the
    model's saturated value does.
    """

    v: In(unsigned(32))
    en: enable_port(7)
    y: Out(unsigned(32))

    latency = 7

    def elaborate(self, platform):
        m = Module()
        en, v = self.en, self.v
        m.submodules.table = table = Memory(
            shape=unsigned(_Q), depth=1 << _INDEX,
            init=[int(t) for t in att.recip_table()])
        lookup = table.read_port(domain="comb")
        exponent = v[_MANT:31]

        # Stage 1: the table.
        m.d.comb += lookup.addr.eq(v[_MANT - _INDEX:_MANT])
        s1_y0 = Signal(_Q, name="s1_y0")
        s1_m = Signal(_MANT + 1, name="s1_m")
        s1_exp = Signal(8, name="s1_exp")
        load_stage(m, en[0], s1_y0.eq(lookup.data), s1_m.eq(Cat(v[:_MANT], 1)),
               s1_exp.eq(exponent))

        # Stages 2, 3: T = (M * Y0) >> 23.
        s2_low = Signal(_MANT + _Q, name="s2_low")        # M * (Y0 - 2**17): 41 bits
        s2_m = Signal(_MANT + 1, name="s2_m")
        s2_y0 = Signal(_Q, name="s2_y0")
        s2_exp = Signal(8, name="s2_exp")
        load_stage(m, en[1], s2_low.eq(s1_m * s1_y0[:_Q - 1]), s2_m.eq(s1_m), s2_y0.eq(s1_y0),
               s2_exp.eq(s1_exp))
        s3_p = Signal(_MANT + 1 + _Q, name="s3_p")        # M * Y0: 42 bits
        s3_y0 = Signal(_Q, name="s3_y0")
        s3_exp = Signal(8, name="s3_exp")
        load_stage(m, en[2], s3_p.eq(s2_low + (s2_m << (_Q - 1))), s3_y0.eq(s2_y0),
               s3_exp.eq(s2_exp))

        # Stage 4: E = 2**18 - T, modulo 2**12 (|E| <= 1020).
        t_low = s3_p[_MANT:_MANT + NEWTON_CORRECTION_BITS]
        s4_e = Signal(signed(NEWTON_CORRECTION_BITS), name="s4_e")
        s4_y0 = Signal(_Q, name="s4_y0")
        s4_exp = Signal(8, name="s4_exp")
        load_stage(m, en[3], s4_e.eq(-t_low), s4_y0.eq(s3_y0), s4_exp.eq(s3_exp))

        # Stages 5, 6: Y1 = Y0 + ((Y0 * E) >> 18), the >> an arithmetic (floor) shift.
        s5_prod = Signal(signed(_Q + NEWTON_CORRECTION_BITS + 1), name="s5_prod")
        s5_y0 = Signal(_Q, name="s5_y0")
        s5_exp = Signal(8, name="s5_exp")
        load_stage(m, en[4], s5_prod.eq(s4_y0 * s4_e), s5_y0.eq(s4_y0), s5_exp.eq(s4_exp))
        s6_y1 = Signal(_Q, name="s6_y1")                  # in [2**16, 2**18)
        s6_exp = Signal(8, name="s6_exp")
        load_stage(m, en[5], s6_y1.eq(s5_y0 + (s5_prod >> _Q)), s6_exp.eq(s5_exp))

        # Stage 7: normalise by one place, exponent, flush, pack.
        top = s6_y1[_Q - 1]
        mant = Mux(top, Cat(Const(0, 6), s6_y1[:_Q - 1]), Cat(Const(0, 7), s6_y1[:_Q - 2]))
        biased = Signal(signed(10))
        m.d.comb += biased.eq(252 + top - s6_exp)
        code = Mux(s6_exp == 0, fp.FP32.max_code,
                   Mux(biased < 1, 0, Cat(mant, biased[:8], 0)))
        load_stage(m, en[6], self.y.eq(code))
        return m

    def model(self, v) -> np.ndarray:
        """fp32 codes of positive values -> fp32 codes of ``recip_fp32``."""
        return fp.FP32.encode(att.recip_fp32(fp.FP32.decode(v)))

    def memory_blocks(self) -> dict[str, float]:
        """None: the 128 x 18 table is read combinationally, so it is LUTs (two LUT6 and a
        MUXF7 a bit); docs/attention_arith.md."""
        return no_memory()
