"""The decode attention unit (``DecodeAttention``): one decode step's attention for every head,
bit-exact with ``models.attention.two_pass_attention``. docs/attention_decode.md gives the
schedule, the cycle model and the measured cost; the arithmetic is ``hdl/attention``'s blocks
(docs/attention_arith.md), the score path ``ScorePath`` (``score.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from trilut.hdl.attention.exp2 import Exp2Neg
from trilut.hdl.attention.fp32 import Fp16ToFp32Product, Fp32Add, Fp32Mul
from trilut.hdl.attention.recip import Recip32
from trilut.hdl.attention.score import ScorePath, delay_line, score_latency
from trilut.hdl.elementwise.lanes import lane_signature, positive_int
from trilut.models import attention as att
from trilut.models import fp16 as fp
from trilut.models.numerics import lane_beats

__all__ = ["DecodeJob", "DecodeAttention"]

_SIGN32 = 1 << 31
#: fp32 and fp16 exponent biases differ by 112 (an fp16 number's fp32 code: rebias, shift).
_REBIAS = fp.FP32.bias - fp.FP16.bias


@dataclass(frozen=True)
class DecodeJob:
    """One decode step: the query at ``position`` (keys and values ``0 .. position``) for
    ``heads`` query heads in ``kv_heads`` groups (``DecodeAttention.check_job`` checks it
    against a unit's limits)."""
    position: int
    heads: int
    kv_heads: int

    def __post_init__(self):
        if isinstance(self.position, bool) or not isinstance(self.position, int) \
                or self.position < 0:
            raise ValueError(f"position must be a non-negative integer, not {self.position!r}")
        positive_int("heads", self.heads)
        positive_int("kv_heads", self.kv_heads)
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads "
                             f"({self.kv_heads}): every KV head serves a whole group")

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads


class DecodeAttention(wiring.Component):
    """``out = two_pass_attention(q, k, v, position)`` for one decode step, every head.

    Streams (``lane_signature(lanes)``: ``lanes`` fp16 codes a beat, lane 0 lowest; a head
    vector is ``B = head_dim / lanes`` beats):

    * ``q`` in: ``heads * B`` beats, head-major (after RoPE).
    * ``k``, ``v`` in: per KV head in order, positions ``0 .. position``, ``B`` beats each --
      the order the KV cache streams out of DDR (one incrementing range per KV head and
      region).
    * ``out`` out: ``heads * B`` beats, head-major.
    * ``position``, ``heads``, ``kv_heads`` (held inputs): constant during a step; change
      them only between steps. A step with ``heads / kv_heads`` not an integer from 1 to
      ``max_group`` or ``position >= max_context`` is not defined (``check_job`` refuses it
      on the host side).

    Per KV head ``g`` (its group: query heads ``g n .. g n + n - 1``, ``n = heads /
    kv_heads``):

    1. *scores*: slots ``(j, h, b)`` -- position, head of the group, beat -- one a cycle.
       ``q`` is taken at ``j = 0`` (into the query buffer), ``k`` at ``h = 0`` (into the row
       buffer, which heads ``1 .. n-1`` read: K is streamed once per KV head); ``ScorePath``
       gives ``t = round32(fp32_dot(q, k) * C)``, written to the score memory (``max_group x
       max_context`` fp32) with the running maximum ``m`` per head.
    2. *values*: slots ``(j, h, b)`` again, ``v`` taken at ``h = 0`` into the row buffer:
       ``p = exp2_neg(round32(t - m))`` (``Fp32Add``, ``Exp2Neg``), ``l = round32(l + p)``
       at ``b = 0``, ``o = round32(o + p v)`` (``lanes`` ``Fp16ToFp32Product`` and
       ``Fp32Add``) into the accumulators (``max_group x B`` words of ``lanes`` fp32). An
       accumulator is read back ``Fp32Add.latency`` = 5 slots after its last update at the
       earliest, so a position takes ``max(n B, 5)`` slots: ``5 - n B`` empty ones before
       each position after the first when ``n B < 5``.
    3. *out*: ``round16(o * recip_fp32(l))`` (``Recip32``, ``lanes`` ``Fp32Mul(output=FP16)``)
       per head and beat, while the next KV head's scores start.

    The whole datapath but the output moves on one enable: it stops when a slot's input beat
    is missing or the output is backpressured, and every loop above is timed in enabled
    cycles. Stall-free cycles: :meth:`expected_cycles`.
    """

    #: Slots between two updates of one accumulator (``l``, ``o``): the adder's latency.
    ACCUMULATE_SPACING = Fp32Add.latency

    def __init__(self, *, head_dim: int, lanes: int, max_context: int, max_heads: int,
                 max_group: int):
        positive_int("head_dim", head_dim)
        if (isinstance(lanes, bool) or not isinstance(lanes, int) or lanes < 1
                or lanes & (lanes - 1) or head_dim % lanes):
            raise ValueError(f"lanes must be a power of two dividing head_dim = {head_dim}, "
                             f"not {lanes!r}")
        positive_int("max_context", max_context)
        positive_int("max_heads", max_heads)
        positive_int("max_group", max_group, at_most=max_heads)
        self.head_dim, self.lanes = head_dim, lanes
        self.max_context, self.max_heads, self.max_group = max_context, max_heads, max_group
        self.beats = head_dim // lanes
        #: ``ScorePath``'s latency (the path itself is built in ``elaborate``).
        self.score_latency = score_latency(lanes=lanes, head_dim=head_dim)
        # Pass 2: a slot's offsets (cycles after its issue) where each operand is ready.
        self._t_ready = 1                                          # score memory read
        self._p_ready = self._t_ready + Fp32Add.latency + Exp2Neg.latency      # 9
        self._pv_ready = self._p_ready + Fp16ToFp32Product.latency           # 11
        self._l_done = self._p_ready + Fp32Add.latency                       # 14
        self._o_done = self._pv_ready + Fp32Add.latency                      # 16
        #: Output: the ``l`` read, the reciprocal, the multiply.
        self.out_latency = 1 + Recip32.latency + Fp32Mul.latency             # 12
        super().__init__({
            "q": In(lane_signature(lanes)),
            "k": In(lane_signature(lanes)),
            "v": In(lane_signature(lanes)),
            "out": Out(lane_signature(lanes)),
            "position": In(range(max_context)),
            "heads": In(range(max_heads + 1), init=1),
            "kv_heads": In(range(max_heads + 1), init=1),
        })

    def _score_path(self) -> ScorePath:
        return ScorePath(lanes=self.lanes, head_dim=self.head_dim,
                         tag_width=self._head_bits + self._position_bits)

    @property
    def _head_bits(self) -> int:
        return max(1, (self.max_group - 1).bit_length())

    @property
    def _position_bits(self) -> int:
        return max(1, (self.max_context - 1).bit_length())

    # --- the contract ----------------------------------------------------------------------

    def check_job(self, job: DecodeJob) -> None:
        """Raise ``ValueError`` naming the value and the limit unless this unit runs ``job``."""
        if job.position >= self.max_context:
            raise ValueError(f"position {job.position} is outside the unit's context: "
                             f"max_context = {self.max_context}")
        if job.heads > self.max_heads:
            raise ValueError(f"heads ({job.heads}) exceed max_heads = {self.max_heads}")
        if job.group > self.max_group:
            raise ValueError(f"a group of {job.group} query heads per KV head ({job.heads} / "
                             f"{job.kv_heads}) exceeds max_group = {self.max_group}")

    def slots_per_position(self, group: int) -> int:
        """Value-pass slots per position after the first: ``max(n B, 5)``."""
        return max(group * self.beats, self.ACCUMULATE_SPACING)

    def expected_cycles(self, job: DecodeJob) -> int:
        """Cycles from the first input beat taken to the last ``out`` beat, inclusive, when
        every input is always offered and ``out`` always ready. Per KV head: the score pass
        (``(position + 1) n B`` slots), its drain until the last score and maximum are
        written (``ScorePath.latency - B + 2``), the value pass (``n B + position *
        max(n B, 5)``), its drain until the last accumulator is written (16); the last KV
        head's output then takes ``n B`` slots and 12 cycles of latency."""
        self.check_job(job)
        n, B = job.group, self.beats
        scores = (job.position + 1) * n * B + self.score_latency - B + 2
        values = n * B + job.position * self.slots_per_position(n) + self._o_done
        return job.kv_heads * (scores + values) + n * B + self.out_latency

    def memory_blocks(self, *, uram: bool = True) -> dict[str, float]:
        """Block memories: the score memory, ``max_group * max_context`` fp32 words, and the
        exp2 table's half RAMB18 (0.5 BRAM36). With ``uram`` (a board with URAM288, as
        yosys maps it with ``-uram``) the scores pack two words a 72-bit row (byte
        enables): ``ceil(words / 8192)`` URAM288; without, RAMB36E2s of 1024 x 36 (32 bits
        used): ``ceil(words / 1024)``. The query buffer and the accumulators (``max_group x
        B`` words), the row buffer (``4 B``) and ``l`` (``max_group``) are distributed RAM."""
        words = self.max_group * self.max_context
        if uram:
            return {"bram36": 0.5, "uram": -(-words // 8192)}
        return {"bram36": -(-words // 1024) + 0.5, "uram": 0}

    def model(self, q, k, v, position: int) -> np.ndarray:
        """fp16 codes ``q[H, 1, d]``, ``k, v[H_kv, S, d]`` (``S > position``) -> fp16 codes
        ``[H, 1, d]``: ``two_pass_attention``, after this unit's limits are checked."""
        q, k = np.asarray(q), np.asarray(k)
        if q.ndim != 3 or k.ndim != 3:
            raise ValueError(f"q must be [H, 1, d] and k, v [H_kv, S, d], not {q.shape}, "
                             f"{k.shape}")
        if q.shape[-1] != self.head_dim:
            raise ValueError(f"head vectors must be head_dim = {self.head_dim}, not "
                             f"{q.shape[-1]}")
        if q.shape[0] % k.shape[0]:
            raise ValueError(f"heads ({q.shape[0]}) must be a multiple of kv_heads "
                             f"({k.shape[0]}): every KV head serves a whole group")
        self.check_job(DecodeJob(position=position, heads=q.shape[0], kv_heads=k.shape[0]))
        return att.two_pass_attention(q, k, v, position=position, lanes=self.lanes)

    def input_beats(self, q, k, v, position: int) -> dict[str, list[int]]:
        """The ``q``, ``k``, ``v`` beats of one step (codes as :meth:`model` takes them)."""
        d = self.head_dim
        return {"q": lane_beats(np.asarray(q).reshape(-1, d), self.lanes),
                "k": lane_beats(np.asarray(k)[:, :position + 1].reshape(-1, d), self.lanes),
                "v": lane_beats(np.asarray(v)[:, :position + 1].reshape(-1, d), self.lanes)}

    def output_beats(self, out) -> list[int]:
        """The ``out`` beats of :meth:`model`'s result."""
        return lane_beats(np.asarray(out).reshape(-1, self.head_dim), self.lanes)

    # --- the hardware ------------------------------------------------------------------------

    def elaborate(self, platform):
        m = Module()
        L, B, G, S = self.lanes, self.beats, self.max_group, self.max_context
        HB, PB = self._head_bits, self._position_bits
        BB = max(1, (B - 1).bit_length())
        row_bits = 16 * L

        # Query heads per KV head, from the held inputs (the one n with n * kv_heads = heads).
        group = Signal(range(G + 1), name="group")
        m.d.comb += group.eq(1)
        for n in reversed(range(1, G + 1)):
            with m.If(self.kv_heads * n == self.heads):
                m.d.comb += group.eq(n)

        # --- the sequencer -------------------------------------------------------------------
        SCORES, SCORES_DRAIN, VALUES, VALUES_DRAIN = range(4)
        state = Signal(2, name="state")
        j = Signal(range(S), name="j")                       # position
        h = Signal(HB, name="h")                             # head in the group
        b = Signal(BB, name="b")                             # beat
        pad = Signal(range(self.ACCUMULATE_SPACING + 1), name="pad")   # empty slots left
        drain = Signal(range(self.score_latency + self._o_done + 2), name="drain")

        ce = Signal(name="ce")                               # the datapath's enable
        out_ce = Signal(name="out_ce")                       # the output pipeline's
        out_valid = Signal(name="out_valid")
        m.d.comb += out_ce.eq(~out_valid | self.out.ready)

        scoring = Signal()
        valuing = Signal()
        padding = Signal()
        m.d.comb += [scoring.eq(state == SCORES), valuing.eq(state == VALUES),
                     padding.eq(valuing & (pad != 0))]
        need_q = scoring & (j == 0)
        need_k = scoring & (h == 0)
        need_v = valuing & ~padding & (h == 0)
        have = ((~need_q | self.q.valid) & (~need_k | self.k.valid)
                & (~need_v | self.v.valid))
        m.d.comb += [
            ce.eq(out_ce & have),
            self.q.ready.eq(out_ce & need_q & (~need_k | self.k.valid)),
            self.k.ready.eq(out_ce & need_k & (~need_q | self.q.valid)),
            self.v.ready.eq(out_ce & need_v),
        ]
        issue = Signal()                                     # a real slot issues (with ce)
        m.d.comb += issue.eq(ce & (scoring | (valuing & ~padding)))

        last_b, last_h, last_j = b == B - 1, h == group - 1, j == self.position
        spacing = self.ACCUMULATE_SPACING
        with m.If(ce):
            with m.Switch(state):
                with m.Case(SCORES, VALUES):
                    with m.If(padding):
                        m.d.sync += pad.eq(pad - 1)
                    with m.Else():
                        m.d.sync += b.eq(b + 1)
                        with m.If(last_b):
                            m.d.sync += [b.eq(0), h.eq(h + 1)]
                            with m.If(last_h):
                                m.d.sync += [h.eq(0), j.eq(j + 1)]
                                with m.If(valuing):
                                    # Empty slots before the next position: max(n B, 5).
                                    m.d.sync += pad.eq(Mux(group * B < spacing,
                                                           spacing - group * B, 0))
                                with m.If(last_j):
                                    m.d.sync += [j.eq(0), pad.eq(0), state.eq(state + 1),
                                                 drain.eq(Mux(scoring,
                                                              self.score_latency - B + 1,
                                                              self._o_done - 1))]
                with m.Case(SCORES_DRAIN, VALUES_DRAIN):
                    m.d.sync += drain.eq(drain - 1)
                    with m.If(drain == 0):
                        # After a value pass, the next KV head (or the next step's first).
                        m.d.sync += state.eq(Mux(state == SCORES_DRAIN, VALUES, SCORES))

        # The slot's tag, travelling beside it: valid, pass, head, beat, first position, row.
        row = Signal(2, name="row")                          # j mod 4: the row buffer's row
        m.d.comb += row.eq(j[:2] if len(j) >= 2 else j)
        tag = Cat(issue, valuing, h, b, j == 0, row, j)
        tags = delay_line(m, tag, self._o_done, en=ce, name="slot")

        def slot(age):
            """The fields of the slot issued ``age`` enabled cycles ago."""
            t = tags[age - 1]
            fields, at = {}, 0
            for name, width in (("valid", 1), ("values", 1), ("h", HB), ("b", BB), ("first", 1),
                                ("row", 2), ("j", len(j))):
                fields[name] = t[at:at + width]
                at += width
            return fields

        # --- buffers -------------------------------------------------------------------------
        # Queries of the group (written at j = 0, read by every position); K or V rows (written
        # by head 0, read by the later heads; four rows deep so a value row is rewritten only
        # after its last read, 8 cycles after its slot).
        m.submodules.q_buffer = q_buffer = Memory(shape=row_bits, depth=G * B, init=[])
        m.submodules.row_buffer = row_buffer = Memory(shape=row_bits, depth=4 * B, init=[])
        q_write = q_buffer.write_port()
        q_read = q_buffer.read_port(domain="sync", transparent_for=(q_write,))
        row_write = row_buffer.write_port()
        row_read = row_buffer.read_port(domain="sync", transparent_for=(row_write,))
        m.d.comb += [
            q_write.addr.eq(h * B + b), q_write.data.eq(self.q.payload),
            q_write.en.eq(ce & need_q),
            q_read.addr.eq(h * B + b), q_read.en.eq(ce),
            row_write.addr.eq(row * B + b),
            row_write.data.eq(Mux(scoring, self.k.payload, self.v.payload)),
            row_write.en.eq(ce & (need_k | need_v)),
            row_read.en.eq(ce),
        ]

        # --- pass 1: scores and the running maximum ----------------------------------------
        m.submodules.score_path = sp = self._score_path()
        prev = slot(1)
        m.d.comb += [sp.en.eq(ce), sp.valid.eq(prev["valid"] & ~prev["values"]),
                     sp.q.eq(q_read.data), sp.k.eq(row_read.data),
                     sp.tag.eq(Cat(prev["h"], prev["j"]))]
        score_head, score_pos = sp.t_tag[:HB], sp.t_tag[HB:]
        m.submodules.scores = scores = Memory(shape=32, depth=G * S, init=[])
        score_write = scores.write_port()
        score_read = scores.read_port(domain="sync")
        m.d.comb += [score_write.addr.eq(score_head * S + score_pos),
                     score_write.data.eq(sp.t), score_write.en.eq(ce & sp.t_valid),
                     score_read.addr.eq(h * S + j), score_read.en.eq(ce)]

        def order_key(code):
            """fp32 codes -> integers in the order of their values (sign-magnitude)."""
            return Mux(code[31], ~code, code | _SIGN32)

        maxima = [Signal(32, name=f"max{i}") for i in range(G)]
        with m.If(ce & sp.t_valid):
            for i in range(G):
                with m.If((score_head == i) & ((score_pos == 0)
                                               | (order_key(sp.t) > order_key(maxima[i])))):
                    m.d.sync += maxima[i].eq(sp.t)

        # --- pass 2: p, l, o -------------------------------------------------------------------
        # Row buffer reads: at the slot's issue in pass 1, 8 cycles after it in pass 2 (the
        # value beat meets p at the products).
        v_slot = slot(self._p_ready - 1)
        m.d.comb += row_read.addr.eq(Mux(state <= SCORES_DRAIN, row * B + b,
                                         v_slot["row"] * B + v_slot["b"]))
        max_now = Signal(32, name="max_now")
        with m.If(ce):
            m.d.sync += max_now.eq(Cat(*maxima).word_select(h, 32))
        m.submodules.subtract = sub = Fp32Add()
        m.submodules.exp2 = exp2 = Exp2Neg()
        m.d.comb += [sub.a.eq(score_read.data), sub.b.eq(max_now ^ _SIGN32),
                     sub.en.eq(ce.replicate(Fp32Add.latency)),
                     exp2.x.eq(sub.y), exp2.en.eq(ce.replicate(Exp2Neg.latency))]
        p16 = exp2.y
        p32 = Mux(p16[10:15] == 0, 0, Cat(Const(0, 13), p16[:10], p16[10:15] + _REBIAS, 0))

        # l: one accumulator per head, updated at b = 0.
        m.submodules.l_sums = l_sums = Memory(shape=32, depth=G, init=[])
        l_write = l_sums.write_port()
        l_read = l_sums.read_port(domain="sync", transparent_for=(l_write,))
        l_out_read = l_sums.read_port(domain="sync")
        m.submodules.l_add = l_add = Fp32Add()
        l_in, l_y = slot(self._p_ready), slot(self._l_done)
        l_read_slot = slot(self._p_ready - 1)
        l_update = l_y["valid"] & l_y["values"] & (l_y["b"] == 0)
        l_bypass = l_update & (l_y["h"] == l_in["h"])
        m.d.comb += [
            l_read.addr.eq(l_read_slot["h"]), l_read.en.eq(ce),
            l_add.a.eq(Mux(l_in["first"], 0, Mux(l_bypass, l_add.y, l_read.data))),
            l_add.b.eq(p32), l_add.en.eq(ce.replicate(Fp32Add.latency)),
            l_write.addr.eq(l_y["h"]), l_write.data.eq(l_add.y),
            l_write.en.eq(ce & l_update),
        ]

        # o: head x beat accumulators of L fp32 lanes.
        m.submodules.o_sums = o_sums = Memory(shape=32 * L, depth=G * B, init=[])
        o_write = o_sums.write_port()
        o_read = o_sums.read_port(domain="sync", transparent_for=(o_write,))
        o_out_read = o_sums.read_port(domain="sync")
        o_in, o_y = slot(self._pv_ready), slot(self._o_done)
        o_read_slot = slot(self._pv_ready - 1)
        o_update = o_y["valid"] & o_y["values"]
        o_bypass = o_update & (o_y["h"] == o_in["h"]) & (o_y["b"] == o_in["b"])
        o_sum = Signal(32 * L, name="o_sum")
        m.d.comb += [o_read.addr.eq(o_read_slot["h"] * B + o_read_slot["b"]), o_read.en.eq(ce)]
        for lane in range(L):
            m.submodules[f"pv{lane}"] = pv = Fp16ToFp32Product()
            m.submodules[f"o_add{lane}"] = add = Fp32Add()
            old = o_read.data[32 * lane:32 * lane + 32]
            m.d.comb += [pv.a.eq(p16), pv.b.eq(row_read.data[16 * lane:16 * lane + 16]),
                         pv.en.eq(ce.replicate(Fp16ToFp32Product.latency)),
                         add.a.eq(Mux(o_in["first"], 0, Mux(o_bypass, add.y, old))),
                         add.b.eq(pv.y), add.en.eq(ce.replicate(Fp32Add.latency)),
                         o_sum[32 * lane:32 * lane + 32].eq(add.y)]
        m.d.comb += [o_write.addr.eq(o_y["h"] * B + o_y["b"]), o_write.data.eq(o_sum),
                     o_write.en.eq(ce & o_update)]

        # --- the output: round16(o * recip(l)), on its own enable --------------------------
        out_active = Signal(name="out_active")
        out_h = Signal(HB, name="out_h")
        out_b = Signal(BB, name="out_b")
        with m.If(out_ce & out_active):
            m.d.sync += out_b.eq(out_b + 1)
            with m.If(out_b == B - 1):
                m.d.sync += [out_b.eq(0), out_h.eq(out_h + 1)]
                with m.If(out_h == group - 1):
                    m.d.sync += [out_h.eq(0), out_active.eq(0)]
        # The value pass's drain ends: this KV head's accumulators are complete.
        with m.If(ce & (state == VALUES_DRAIN) & (drain == 0)):
            m.d.sync += [out_active.eq(1), out_h.eq(0), out_b.eq(0)]
        out_tags = delay_line(m, Cat(out_active, out_h, out_b), self.out_latency, en=out_ce,
                              name="out_slot")
        o_out_slot = out_tags[Recip32.latency - 1]           # read o 7 cycles after l
        m.d.comb += [l_out_read.addr.eq(out_h), l_out_read.en.eq(out_ce),
                     o_out_read.addr.eq(o_out_slot[1:1 + HB] * B + o_out_slot[1 + HB:]),
                     o_out_read.en.eq(out_ce)]
        m.submodules.recip = recip = Recip32()
        m.d.comb += [recip.v.eq(l_out_read.data), recip.en.eq(out_ce.replicate(Recip32.latency))]
        for lane in range(L):
            m.submodules[f"scale{lane}"] = mul = Fp32Mul(output=fp.FP16)
            m.d.comb += [mul.a.eq(o_out_read.data[32 * lane:32 * lane + 32]), mul.b.eq(recip.y),
                         mul.en.eq(out_ce.replicate(Fp32Mul.latency)),
                         self.out.payload[lane].eq(mul.y)]
        m.d.comb += [out_valid.eq(out_tags[-1][0]), self.out.valid.eq(out_valid)]
        return m
