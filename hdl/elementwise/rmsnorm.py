"""RMSNorm over rows of fp16 lanes: ``RmsScale`` (the per-row scalar) and ``RmsNorm``.

RMSNorm needs a whole row before it can emit its first element (the sum of squares), so it
makes two passes over the row, kept in the two-bank ``RowBuffer`` (``row_buffer.py``): the
first takes the row in and reduces it, the second reads it back and scales it, and the
next row's first pass overlaps this row's second.

Lane convention (``lanes.py``): a row of ``n`` elements is ``ceil(n / L)`` beats of
``lane_layout(L)``; lanes at and beyond ``n`` in the last beat are ignored on input and sent
as +0 on output. ``n`` (1 <= n <= max_n) is a shape input that must be held constant while
any row is in flight, like the TLMM engine's ``k_blocks``.

Numerics are those of ``trilut.models.fp16`` bit for bit; ``model()`` calls it.
docs/row_units.md gives the protocol, latency, buffering and resources.
"""

import math
from dataclasses import dataclass

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import stream, wiring, data
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from trilut.config import no_memory
from trilut.hdl.elementwise.fp16 import Fp16Mul, leading_zeros, pack, round_normalized
from trilut.hdl.elementwise.fp32_add import ADD_LATENCY, Fp32AddNonNegative, tree_schedule
from trilut.hdl.elementwise.lanes import check_lanes, lane_layout, lane_signature, positive_int
from trilut.hdl.elementwise.row_buffer import RowBuffer
from trilut.models import fp16 as fp
from trilut.models import numerics

__all__ = ["RmsScale", "RmsScaleJob", "RmsNorm", "RmsNormJob"]

_FP32 = fp.FP32
_FP32_BIAS = _FP32.bias                     # 127
_FP16_BIAS = fp.FP16.bias                   # 15

#: Quotient bits of the ``1/n`` divider: 24 significand bits, a guard bit, and the leading bit
#: that is set only when ``n`` is a power of two.
_RECIP_QUOTIENT_BITS = 26


@dataclass(frozen=True)
class RmsScaleJob:
    """Rows handed to :class:`RmsScale` back to back, ``rows`` of them, each result taken at
    once."""

    rows: int

    def __post_init__(self):
        positive_int("rows", self.rows)


class RmsScale(wiring.Component):
    """Per-row scalar of RMSNorm: the partial sums of squares -> ``r = rsqrt_fp32(v)``.

    ``inp``: one beat per row, ``{partials: P fp32 codes, n}``. ``out``: one beat per row,
    ``{y1, rk}`` with ``r = y1 * 2**(rk - 17)`` (``y1`` the 18-bit Newton result of
    ``models.fp16.rsqrt_fp32``, always in ``[2**17, 2**18)``; ``rk = -1 - E2/2``).

    Sequence, all sequential on one fp32 adder and one 25 x 24 multiplier (once per row, off
    the element path)::

        ssq  = pairwise tree over the P partials          (the adder, tree_schedule)
        rn   = round32(1 / n)                             (restoring divider, in parallel)
        mean = round32(ssq * rn)                          (the multiplier)
        v    = round32(mean + round32(eps))               (the adder)
        Y0 = table[...]; S = Y0*Y0 >> 18; T = M*S >> 23; Y1 = Y0*(3<<18 - T) >> 19

    Latency from the ``inp`` transfer to ``out.valid``: ``latency`` cycles (constant).
    """

    def __init__(self, *, partials: int, n_width: int, eps: float):
        positive_int("partials", partials)
        positive_int("n_width", n_width, at_most=24)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (
                math.isfinite(eps) and eps >= 0):
            # Zero is allowed here (the model's rsqrt of a plain mean), so not positive_number.
            raise ValueError(f"eps must be a finite non-negative number, not {eps!r}")
        self.partials = partials
        self.n_width = n_width
        self.eps = float(eps)
        self.eps_code = int(_FP32.from_float(self.eps))
        self._ops, self._final, self._tree_steps = tree_schedule(partials)
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

    def model(self, partials, n: int) -> np.ndarray:
        """fp32 codes of the partial sums of squares (``[rows, partials]``) of rows of ``n``
        elements -> ``r`` per row (float64), which ``out`` carries as ``y1 * 2**(rk - 17)``:
        the pairwise tree, then ``ElementwiseArithmetic.rms_scale``."""
        ssq = fp.FP16_ARITH.pairwise_sum(_FP32.decode(np.asarray(partials)))
        return fp.FP16_ARITH.rms_scale(ssq, n, self.eps)

    def expected_cycles(self, job: RmsScaleJob) -> int:
        """Cycles from the first ``inp`` transfer to the last ``out`` transfer, inclusive:
        ``out.valid`` rises ``latency`` cycles after the transfer and the next ``inp`` is
        taken in the cycle after ``out`` moved (as ``RmsNorm.expected_cycles`` counts it)."""
        return job.rows * (self.latency + 1)

    def memory_blocks(self) -> dict[str, float]:
        """None: the rsqrt table (256 x 18 bits) maps to LUTs (docs/row_units.md)."""
        return no_memory()

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
                rounded, top = round_normalized(m, mul_p[:48], 24, "mean")
                mean = Signal(32)
                exp = Signal(signed(12))
                m.d.comb += exp.eq(mean_exp + top + rounded[24])
                pack(m, mean, _FP32, sign=Const(0), exponent=exp, rounded=rounded,
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


@dataclass(frozen=True)
class RmsNormJob:
    """``rows`` rows of ``n`` elements through :class:`RmsNorm`, streams never stalling."""

    n: int
    rows: int

    def __post_init__(self):
        positive_int("n", self.n)
        positive_int("rows", self.rows)


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

    def __init__(self, *, lanes: int, max_n: int, eps: float):
        check_lanes(lanes)
        positive_int("max_n", max_n, at_most=1 << 20)
        self.lanes = lanes
        self.max_n = max_n
        self.partials = numerics.rmsnorm_partials(lanes)
        self.words = -(-max_n // lanes)                 # buffer words per bank
        self.n_width = max_n.bit_length()
        self.scale = RmsScale(partials=self.partials, n_width=self.n_width, eps=eps)
        self.row_buffer = RowBuffer(lanes=lanes, max_n=max_n)
        self.eps = self.scale.eps
        super().__init__({
            "x": In(lane_signature(lanes)),
            "weight": In(lane_signature(lanes)),
            "y": Out(lane_signature(lanes)),
            "n": In(unsigned(self.n_width)),
        })

    def elaborate(self, platform):
        m = Module()
        L, Wd = self.lanes, self.words
        e_shape = range(self.max_n + L + 1)
        m.submodules.scale = scale = self.scale
        m.submodules.row_buffer = row = self.row_buffer
        n = self.n
        wiring.connect(m, wiring.flipped(self.x), row.x)
        m.d.comb += row.n.eq(n)

        # ---- pass 1: buffer, square, accumulate ------------------------------------------
        # row.pending: the row is taken, its partials not yet handed on to RmsScale.
        take, f_word = row.take, row.word
        f_two = Signal()                        # the row had a second beat (odd partials)
        q_valid, q_bank, q_first = Signal(), Signal(), Signal()
        a_valid, a_bank = Signal(), Signal()
        squares = [Signal(32, name=f"square{l}") for l in range(L)]
        acc = [[Signal(32, name=f"acc{b}_{l}") for l in range(L)] for b in range(2)]

        handoff = Signal()
        m.d.comb += [
            scale.inp.valid.eq(row.pending & ~q_valid & ~a_valid),
            handoff.eq(scale.inp.valid & scale.inp.ready),
            row.handoff.eq(handoff),
            scale.inp.payload.n.eq(n),
            *(scale.inp.payload.partials[l].eq(acc[0][l]) for l in range(L)),
            *(scale.inp.payload.partials[L + l].eq(Mux(f_two, acc[1][l], 0)) for l in range(L)),
        ]
        for l in range(L):
            x = row.data[l]
            # x*x is exact in fp32: a 22-bit significand, a normal exponent.
            sq = Signal(22, name=f"x_sq{l}")
            m.d.comb += sq.eq(Cat(x[:10], 1) * Cat(x[:10], 1))
            top = sq[21]
            ex = x[10:15]
            code = Cat(Mux(top, sq[:21] << 2, sq[:20] << 3)[:23],
                       (2 * ex + (_FP32_BIAS - 2 * _FP16_BIAS) + top)[:8], 0)
            with m.If(take):
                m.d.sync += squares[l].eq(Mux(ex == 0, 0, code))
        with m.If(take & row.last):
            m.d.sync += f_two.eq(f_word != 0)
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
        b_y1 = Signal(fp.RSQRT_FRACTION_BITS)
        b_rk = Signal(signed(8))
        m.d.comb += scale.out.ready.eq(~b_active)
        with m.If(scale.out.valid & scale.out.ready):
            m.d.sync += [b_active.eq(1), b_y1.eq(scale.out.payload.y1),
                         b_rk.eq(scale.out.payload.rk)]

        o_valid = Signal()
        o_payload = Signal(lane_layout(L))
        advance = ~o_valid | self.y.ready
        issue = Signal()
        b_last = b_e + L >= n
        m.d.comb += [
            issue.eq(b_active & self.weight.valid & advance),
            self.weight.ready.eq(b_active & advance),
            row.read_word.eq(b_word),
            row.read_en.eq(advance),
            row.release.eq(issue & b_last),
            self.y.valid.eq(o_valid),
            self.y.payload.eq(o_payload),
        ]
        with m.If(issue):
            with m.If(b_last):
                m.d.sync += [b_active.eq(0), b_e.eq(0), b_word.eq(0)]
            with m.Else():
                m.d.sync += [b_e.eq(b_e + L), b_word.eq(b_word + 1)]

        s1_valid, s2_valid, s3_valid = Signal(), Signal(), Signal()
        s1_mask, s2_mask, s3_mask = Signal(L), Signal(L), Signal(L)
        s1_w, s2_w, s3_w = Signal(lane_layout(L)), Signal(lane_layout(L)), Signal(lane_layout(L))
        s1_y1 = Signal(fp.RSQRT_FRACTION_BITS)
        s1_rk, s2_rk = Signal(signed(8)), Signal(signed(8))
        s2_x = Signal(lane_layout(L))
        s3_xr = Signal(lane_layout(L))
        with m.If(advance):
            m.d.sync += [
                s1_valid.eq(issue), s2_valid.eq(s1_valid), s3_valid.eq(s2_valid),
                o_valid.eq(s3_valid),
                s1_mask.eq(Cat(b_e + l < n for l in range(L))),
                s2_mask.eq(s1_mask), s3_mask.eq(s2_mask),
                s1_w.eq(self.weight.payload), s2_w.eq(s1_w), s3_w.eq(s2_w),
                s1_y1.eq(b_y1), s1_rk.eq(b_rk), s2_rk.eq(s1_rk),
                s2_x.eq(row.read_data),
            ]
        for l in range(L):
            # S1 -> S2: the exact product of the significands (one DSP48E2: 11 x 18).
            prod = Signal(29, name=f"xr_prod{l}")
            with m.If(advance):
                m.d.sync += prod.eq(Cat(row.read_data[l][:10], 1) * s1_y1)
            # S2 -> S3: round(x * r) to fp16.
            x2 = s2_x[l]
            rounded, top = round_normalized(m, prod, 11, f"xr{l}")
            exp = Signal(signed(10), name=f"xr_exp{l}")
            m.d.comb += exp.eq(x2[10:15] + s2_rk + top + rounded[11])
            xr = Signal(16, name=f"xr{l}")
            pack(m, xr, fp.FP16, sign=x2[15], exponent=exp, rounded=rounded,
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

    def memory_blocks(self) -> dict[str, float]:
        """The row buffer's (``RowBuffer``); ``RmsScale`` has none."""
        return self.row_buffer.memory_blocks()

    def expected_cycles(self, job: RmsNormJob) -> int:
        """Cycles from the first ``x`` beat taken to the last ``y`` beat taken, inclusive, for
        ``job.rows`` rows of ``job.n`` elements with streams that never stall."""
        n, rows = job.n, job.rows
        positive_int("n", n, at_most=self.max_n)
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
