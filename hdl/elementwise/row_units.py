"""Row-level fused element-wise units: RMSNorm and the int8 activation quantizer.

Both units need a whole row before they can emit its first element (the sum of squares, the
absmax), so both buffer the row in an ``amaranth.lib.memory.Memory`` and make two passes: the
first takes the row in and reduces it, the second reads it back and scales it. The buffer has
two banks, so the first pass of the next row overlaps the second pass of this one.

Lane convention: fp16 values move as streams of ``L`` lanes per beat (payload
``data.ArrayLayout(unsigned(16), L)`` of fp16 codes, lane 0 = the lowest element). A row of
``n`` elements is ``ceil(n / L)`` beats; lanes at and beyond ``n`` in the last beat are ignored
on input and sent as +0 on output. ``n`` (1 <= n <= max_n) is a shape input that must be held
constant while any row is in flight, like the TLMM engine's ``k_blocks``.

Numerics are those of ``trilut.models.fp16`` bit for bit; each unit's ``model()`` calls it.
docs/row_units.md gives the protocol, latency, buffering and resources.
"""

import math

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from trilut.config import EngineConfig
from trilut.hdl.elementwise.fp16 import Fp16Mul, leading_zeros
from trilut.models import fp16 as fp
from trilut.models import numerics

__all__ = ["Fp32AddNonNegative", "RmsScale", "RmsNorm", "ActQuantizer", "quant_reciprocal_table",
           "TILES_WIDTH"]

_FP32 = fp.FP32
_FP32_ARITH = fp.ElementwiseArithmetic(fp.FP32)
_FP32_BIAS = _FP32.bias                     # 127
_FP16_BIAS = fp.FP16.bias                   # 15

#: Width of ``ActQuantizer.tiles``: up to 255 output tiles per matmul (kv260: a 4096-column
#: tile, so 255 tiles cover a 1M-wide output).
TILES_WIDTH = 8

#: Latency of ``Fp32AddNonNegative``: operands in one cycle, sum out the next.
ADD_LATENCY = 1

#: Quotient bits of the ``1/n`` divider: 24 significand bits, a guard bit, and the leading bit
#: that is set only when ``n`` is a power of two.
_RECIP_QUOTIENT_BITS = 26


def _positive_int(name: str, value, *, at_most: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    if at_most is not None and value > at_most:
        raise ValueError(f"{name} must be at most {at_most}, not {value!r}")


def _lanes(lanes: int) -> data.ArrayLayout:
    return data.ArrayLayout(unsigned(16), lanes)


def _round_normalized(m: Module, value, precision: int, name: str):
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


def _pack(m: Module, y, fmt: fp.FloatFormat, *, sign, exponent, rounded, zero):
    """Drive code ``y`` of ``fmt`` from a signed biased ``exponent`` and a rounded significand
    (hidden bit included): flush below 1, saturate above the largest finite exponent."""
    mant = fmt.mantissa_bits
    with m.If(zero | (exponent < 1)):
        m.d.comb += y.eq(Cat(Const(0, fmt.width - 1), sign))
    with m.Elif(exponent > 2 * fmt.bias):
        m.d.comb += y.eq(Cat(Const(fmt.max_code, fmt.width - 1), sign))
    with m.Else():
        m.d.comb += y.eq(Cat(rounded[:mant], exponent[:fmt.exponent_bits], sign))


# ============================================================================================
# fp32 arithmetic for the reductions


class Fp32AddNonNegative(wiring.Component):
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
        _pack(m, self.y, _FP32, sign=Const(0), exponent=final_exp, rounded=rounded,
              zero=total == 0)
        return m

    def model(self, a, b) -> np.ndarray:
        """fp32 codes -> ``round32(a + b)`` codes (``ElementwiseArithmetic(FP32).add``)."""
        return _FP32.encode(_FP32_ARITH.add(_FP32.decode(a), _FP32.decode(b)))


def _tree_schedule(partials: int, latency: int = ADD_LATENCY + 1):
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


# ============================================================================================
# RMSNorm


class RmsScale(wiring.Component):
    """Per-row scalar of RMSNorm: the partial sums of squares -> ``r = rsqrt_fp32(v)``.

    ``inp``: one beat per row, ``{partials: P fp32 codes, n}``. ``out``: one beat per row,
    ``{y1, rk}`` with ``r = y1 * 2**(rk - 17)`` (``y1`` the 18-bit Newton result of
    ``models.fp16.rsqrt_fp32``, always in ``[2**17, 2**18)``; ``rk = -1 - E2/2``).

    Sequence, all sequential on one fp32 adder and one 25 x 24 multiplier (once per row, off
    the element path)::

        ssq  = pairwise tree over the P partials          (the adder, _tree_schedule)
        rn   = round32(1 / n)                             (restoring divider, in parallel)
        mean = round32(ssq * rn)                          (the multiplier)
        v    = round32(mean + round32(eps))               (the adder)
        Y0 = table[...]; S = Y0*Y0 >> 18; T = M*S >> 23; Y1 = Y0*(3<<18 - T) >> 19

    Latency from the ``inp`` transfer to ``out.valid``: ``latency`` cycles (constant).
    """

    def __init__(self, *, partials: int, n_width: int, eps: float):
        _positive_int("partials", partials)
        _positive_int("n_width", n_width, at_most=24)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (
                math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be a finite non-negative number, not {eps!r}")
        self.partials = partials
        self.n_width = n_width
        self.eps = float(eps)
        self.eps_code = int(_FP32.from_float(self.eps))
        self._ops, self._final, self._tree_steps = _tree_schedule(partials)
        super().__init__({
            "inp": In(stream.Signature(data.StructLayout({
                "partials": data.ArrayLayout(unsigned(32), partials),
                "n": unsigned(n_width)}))),
            "out": Out(stream.Signature(data.StructLayout({
                "y1": unsigned(fp.RSQRT_FRACTION_BITS), "rk": signed(8)}))),
        })

    @property
    def latency(self) -> int:
        """Cycles from the ``inp`` transfer to ``out.valid`` (the FSM's fixed path)."""
        # After the transfer cycle the tree takes `tree_steps` cycles and, beside it, the
        # divider one per quotient bit; MEAN0 follows both, then MEAN1..RS6 (10 states), then
        # DONE raises out.valid.
        return max(self._tree_steps, _RECIP_QUOTIENT_BITS) + 12

    def elaborate(self, platform):
        m = Module()
        P, nw = self.partials, self.n_width
        q_bits = fp.RSQRT_FRACTION_BITS                  # 18

        regs = [Signal(32, name=f"partial{i}") for i in range(P)]
        m.submodules.adder = adder = Fp32AddNonNegative()
        m.submodules.rsqrt_table = table = Memory(
            shape=unsigned(q_bits), depth=1 << fp.RSQRT_INDEX_BITS,
            init=[int(v) for v in fp.rsqrt_table()])
        table_rd = table.read_port()

        # ---- the shared multiplier: operands registered, product registered (2 cycles) ----
        mul_a = Signal(25)
        mul_b = Signal(24)
        mul_p = Signal(49)
        m.d.sync += mul_p.eq(mul_a * mul_b)

        # ---- round32(1 / n): normalize n, then one quotient bit per cycle -----------------
        n_in = self.inp.payload.n
        lz = leading_zeros(m, n_in, "n_leading_zeros")
        div_d = Signal(nw)
        div_r = Signal(nw + 1)
        div_q = Signal(_RECIP_QUOTIENT_BITS)
        div_lz = Signal(range(nw + 1))
        div_count = Signal(range(_RECIP_QUOTIENT_BITS + 1))
        with m.If(div_count != 0):
            bit = div_r >= div_d
            m.d.sync += [div_r.eq(Mux(bit, div_r - div_d, div_r) << 1),
                         div_q.eq(Cat(bit, div_q[:-1])),
                         div_count.eq(div_count - 1)]
        # 1/n = 2**(lz - nw + 1) * q / 2**25; q = 2**25 exactly when n is a power of two.
        recip_rounded = Signal(25)
        m.d.comb += recip_rounded.eq(div_q[1:25] + (div_q[0] & ((div_r != 0) | div_q[1])))
        recip_sig = Signal(24)
        recip_exp = Signal(signed(10))
        with m.If(div_q[25]):
            m.d.comb += [recip_sig.eq(1 << 23),
                         recip_exp.eq(_FP32_BIAS - nw + 1 + div_lz)]
        with m.Else():
            m.d.comb += [recip_sig.eq(Mux(recip_rounded[24], 1 << 23, recip_rounded[:24])),
                         recip_exp.eq(_FP32_BIAS - nw + div_lz + recip_rounded[24])]

        ssq = regs[self._final]
        ssq_exp = ssq[23:31]
        step = Signal(range(max(self._tree_steps, 1) + 1))
        mean_exp = Signal(signed(11))
        mean_zero = Signal()
        v = Signal(32)
        y0 = Signal(q_bits)
        out_y1 = Signal(q_bits)
        out_rk = Signal(signed(8))
        m.d.comb += [self.out.payload.y1.eq(out_y1), self.out.payload.rk.eq(out_rk)]

        # rsqrt operands of v (models.fp16.rsqrt_fp32): v = 1.f * 2**e, p = e & 1.
        v_biased, v_frac = v[23:31], v[:23]
        parity = ~v_biased[0]                       # e = biased - 127
        m_fixed = Signal(25)
        m.d.comb += m_fixed.eq(Cat(v_frac, 1) << parity)
        half_e2 = Signal(signed(10))
        m.d.comb += half_e2.eq((v_biased - _FP32_BIAS - parity).as_signed() >> 1)

        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += self.inp.ready.eq(1)
                with m.If(self.inp.valid):
                    m.d.sync += [regs[i].eq(self.inp.payload.partials[i]) for i in range(P)]
                    m.d.sync += [div_d.eq(n_in << lz), div_r.eq(1 << (nw - 1)), div_q.eq(0),
                                 div_lz.eq(lz), div_count.eq(_RECIP_QUOTIENT_BITS), step.eq(0)]
                    m.next = "TREE" if self._tree_steps else "MEAN0"
            if self._tree_steps:
                with m.State("TREE"):
                    m.d.sync += step.eq(step + 1)
                    with m.Switch(step):
                        for s in range(self._tree_steps):
                            with m.Case(s):
                                for op_step, a, b, _dst in self._ops:
                                    if op_step == s:
                                        m.d.comb += [adder.a.eq(regs[a]), adder.b.eq(regs[b])]
                                for op_step, _a, _b, dst in self._ops:
                                    if op_step + ADD_LATENCY == s:
                                        m.d.sync += regs[dst].eq(adder.y)
                    with m.If(step == self._tree_steps - 1):
                        m.next = "MEAN0"
            with m.State("MEAN0"):
                with m.If(div_count == 0):
                    m.d.sync += [mul_a.eq(Mux(ssq_exp == 0, 0, Cat(ssq[:23], 1))),
                                 mul_b.eq(recip_sig),
                                 mean_exp.eq(ssq_exp + recip_exp - _FP32_BIAS),
                                 mean_zero.eq(ssq_exp == 0)]
                    m.next = "MEAN1"
            with m.State("MEAN1"):
                m.next = "MEAN2"
            with m.State("MEAN2"):
                # mean = round32(ssq * rn), then the adder takes mean + eps.
                rounded, top = _round_normalized(m, mul_p[:48], 24, "mean")
                mean = Signal(32)
                exp = Signal(signed(12))
                m.d.comb += exp.eq(mean_exp + top + rounded[24])
                _pack(m, mean, _FP32, sign=Const(0), exponent=exp, rounded=rounded,
                      zero=mean_zero)
                m.d.comb += [adder.a.eq(mean), adder.b.eq(self.eps_code)]
                m.next = "ADD1"
            with m.State("ADD1"):
                m.d.sync += v.eq(adder.y)
                y = adder.y
                m.d.comb += table_rd.addr.eq(Cat(y[16:23], ~y[23]))   # p << 7 | f >> 16
                m.next = "RS0"
            with m.State("RS0"):
                m.d.sync += [y0.eq(table_rd.data), mul_a.eq(table_rd.data),
                             mul_b.eq(table_rd.data)]
                m.next = "RS1"
            with m.State("RS1"):
                m.next = "RS2"
            with m.State("RS2"):                      # S = Y0*Y0 >> 18
                m.d.sync += [mul_a.eq(m_fixed), mul_b.eq(mul_p >> q_bits)]
                m.next = "RS3"
            with m.State("RS3"):
                m.next = "RS4"
            with m.State("RS4"):                      # T = M*S >> 23
                m.d.sync += [mul_a.eq(y0), mul_b.eq((3 << q_bits) - (mul_p >> 23))]
                m.next = "RS5"
            with m.State("RS5"):
                m.next = "RS6"
            with m.State("RS6"):                      # Y1 = Y0*(3 - T) >> 19
                m.d.sync += [out_y1.eq(mul_p >> (q_bits + 1)), out_rk.eq(-1 - half_e2)]
                m.next = "DONE"
            with m.State("DONE"):
                m.d.comb += self.out.valid.eq(1)
                with m.If(self.out.ready):
                    m.next = "IDLE"
        return m


class RmsNorm(wiring.Component):
    """RMSNorm over rows of fp16 lanes (``models.fp16.fp16_rmsnorm(x, w, eps, partials=2L)``).

    Streams (``amaranth.lib.stream``; a beat moves on a clock edge where valid and ready are
    both high):

    * ``x`` in: the row, ``ceil(n/L)`` beats of ``L`` fp16 codes.
    * ``weight`` in: the norm weights, the same beats, one row per ``x`` row. They are taken
      in the second pass, beat for beat with the output.
    * ``y`` out: ``round(round(x_i * r) * w_i)``, ``ceil(n/L)`` beats per row; lanes past
      ``n`` are +0.
    * ``n``: elements per row, 1..max_n, constant while any row is in flight.

    Passes:

    1. ``x`` beats are written to the row buffer at one beat per cycle while each lane squares
       its element (exact in fp32) and adds it into one of two partial sums, alternating per
       beat: partial ``j`` of ``sum_of_squares(partials=2L)`` is lane ``j mod L`` of the
       even (``j < L``) or odd beats. ``Fp32AddNonNegative`` takes two cycles, so each
       partial sum is updated every other cycle.
    2. ``RmsScale`` reduces the 2L partials with the model's pairwise tree and computes
       ``r`` (``RmsScale.latency`` cycles).
    3. The row is read back, one beat per cycle: ``x*r`` (11 x 18 bits, exact), rounded to
       fp16, times the weight (``Fp16Mul``).

    Two banks: the next row's pass 1 runs during this row's scale and pass 2. Between rows,
    ``x`` idles 2 cycles while the last partial sums drain into ``RmsScale``. Latency of
    pass 2: a beat leaves 4 cycles after its read is issued. ``expected_cycles`` gives the
    exact count without stalls.
    """

    def __init__(self, *, lanes: int, max_n: int, eps: float = 1e-5):
        _positive_int("lanes", lanes, at_most=256)
        _positive_int("max_n", max_n, at_most=1 << 20)
        self.lanes = lanes
        self.max_n = max_n
        self.partials = numerics.rmsnorm_partials(lanes)
        self.words = -(-max_n // lanes)                 # buffer words per bank
        self.n_width = max_n.bit_length()
        self.scale = RmsScale(partials=self.partials, n_width=self.n_width, eps=eps)
        self.eps = self.scale.eps
        super().__init__({
            "x": In(stream.Signature(_lanes(lanes))),
            "weight": In(stream.Signature(_lanes(lanes))),
            "y": Out(stream.Signature(_lanes(lanes))),
            "n": In(unsigned(self.n_width)),
        })

    def elaborate(self, platform):
        m = Module()
        L, Wd = self.lanes, self.words
        e_shape = range(self.max_n + L + 1)
        m.submodules.scale = scale = self.scale
        m.submodules.buffer = buf = Memory(shape=_lanes(L), depth=2 * Wd, init=[])
        wr = buf.write_port()
        rd = buf.read_port()
        n = self.n

        used = Signal(range(3))                 # banks holding a row (front start .. back end)
        used_inc = Signal()
        used_dec = Signal()
        m.d.sync += used.eq(used + used_inc - used_dec)

        # ---- pass 1: buffer, square, accumulate ------------------------------------------
        f_active = Signal()                     # between the first and the last beat of a row
        f_pending = Signal()                    # row taken, partials not yet handed on
        f_e = Signal(e_shape)                   # element index of the next beat
        f_word = Signal(range(Wd + 1))
        f_bank = Signal()
        f_two = Signal()                        # the row had a second beat (odd partials)
        q_valid, q_bank, q_first = Signal(), Signal(), Signal()
        a_valid, a_bank = Signal(), Signal()
        squares = [Signal(32, name=f"square{l}") for l in range(L)]
        acc = [[Signal(32, name=f"acc{b}_{l}") for l in range(L)] for b in range(2)]

        handoff = Signal()
        m.d.comb += [
            scale.inp.valid.eq(f_pending & ~q_valid & ~a_valid),
            handoff.eq(scale.inp.valid & scale.inp.ready),
            scale.inp.payload.n.eq(n),
            *(scale.inp.payload.partials[l].eq(acc[0][l]) for l in range(L)),
            *(scale.inp.payload.partials[L + l].eq(Mux(f_two, acc[1][l], 0)) for l in range(L)),
        ]
        with m.If(handoff):
            m.d.sync += f_pending.eq(0)

        start_ok = ~f_active & (~f_pending | handoff) & (used < 2)
        take = Signal()
        last = f_e + L >= n
        m.d.comb += [
            self.x.ready.eq(f_active | start_ok),
            take.eq(self.x.valid & self.x.ready),
            used_inc.eq(take & ~f_active),
            wr.addr.eq(Mux(f_bank, Wd + f_word, f_word)),
            wr.en.eq(take),
        ]
        for l in range(L):
            x = Signal(16, name=f"x{l}")
            m.d.comb += [x.eq(Mux(f_e + l < n, self.x.payload[l], 0)), wr.data[l].eq(x)]
            # x*x is exact in fp32: a 22-bit significand, a normal exponent.
            sq = Signal(22, name=f"x_sq{l}")
            m.d.comb += sq.eq(Cat(x[:10], 1) * Cat(x[:10], 1))
            top = sq[21]
            ex = x[10:15]
            code = Cat(Mux(top, sq[:21] << 2, sq[:20] << 3)[:23],
                       (2 * ex + (_FP32_BIAS - 2 * _FP16_BIAS) + top)[:8], 0)
            with m.If(take):
                m.d.sync += squares[l].eq(Mux(ex == 0, 0, code))
        with m.If(take):
            with m.If(last):
                m.d.sync += [f_active.eq(0), f_pending.eq(1), f_e.eq(0), f_word.eq(0),
                             f_bank.eq(~f_bank), f_two.eq(f_word != 0)]
            with m.Else():
                m.d.sync += [f_active.eq(1), f_e.eq(f_e + L), f_word.eq(f_word + 1)]
        m.d.sync += [q_valid.eq(take), q_bank.eq(f_word[0]), q_first.eq(f_word < 2),
                     a_valid.eq(q_valid), a_bank.eq(q_bank)]
        for l in range(L):
            adder = Fp32AddNonNegative()
            m.submodules[f"lane_adder{l}"] = adder
            m.d.comb += [adder.a.eq(Mux(q_first, 0, Mux(q_bank, acc[1][l], acc[0][l]))),
                         adder.b.eq(squares[l])]
            with m.If(a_valid):
                with m.If(a_bank):
                    m.d.sync += acc[1][l].eq(adder.y)
                with m.Else():
                    m.d.sync += acc[0][l].eq(adder.y)

        # ---- pass 2: read back, x*r, round, times the weight -------------------------------
        b_active = Signal()
        b_e = Signal(e_shape)
        b_word = Signal(range(Wd + 1))
        b_bank = Signal()
        b_y1 = Signal(fp.RSQRT_FRACTION_BITS)
        b_rk = Signal(signed(8))
        m.d.comb += scale.out.ready.eq(~b_active)
        with m.If(scale.out.valid & scale.out.ready):
            m.d.sync += [b_active.eq(1), b_y1.eq(scale.out.payload.y1),
                         b_rk.eq(scale.out.payload.rk)]

        o_valid = Signal()
        o_payload = Signal(_lanes(L))
        advance = ~o_valid | self.y.ready
        issue = Signal()
        b_last = b_e + L >= n
        m.d.comb += [
            issue.eq(b_active & self.weight.valid & advance),
            self.weight.ready.eq(b_active & advance),
            rd.addr.eq(Mux(b_bank, Wd + b_word, b_word)),
            rd.en.eq(advance),
            used_dec.eq(issue & b_last),
            self.y.valid.eq(o_valid),
            self.y.payload.eq(o_payload),
        ]
        with m.If(issue):
            with m.If(b_last):
                m.d.sync += [b_active.eq(0), b_e.eq(0), b_word.eq(0), b_bank.eq(~b_bank)]
            with m.Else():
                m.d.sync += [b_e.eq(b_e + L), b_word.eq(b_word + 1)]

        s1_valid, s2_valid, s3_valid = Signal(), Signal(), Signal()
        s1_mask, s2_mask, s3_mask = Signal(L), Signal(L), Signal(L)
        s1_w, s2_w, s3_w = Signal(_lanes(L)), Signal(_lanes(L)), Signal(_lanes(L))
        s1_y1 = Signal(fp.RSQRT_FRACTION_BITS)
        s1_rk, s2_rk = Signal(signed(8)), Signal(signed(8))
        s2_x = Signal(_lanes(L))
        s3_xr = Signal(_lanes(L))
        with m.If(advance):
            m.d.sync += [
                s1_valid.eq(issue), s2_valid.eq(s1_valid), s3_valid.eq(s2_valid),
                o_valid.eq(s3_valid),
                s1_mask.eq(Cat(b_e + l < n for l in range(L))),
                s2_mask.eq(s1_mask), s3_mask.eq(s2_mask),
                s1_w.eq(self.weight.payload), s2_w.eq(s1_w), s3_w.eq(s2_w),
                s1_y1.eq(b_y1), s1_rk.eq(b_rk), s2_rk.eq(s1_rk),
                s2_x.eq(rd.data),
            ]
        for l in range(L):
            # S1 -> S2: the exact product of the significands (one DSP48E2: 11 x 18).
            prod = Signal(29, name=f"xr_prod{l}")
            with m.If(advance):
                m.d.sync += prod.eq(Cat(rd.data[l][:10], 1) * s1_y1)
            # S2 -> S3: round(x * r) to fp16.
            x2 = s2_x[l]
            rounded, top = _round_normalized(m, prod, 11, f"xr{l}")
            exp = Signal(signed(10), name=f"xr_exp{l}")
            m.d.comb += exp.eq(x2[10:15] + s2_rk + top + rounded[11])
            xr = Signal(16, name=f"xr{l}")
            _pack(m, xr, fp.FP16, sign=x2[15], exponent=exp, rounded=rounded,
                  zero=x2[10:15] == 0)
            with m.If(advance):
                m.d.sync += s3_xr[l].eq(xr)
            # S3 -> out: times the weight.
            mul = Fp16Mul()
            m.submodules[f"weight_mul{l}"] = mul
            m.d.comb += [mul.a.eq(s3_xr[l]), mul.b.eq(s3_w[l])]
            with m.If(advance):
                m.d.sync += o_payload[l].eq(Mux(s3_mask[l], mul.y, 0))
        return m

    # ---- what it computes, how long it takes -------------------------------------------------

    def model(self, x, weight) -> np.ndarray:
        """fp16 codes ``x[rows, n]``, ``weight[rows, n]`` (or ``[n]``) -> output codes."""
        x = np.asarray(x, dtype=np.uint16)
        weight = np.broadcast_to(np.asarray(weight, dtype=np.uint16), x.shape)
        return fp.fp16_rmsnorm(x, weight, self.eps, partials=self.partials)

    def expected_cycles(self, n: int, rows: int = 1) -> int:
        """Cycles from the first ``x`` beat taken to the last ``y`` beat taken, inclusive, for
        ``rows`` rows of ``n`` elements with streams that never stall."""
        _positive_int("n", n, at_most=self.max_n)
        _positive_int("rows", rows)
        beats = -(-n // self.lanes)
        front_free = 0          # first cycle the front may take a new row's first beat
        scale_free = 0          # first cycle RmsScale can take a handoff
        back_free = 0           # first cycle the back can take a scale result
        back_done = []          # cycle of each row's last read issue
        last_out = 0
        for r in range(rows):
            # The front needs a free bank: the back's last read of row r-2 frees it.
            start = front_free if r < 2 else max(front_free, back_done[r - 2] + 1)
            t_last = start + beats - 1
            handoff = max(t_last + 3, scale_free)
            scale_done = handoff + self.scale.latency      # out.valid from this cycle
            take = max(scale_done, back_free)
            first_issue = take + 1
            last_issue = first_issue + beats - 1
            back_done.append(last_issue)
            last_out = last_issue + 4
            front_free = handoff                           # the new row may start then
            scale_free = take + 1
            back_free = last_issue + 1
        return last_out + 1


# ============================================================================================
# Activation quantizer


def quant_reciprocal_table() -> np.ndarray:
    """The 1024-entry ROM behind ``s = round32(127 / A)`` (``models.fp16`` quantize_int8):
    entry ``m`` is the fp32 code of ``round32(127 / (1 + m/1024))``. For ``A = (1 + m/1024) *
    2**E``, ``s`` is the entry with ``E`` subtracted from its exponent, exactly (the rounding
    does not depend on a power of two, and every ``s`` of a normal fp16 ``A`` is a normal
    fp32 number)."""
    mant = np.arange(1 << fp.FP16.mantissa_bits)
    a = 1.0 + mant / (1 << fp.FP16.mantissa_bits)
    return _FP32.from_float(numerics.ACT_MAX / a).astype(np.int64)


class ActQuantizer(wiring.Component):
    """Per-row absmax int8 quantization feeding the TLMM engine's ``acts`` stream.

    ``(codes, A) = models.fp16.fp16_quantize_int8(x)``; the ``acts`` stream is
    ``numerics.tlmm_act_beats(codes, ...)``: per row, ``tiles`` times, the codes in blocks of
    ``G*T`` int8, K zero-padded to a multiple of ``G*T``.

    Streams:

    * ``x`` in: the row, ``ceil(n/L)`` beats of ``L`` fp16 codes.
    * ``acts`` out: ``tiles * ceil(n / (G*T))`` beats per row of ``G*T`` signed int8
      (element 0 lowest), exactly what ``TlmmEngine.acts`` takes.
    * ``absmax`` out: one beat per row, A as an fp16 code (+0 for an all-zero row); sent when
      the row's second pass starts. It must be taken before the next row's pass 2 can start.
    * ``n`` (1..max_n) and ``tiles`` (1..255): constant while any row is in flight.

    Passes: (1) the row is buffered at one beat per cycle while a lane-max tree keeps the
    largest magnitude (an integer compare of the 15 magnitude bits, subnormals as zero);
    (2) ``s`` comes from ``quant_reciprocal_table`` (one BRAM read, an exponent subtract),
    then the row is read ``tiles`` times at one word per cycle: ``x*s`` exact (11 x 24 bits),
    ``rint`` half to even, clamp, into a gearbox that packs L codes per cycle into G*T-code
    beats. Two banks: the next row's pass 1 overlaps this row's pass 2.
    ``expected_cycles`` gives the exact count without stalls.
    """

    def __init__(self, cfg: EngineConfig, *, lanes: int, max_n: int):
        if not isinstance(cfg, EngineConfig):
            raise TypeError(f"cfg must be an EngineConfig, not {cfg!r}")
        _positive_int("lanes", lanes, at_most=256)
        _positive_int("max_n", max_n, at_most=1 << 20)
        self.cfg = cfg
        self.lanes = lanes
        self.max_n = max_n
        self.block = cfg.block_k
        self.words = -(-max_n // lanes)
        self.n_width = max_n.bit_length()
        super().__init__({
            "x": In(stream.Signature(_lanes(lanes))),
            "acts": Out(stream.Signature(data.ArrayLayout(signed(cfg.act_bits), cfg.block_k))),
            "absmax": Out(stream.Signature(unsigned(16))),
            "n": In(unsigned(self.n_width)),
            "tiles": In(unsigned(TILES_WIDTH)),
        })

    def elaborate(self, platform):
        m = Module()
        L, B, Wd = self.lanes, self.block, self.words
        g = math.gcd(L, B)
        slots = B + L - g                       # gearbox capacity, in codes
        e_shape = range(self.max_n + B + 2 * L + 1)
        n = self.n
        m.submodules.buffer = buf = Memory(shape=_lanes(L), depth=2 * Wd, init=[])
        wr = buf.write_port()
        rd = buf.read_port()
        m.submodules.reciprocal = recip = Memory(
            shape=unsigned(31), depth=1 << fp.FP16.mantissa_bits,
            init=[int(v) for v in quant_reciprocal_table()])
        recip_rd = recip.read_port()

        used = Signal(range(3))
        used_inc = Signal()
        used_dec = Signal()
        m.d.sync += used.eq(used + used_inc - used_dec)

        # ---- pass 1: buffer and absmax -----------------------------------------------------
        f_active = Signal()
        f_pending = Signal()
        f_e = Signal(e_shape)
        f_word = Signal(range(Wd + 1))
        f_bank = Signal()
        mags = [Signal(15, name=f"mag{l}") for l in range(L)]
        mag_valid, mag_first = Signal(), Signal()
        absmax = Signal(15)

        handoff = Signal()
        start_ok = ~f_active & (~f_pending | handoff) & (used < 2)
        take = Signal()
        last = f_e + L >= n
        m.d.comb += [
            self.x.ready.eq(f_active | start_ok),
            take.eq(self.x.valid & self.x.ready),
            used_inc.eq(take & ~f_active),
            wr.addr.eq(Mux(f_bank, Wd + f_word, f_word)),
            wr.en.eq(take),
        ]
        for l in range(L):
            x = Signal(16, name=f"x{l}")
            m.d.comb += [x.eq(Mux(f_e + l < n, self.x.payload[l], 0)), wr.data[l].eq(x)]
            with m.If(take):
                m.d.sync += mags[l].eq(Mux(x[10:15] == 0, 0, x[:15]))   # subnormals read 0
        with m.If(handoff):
            m.d.sync += f_pending.eq(0)          # (a row ending this cycle sets it again)
        with m.If(take):
            with m.If(last):
                m.d.sync += [f_active.eq(0), f_pending.eq(1), f_e.eq(0), f_word.eq(0),
                             f_bank.eq(~f_bank)]
            with m.Else():
                m.d.sync += [f_active.eq(1), f_e.eq(f_e + L), f_word.eq(f_word + 1)]
        m.d.sync += [mag_valid.eq(take), mag_first.eq(f_word == 0)]
        level = list(mags)
        while len(level) > 1:
            level = [Mux(level[i] > level[i + 1], level[i], level[i + 1])
                     if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)]
        lane_max = Signal(15)
        m.d.comb += lane_max.eq(level[0])
        with m.If(mag_valid):
            m.d.sync += absmax.eq(Mux(mag_first | (lane_max > absmax), lane_max, absmax))

        # ---- handoff: absmax out, s from the reciprocal ROM ---------------------------------
        a_valid = Signal()
        r_setup = Signal()                       # the cycle the ROM word arrives
        r_active = Signal()
        a_reg = Signal(15)
        m.d.comb += [
            handoff.eq(f_pending & ~mag_valid & ~r_setup & ~r_active &
                       (~a_valid | self.absmax.ready)),
            recip_rd.addr.eq(absmax[:10]),
            self.absmax.valid.eq(a_valid),
            self.absmax.payload.eq(a_reg),
        ]
        with m.If(self.absmax.ready):
            m.d.sync += a_valid.eq(0)
        with m.If(handoff):
            m.d.sync += [a_valid.eq(1), a_reg.eq(absmax), r_setup.eq(1)]

        # s = rom * 2**-(E_A): s_exp = rom_exp - (biased_A - 15). A = 0 gives s = 0.
        s_sig = Signal(24)
        s_exp = Signal(9)
        s_zero = Signal()
        with m.If(r_setup):
            m.d.sync += [r_setup.eq(0), r_active.eq(1),
                         s_sig.eq(Cat(recip_rd.data[:23], 1)),
                         s_exp.eq(recip_rd.data[23:31] - a_reg[10:15] + _FP16_BIAS),
                         s_zero.eq(a_reg[10:15] == 0)]

        # ---- pass 2: read the row `tiles` times ---------------------------------------------
        r_e = Signal(e_shape)                    # first element of the next word
        r_mod = Signal(range(B))                 # r_e mod B
        r_word = Signal(range(Wd + self.max_n + 1))
        r_rep = Signal(TILES_WIDTH)
        r_bank = Signal()
        # The rep ends with the word that covers the last G*T block: e' rounded down to a
        # multiple of B reaches n.
        next_e = r_e + L
        next_mod = Signal(range(2 * B))
        m.d.comb += next_mod.eq(r_mod + (L % B))
        wrapped = Signal(range(B))
        m.d.comb += wrapped.eq(Mux(next_mod >= B, next_mod - B, next_mod))
        word_last = (next_e - wrapped) >= n

        s1_valid, s2_valid, s3_valid = Signal(), Signal(), Signal()
        s1_mask = Signal(L)
        s1_sig, s1_exp, s1_zero = Signal(24), Signal(9), Signal()
        window = Signal(8 * slots)
        pending = Signal(range(slots + 1))
        beat_start = Signal(e_shape)             # first element of the next beat
        o_valid = Signal()
        o_payload = Signal(8 * B)
        o_free = ~o_valid | self.acts.ready
        emit = (pending >= B) & o_free
        beat_last = beat_start + B >= n
        after_emit = Signal(range(slots + 1))
        m.d.comb += after_emit.eq(Mux(emit, Mux(beat_last, 0, pending - B), pending))
        advance = ~s3_valid | (after_emit < B)

        issue = Signal()
        m.d.comb += [
            issue.eq(r_active & advance),
            rd.addr.eq(Mux(r_bank, Wd + r_word, r_word)),
            rd.en.eq(advance),
            used_dec.eq(issue & word_last & (r_rep + 1 >= self.tiles)),
        ]
        with m.If(issue):
            with m.If(word_last):
                m.d.sync += [r_e.eq(0), r_mod.eq(0), r_word.eq(0)]
                with m.If(r_rep + 1 >= self.tiles):
                    m.d.sync += [r_active.eq(0), r_rep.eq(0), r_bank.eq(~r_bank)]
                with m.Else():
                    m.d.sync += r_rep.eq(r_rep + 1)
            with m.Else():
                m.d.sync += [r_e.eq(next_e), r_mod.eq(wrapped), r_word.eq(r_word + 1)]

        with m.If(advance):
            m.d.sync += [s1_valid.eq(issue), s2_valid.eq(s1_valid), s3_valid.eq(s2_valid),
                         s1_mask.eq(Cat(r_e + l < n for l in range(L))),
                         s1_sig.eq(s_sig), s1_exp.eq(s_exp), s1_zero.eq(s_zero)]
        s3_codes = Signal(8 * L)
        for l in range(L):
            x = rd.data[l]
            ex = x[10:15]
            # S1 -> S2: x*s exact (one DSP48E2: 11 x 24 bits) and its binary point.
            prod = Signal(35, name=f"xs{l}")
            shift = Signal(signed(10), name=f"xs_shift{l}")
            neg, zero = Signal(name=f"xs_neg{l}"), Signal(name=f"xs_zero{l}")
            with m.If(advance):
                # x*s = prod * 2**-shift, shift = 175 - ex - s_exp (25 + 150 fraction bits).
                m.d.sync += [prod.eq(Cat(x[:10], 1) * s1_sig),
                             shift.eq(10 + 15 + 23 + _FP32_BIAS - ex - s1_exp),
                             neg.eq(x[15]), zero.eq((ex == 0) | s1_zero | ~s1_mask[l])]
            # S2 -> S3: rint half to even, clamp. prod is in [2**33, 2**35): a shift of 26 or
            # less gives |x*s| >= 128 (clamped), 36 or more gives < 0.5 (zero).
            aligned = Signal(43, name=f"xs_aligned{l}")
            m.d.comb += aligned.eq(Cat(Const(0, 8), prod) >> (shift - 27)[:4])
            integer = aligned[35:43]
            guard = aligned[34]
            sticky = aligned[:34].any()
            mag = Signal(9, name=f"q_mag{l}")
            m.d.comb += mag.eq(integer + (guard & (sticky | integer[0])))
            saturate = (shift <= 26) | (mag > Mux(neg, 128, 127))
            limit = Mux(neg, 128, 127)
            q = Signal(signed(8), name=f"q{l}")
            m.d.comb += q.eq(Mux(zero | (shift >= 36), 0,
                                 Mux(neg, -Mux(saturate, limit, mag), Mux(saturate, limit, mag))))
            with m.If(advance):
                m.d.sync += s3_codes[8 * l:8 * l + 8].eq(q)

        # ---- gearbox: L codes in per word, G*T codes out per beat ---------------------------
        # The unsent codes are the top `pending` slots of `window`; a word shifts in at the top.
        # A beat starts at slot slots - pending; pending is a multiple of gcd(L, B).
        accept = s3_valid & advance
        with m.If(emit):
            with m.Switch(pending):
                for p in range(B, slots + 1, g):
                    with m.Case(p):
                        lo = slots - p
                        m.d.sync += o_payload.eq(window[8 * lo:8 * (lo + B)])
            m.d.sync += [o_valid.eq(1), beat_start.eq(Mux(beat_last, 0, beat_start + B))]
        with m.Elif(self.acts.ready):
            m.d.sync += o_valid.eq(0)
        with m.If(accept):
            m.d.sync += [window.eq(Cat(window[8 * L:], s3_codes)), pending.eq(after_emit + L)]
        with m.Else():
            m.d.sync += pending.eq(after_emit)
        m.d.comb += [self.acts.valid.eq(o_valid), self.acts.payload.as_value().eq(o_payload)]
        return m

    # ---- what it computes, how long it takes -------------------------------------------------

    def tiles_for(self, n_out: int) -> int:
        """The ``tiles`` input for a matmul with ``n_out`` output columns: the engine's output
        tiles of ``C * D`` columns (``numerics.tlmm_act_beats`` re-sends a row per tile)."""
        _positive_int("n_out", n_out)
        groups = self.cfg.padded_n(n_out) // self.cfg.columns_per_cycle
        return -(-groups // self.cfg.accumulator_depth)

    def model(self, x, n_out: int) -> tuple[list[int], np.ndarray]:
        """fp16 codes ``x[rows, n]`` -> ``(acts beats, absmax codes[rows])`` for a matmul with
        ``n_out`` output columns: ``numerics.tlmm_act_beats`` of ``fp16_quantize_int8``."""
        codes, absmax = fp.fp16_quantize_int8(np.asarray(x, dtype=np.uint16))
        cfg = self.cfg
        beats = numerics.tlmm_act_beats(codes, cfg.code, cfg.tables_per_step,
                                        cfg.columns_per_cycle, cfg.accumulator_depth, n_out)
        return beats, absmax[:, 0]

    def expected_cycles(self, n: int, rows: int = 1, tiles: int = 1) -> int:
        """Cycles from the first ``x`` beat taken to the last ``acts`` beat taken, inclusive,
        for ``rows`` rows of ``n`` elements sent ``tiles`` times, streams never stalling.

        A replay of the control alone (no data), cycle by cycle: with ``G*T >= L`` the
        gearbox never fills and the row's words stream at one per cycle; with ``G*T < L`` it
        is bound by one ``acts`` beat per cycle and stalls the read pipeline.
        """
        _positive_int("n", n, at_most=self.max_n)
        _positive_int("rows", rows)
        _positive_int("tiles", tiles, at_most=(1 << TILES_WIDTH) - 1)
        L, B = self.lanes, self.block
        beats_in = -(-n // L)
        k_beats = -(-n // B)
        words = tiles * -(-k_beats * B // L)      # words read per row, all reps
        f_rows = f_beat = 0
        f_active = f_pending = mag_valid = r_setup = r_active = False
        used = issued = pending = beat_in_rep = beats_out = 0
        pipe = [False, False, False]              # S1, S2, S3 valid
        cycle = last_out = 0
        while beats_out < rows * tiles * k_beats:
            handoff = f_pending and not mag_valid and not r_setup and not r_active
            take = f_active or (f_rows < rows and (not f_pending or handoff) and used < 2)
            emit = pending >= B
            after = (0 if beat_in_rep == k_beats - 1 else pending - B) if emit else pending
            advance = not pipe[2] or after < B
            issue = r_active and advance
            row_read = issue and issued == words - 1
            # -- the clock edge --
            used += (take and not f_active) - row_read
            if handoff:
                f_pending = False
            if take:
                f_beat += 1
                f_active = f_beat < beats_in
                if not f_active:
                    f_beat, f_rows, f_pending = 0, f_rows + 1, True
            mag_valid = take
            r_active = (r_active or r_setup) and not row_read
            r_setup = handoff
            issued = 0 if row_read else issued + issue
            if emit:
                beats_out += 1
                beat_in_rep = 0 if beat_in_rep == k_beats - 1 else beat_in_rep + 1
                last_out = cycle + 1
            pending = after + L if pipe[2] and advance else after
            if advance:
                pipe = [issue, pipe[0], pipe[1]]
            cycle += 1
        return last_out + 1
