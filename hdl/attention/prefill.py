"""The prefill attention unit (``PrefillAttention``): causal, fused QK^T -> online softmax -> PV
over a prompt chunk, bit-exact with ``trilut.models.attention.online_attention``.

docs/attention_prefill.md gives the schedule, the reasons for the datapath's shape, the cycle
model and the measured cost; stream protocol: ``amaranth.lib.stream`` (valid/ready, a beat
moves on a clock edge where both are high), lane beats ``lane_layout(lanes)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import memory, wiring
from amaranth.lib.wiring import In, Out

from trilut.hdl.attention.exp2 import Exp2Neg
from trilut.hdl.attention.fp32 import Fp16ToFp32Product, Fp32Add, Fp32Mul
from trilut.hdl.attention.recip import Recip32
from trilut.hdl.attention.score import ScorePath, delay_line, score_latency
from trilut.hdl.elementwise.lanes import lane_signature, positive_int
from trilut.models import attention as att
from trilut.models import fp16 as fp

__all__ = ["PrefillJob", "PrefillAttention", "prefill_batches"]

_NEG_ZERO = 0x8000_0000            # -0: the exact identity of round32(x + .)
_ONE16 = 0x3C00
_SIGN32 = 0x8000_0000


@dataclass(frozen=True)
class PrefillJob:
    """One run of the unit: ``tokens`` queries at positions ``start .. start + tokens - 1``
    of ``heads`` query heads over ``kv_heads`` KV heads (the held inputs of the same names);
    ``plain``: every batch streams every key ``0 .. start + tokens - 1`` (the benchmark's
    reference schedule) instead of stopping at its largest query's position."""
    start: int
    tokens: int
    heads: int
    kv_heads: int
    plain: bool = False

    def __post_init__(self):
        if isinstance(self.start, bool) or not isinstance(self.start, int) or self.start < 0:
            raise ValueError(f"start must be a non-negative integer, not {self.start!r}")
        positive_int("tokens", self.tokens)
        positive_int("heads", self.heads)
        positive_int("kv_heads", self.kv_heads)
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.heads} query heads do not split into {self.kv_heads} KV "
                             f"head groups")

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads


def prefill_batches(job: PrefillJob, n_pe: int) -> list[tuple[int, int, int, int]]:
    """The batches of ``job`` in the unit's order (``trilut.models.attention.prefill_batches``,
    the order the host packs the streams in)."""
    return att.prefill_batches(start=job.start, tokens=job.tokens, kv_heads=job.kv_heads,
                               n_pe=n_pe, plain=job.plain)


def _fp32_greater(m: Module, a, b, name: str) -> Signal:
    """``a > b`` for fp32 codes as real numbers (zeros of either sign equal; no subnormal
    reaches here: every operand is an fp32 block's rounded result)."""
    gt = Signal(name=name)
    a_zero, b_zero = a[23:31] == 0, b[23:31] == 0
    sa, sb = a[31] & ~a_zero, b[31] & ~b_zero
    ma, mb = Mux(a_zero, 0, a[:31]), Mux(b_zero, 0, b[:31])
    m.d.comb += gt.eq(Mux(sa, Mux(sb, ma < mb, 0), Mux(sb, 1, ma > mb)))
    return gt


def _fp16_to_fp32(code):
    """The fp32 code of a non-negative fp16 code that is +0 or normal (an ``Exp2Neg`` result
    or 1.0)."""
    exponent = code[10:15]
    return Mux(exponent == 0, 0, Cat(Const(0, 13), code[:10], (exponent + (127 - 15))[:8],
                                     Const(0, 1)))


class _Walker:
    """The key sequence of a job, tick by tick: per KV head, per batch, per key a *period* of
    ``period`` ticks, ticks ``0 .. slots * B - 1`` of which are items ``(slot, beat)`` slot
    by slot (``slot = query * group + head``). One copy drives the intake and the scores, a
    second one, started when the first key's softmax factors are ready, the PV updates (and,
    with ``drain``, one more period after the last key, which finishes the last batch)."""

    def __init__(self, m: Module, unit: "PrefillAttention", job: dict, *, en, go, name: str,
                 drain: bool, stop=None):
        n_pe, B = unit.n_pe, unit.beats
        ctx = unit.max_context
        self.active = Signal(name=f"{name}_active")
        self.tau = Signal(range(unit.max_period), name=f"{name}_tau")
        self.b = Signal(range(B), name=f"{name}_beat")
        self.s = Signal(range(unit.max_slots), name=f"{name}_slot")
        self.qi = Signal(range(n_pe), name=f"{name}_query")
        self.g = Signal(range(unit.max_group), name=f"{name}_head")
        self.n = Signal(range(ctx), name=f"{name}_key")
        self.kvh = Signal(range(unit.max_heads), name=f"{name}_kv_head")
        self.remaining = Signal(range(ctx + 1), name=f"{name}_remaining")
        self.pmax = Signal(range(ctx), name=f"{name}_pmax")
        self.parity = Signal(name=f"{name}_parity")
        self.first_batch = Signal(name=f"{name}_first_batch")
        self.ring = Signal(range(unit.ring_keys), name=f"{name}_ring")
        self.prev_queries = Signal(range(n_pe + 1), name=f"{name}_prev_queries")
        self.drain = Signal(name=f"{name}_drain")

        self.queries = Signal(range(n_pe + 1), name=f"{name}_queries")
        m.d.comb += self.queries.eq(Mux(self.remaining > n_pe, n_pe, self.remaining))
        last_key_index = Mux(job["plain"], job["start"] + job["tokens"] - 1, self.pmax)
        self.first_key = Signal(name=f"{name}_first_key")
        self.last_key = Signal(name=f"{name}_last_key")
        self.last_in_head = Signal(name=f"{name}_last_in_head")
        self.last_batch = Signal(name=f"{name}_last_batch")
        self.item = Signal(name=f"{name}_item")
        tau_end = Signal(name=f"{name}_tau_end")
        m.d.comb += [
            self.first_key.eq(self.n == 0),
            self.last_key.eq(self.n == last_key_index),
            self.last_in_head.eq(self.remaining <= n_pe),
            self.last_batch.eq(self.last_in_head & (self.kvh == job["kv_heads"] - 1)),
            self.item.eq(self.active & (self.tau < job["slot_beats"])),
            tau_end.eq(self.tau == job["period"] - 1),
        ]

        with m.If(en & go):
            m.d.sync += [self.active.eq(1), self.tau.eq(0), self.b.eq(0), self.s.eq(0),
                         self.qi.eq(0), self.g.eq(0), self.n.eq(0), self.kvh.eq(0),
                         self.remaining.eq(job["tokens"]),
                         self.pmax.eq(job["start"] + job["tokens"] - 1),
                         self.parity.eq(0), self.first_batch.eq(1), self.ring.eq(0),
                         self.prev_queries.eq(0), self.drain.eq(0)]
        with m.Elif(en & (stop if stop is not None else 0)):
            m.d.sync += self.active.eq(0)
        with m.Elif(en & self.active):
            m.d.sync += self.tau.eq(Mux(tau_end, 0, self.tau + 1))
            with m.If(tau_end):
                m.d.sync += [self.b.eq(0), self.s.eq(0), self.qi.eq(0), self.g.eq(0),
                             self.ring.eq(Mux(self.ring == unit.ring_keys - 1, 0,
                                              self.ring + 1))]
                with m.If(self.drain):
                    m.d.sync += self.active.eq(0)
                with m.Elif(self.last_key):
                    m.d.sync += [self.n.eq(0), self.prev_queries.eq(self.queries),
                                 self.parity.eq(~self.parity), self.first_batch.eq(0)]
                    with m.If(self.last_batch):
                        m.d.sync += (self.drain.eq(1) if drain else self.active.eq(0))
                    with m.Elif(self.last_in_head):
                        m.d.sync += [self.kvh.eq(self.kvh + 1),
                                     self.remaining.eq(job["tokens"]),
                                     self.pmax.eq(job["start"] + job["tokens"] - 1)]
                    with m.Else():
                        m.d.sync += [self.remaining.eq(self.remaining - n_pe),
                                     self.pmax.eq(self.pmax - n_pe)]
                with m.Else():
                    m.d.sync += self.n.eq(self.n + 1)
            with m.Elif(self.item):
                with m.If(self.b == B - 1):
                    m.d.sync += [self.b.eq(0), self.s.eq(self.s + 1)]
                    with m.If(self.g == job["group"] - 1):
                        m.d.sync += [self.g.eq(0), self.qi.eq(self.qi + 1)]
                    with m.Else():
                        m.d.sync += self.g.eq(self.g + 1)
                with m.Else():
                    m.d.sync += self.b.eq(self.b + 1)


class PrefillAttention(wiring.Component):
    """Causal prefill attention of a prompt chunk, ``online_attention``'s numbers.

    Held inputs (change them only while ``idle`` is high): ``start`` (position of the first
    query), ``tokens`` (queries, ``1 .. max_context - start``), ``heads``, ``kv_heads``
    (``heads / kv_heads`` = the group, ``1 .. max_group``), ``plain`` (the reference schedule:
    every batch streams every key). A job starts when ``idle`` is high and ``q`` offers a
    beat; ``idle`` goes high again after its last ``out`` beat left the datapath.

    Streams, lane beats of ``lanes`` fp16 codes, ``B = head_dim / lanes`` beats a vector
    (:func:`prefill_batches` gives the batches: per KV head ``h``, the tokens in groups of
    ``n_pe`` from the last one down, the last group partial):

    * ``q`` in: per batch, per query (descending position), per query head of ``h``'s group
      (``h * group + g``), its ``B`` beats (after RoPE);
    * ``kv`` in: per batch, per key position ``j = 0 .. keys - 1`` (``keys`` = the batch's
      largest query position + 1, or ``start + tokens`` when ``plain``), ``k_j``'s ``B`` beats
      then ``v_j``'s ``B`` beats of KV head ``h``;
    * ``out`` out: the results, in ``q``'s order.

    The datapath holds a batch's ``slots = n_pe * group`` (query, head) pairs, slot ``i *
    group + g`` for the batch's query ``i`` and head ``g`` (an ``n_pe``-query batch of
    processing elements interleaved in one ``lanes``-wide datapath), and runs one *period* of
    ``P = max(slots * B, min_period)`` cycles per key, ``min_period = max(2 B, 11)``: the
    key's ``2 B`` beats come in (cycles ``0 .. 2 B - 1``; ``kv`` waits the rest of the
    period), the ``slots * B`` (slot, beat) items go through the score path one a cycle, and,
    ``pv_offset`` cycles behind, the same items through the softmax and PV lanes. A key the
    slot's query may not see (past its position, or a slot without a query in a partial
    batch) is masked: its update leaves ``m``, ``l`` and ``o`` exactly as they were.
    ``expected_cycles`` is exact when nothing stalls; a stalled stream (or a full result
    buffer) stops every stage at once (one clock enable, ``ce``).
    """

    def __init__(self, *, n_pe: int, lanes: int, head_dim: int, max_context: int,
                 max_heads: int, max_group: int):
        positive_int("n_pe", n_pe, at_most=64)
        if (isinstance(lanes, bool) or not isinstance(lanes, int) or not 1 <= lanes <= 256
                or lanes & (lanes - 1)):
            raise ValueError(f"lanes must be a power of two from 1 to 256, not {lanes!r}")
        positive_int("head_dim", head_dim)
        if head_dim % lanes:
            raise ValueError(f"lanes ({lanes}) must divide head_dim ({head_dim}): a vector is "
                             f"whole beats")
        positive_int("max_context", max_context)
        positive_int("max_heads", max_heads)
        positive_int("max_group", max_group, at_most=max_heads)
        self.n_pe, self.lanes, self.head_dim = n_pe, lanes, head_dim
        self.max_context, self.max_heads, self.max_group = max_context, max_heads, max_group
        self.beats = B = head_dim // lanes
        self.max_slots = n_pe * max_group
        #: The loop a period must cover: an ``o`` element read, multiplied by ``c`` and
        #: added to ``p v`` is written back ``o_loop`` cycles later (read, 4 + 5, write).
        self.o_loop = 1 + Fp32Mul.latency + Fp32Add.latency + 1
        #: ``1/l`` of a batch's last key is ready ``o_loop + Recip32.latency`` cycles after
        #: ``l`` was read, ``finish_wait`` more than a period of ``o_loop`` allows: the
        #: finishing multiply takes its ``o`` that many cycles after the item read it.
        self.finish_wait = Recip32.latency
        self.min_period = max(2 * B, self.o_loop)
        self.max_period = max(self.max_slots * B, self.min_period)
        self._tag_fields = [("slot", max(1, (self.max_slots - 1).bit_length())),
                            ("first", 1), ("masked", 1), ("job_first", 1)]
        self.score_latency = score_latency(lanes=lanes, head_dim=head_dim)
        #: Cycles from a period's first score item to its first PV item.
        self.pv_offset = 1 + self.score_latency + Fp32Add.latency + Exp2Neg.latency + 1
        #: Keys of V in flight between the intake and the PV lanes.
        self.ring_keys = 1 + max(0, -(-(self.pv_offset - 2 * B) // self.min_period))
        super().__init__({
            "q": In(lane_signature(lanes)),
            "kv": In(lane_signature(lanes)),
            "out": Out(lane_signature(lanes)),
            "start": In(range(max_context)),
            "tokens": In(range(max_context + 1)),
            "heads": In(range(max_heads + 1)),
            "kv_heads": In(range(max_heads + 1)),
            "plain": In(1),
            "idle": Out(1),
        })

    # --- what it computes, takes and costs ------------------------------------------------------

    def check_job(self, job: PrefillJob) -> None:
        if not isinstance(job, PrefillJob):
            raise TypeError(f"expected a PrefillJob, not {job!r}")
        if job.start + job.tokens > self.max_context:
            raise ValueError(f"queries at {job.start}..{job.start + job.tokens - 1} exceed "
                             f"max_context = {self.max_context}")
        if job.heads > self.max_heads:
            raise ValueError(f"heads must be at most max_heads = {self.max_heads}, not "
                             f"{job.heads!r}")
        if job.group > self.max_group:
            raise ValueError(f"a group of {job.group} query heads per KV head exceeds "
                             f"max_group = {self.max_group}")

    def period(self, job: PrefillJob) -> int:
        """Cycles per key of a batch: ``slots * B`` items, at least ``min_period`` (the
        intake of ``2 B`` beats and the ``o`` / reciprocal loops)."""
        return max(self.n_pe * job.group * self.beats, self.min_period)

    def model(self, q, k, v, start: int, plain: bool = False) -> np.ndarray:
        """fp16 codes ``q[H, T, d]`` against ``k, v[H_kv, S, d]`` -> ``out[H, T, d]``:
        ``online_attention`` with this unit's ``lanes`` (``plain`` computes the same: the
        pairs it adds are masked, and a masked pair adds nothing)."""
        q = np.asarray(q)
        job = PrefillJob(start=start, tokens=q.shape[1], heads=q.shape[0],
                         kv_heads=np.shape(k)[0], plain=bool(plain))
        self.check_job(job)
        return att.online_attention(q, k, v, start=start, lanes=self.lanes)

    def expected_cycles(self, job: PrefillJob) -> int:
        """Cycles from the first ``q`` beat taken to the last ``out`` beat, inclusive, with
        every input offered and ``out`` never stalled.

        The first batch's ``q`` beats take ``slots_0 * B`` cycles (later batches' ``q`` come
        in during the previous batch's first period); then one period of ``P`` cycles per
        key of every batch; the PV lanes run ``pv_offset`` cycles behind and one period
        longer (it finishes the last batch). Batch ``i``'s results are written while the
        period after its last key runs (one a cycle in its item slots, ``1 + finish_wait +
        Fp32Mul.latency`` cycles after their item: the final ``o`` waits ``finish_wait``
        cycles for ``1/l``) and leave, one a cycle, from the cycle after the last of them was
        written, or after the previous batch's have left. The periods wait (idle item
        cycles) when ``slots * B < min_period``: for the ``2 B`` intake, or the ``o`` loop."""
        self.check_job(job)
        B, P = self.beats, self.period(job)
        batches = prefill_batches(job, self.n_pe)
        f0 = batches[0][2] * job.group * B
        v0 = f0 + self.pv_offset
        finish_delay = 1 + self.finish_wait + Fp32Mul.latency
        keys_done = 0
        last_issue = -1
        issues = []
        for _, _, queries, keys in batches:
            keys_done += keys
            beats = queries * job.group * B
            first_write = v0 + keys_done * P + finish_delay
            if len(issues) >= 2 and issues[-2] >= first_write:
                raise AssertionError("the out buffer would stall the datapath")   # never
            written = v0 + keys_done * P + beats - 1 + finish_delay
            first = max(written + 1, last_issue + 1)
            last_issue = first + beats - 1
            issues.append(last_issue)
        return last_issue + 2

    def memory_blocks(self) -> dict[str, int]:
        """Block RAM: the two q banks and the two result banks (each ``2 * max_slots * B``
        words of ``16 lanes`` bits, one write and one read port) in RAMB36E2s of their best
        simple-dual-port shape (512 x 72, 1K x 36, ...), and ``Exp2Neg``'s ROM (one RAMB18:
        half a BRAM36). Everything else is LUTRAM or registers: the ``o`` / ``l`` state (read
        and written every cycle), the k row, the V ring, the per-slot ``m``, ``c``/``p`` and
        ``1/l`` (docs/attention_prefill.md says why)."""
        depth, width = 2 * self.max_slots * self.beats, 16 * self.lanes
        bank = min(-(-width // w) * -(-depth // (36864 // w)) for w in (72, 36, 18, 9))
        return {"bram36": 2 * bank + 0.5, "uram": 0}

    # --- the hardware ---------------------------------------------------------------------------

    def elaborate(self, platform):
        m = Module()
        L, B, n_pe = self.lanes, self.beats, self.n_pe
        S_max = self.max_slots
        ce = Signal(name="ce")

        # ---- the job's registers (loaded while idle) ----------------------------------------
        idle_state, preload, run, wait = range(4)
        state = Signal(range(4), name="state", init=idle_state)
        group = Signal(range(self.max_group + 1), init=1, name="group_in")
        match = Const(1, len(group))
        for g in range(self.max_group, 0, -1):
            match = Mux(self.heads == g * self.kv_heads, g, match)
        m.d.comb += group.eq(match)
        job = {key: Signal(width, name=f"job_{key}") for key, width in [
            ("start", len(self.start)), ("tokens", len(self.tokens)),
            ("kv_heads", len(self.kv_heads)), ("plain", 1), ("group", len(group)),
            ("slot_beats", (S_max * B).bit_length()),
            ("period", self.max_period.bit_length()),
            ("preload", (S_max * B).bit_length()),
            ("first_queries", (n_pe).bit_length())]}
        slot_beats = Signal(len(job["slot_beats"]))
        first_queries = Mux(self.tokens > n_pe, n_pe, self.tokens)
        m.d.comb += slot_beats.eq(group * (n_pe * B))
        with m.If(state == idle_state):
            m.d.sync += [job["start"].eq(self.start), job["tokens"].eq(self.tokens),
                         job["kv_heads"].eq(self.kv_heads), job["plain"].eq(self.plain),
                         job["group"].eq(group), job["slot_beats"].eq(slot_beats),
                         job["period"].eq(Mux(slot_beats > self.min_period, slot_beats,
                                              self.min_period)),
                         job["preload"].eq(first_queries * group * B),
                         job["first_queries"].eq(first_queries)]

        # ---- the two walkers ------------------------------------------------------------------
        front_go = Signal(name="front_go")
        pv_go = Signal(name="pv_go")
        front = _Walker(m, self, job, en=ce, go=front_go, name="front", drain=False)
        # The PV walker stops at the drain period's last finishing item: the job is over.
        pv_stop = Signal(name="pv_stop")
        pv = _Walker(m, self, job, en=ce, go=pv_go, name="pv", drain=True, stop=pv_stop)

        # ---- buffers ---------------------------------------------------------------------------
        def mem(name, width, depth, style=None):
            attrs = {"ram_style": style} if style else None
            m.submodules[name] = buf = memory.Memory(shape=unsigned(width), depth=depth, init=[],
                                                     attrs=attrs)
            return buf

        q_mem = mem("q_buffer", 16 * L, 2 * S_max * B, "block")
        k_mem = mem("k_buffer", 16 * L, B)
        v_mem = mem("v_ring", 16 * L, self.ring_keys * B, "distributed")
        o_mem = mem("o_state", 32 * (L + 1), S_max * B, "distributed")
        out_mem = mem("out_buffer", 16 * L, 2 * S_max * B, "block")
        q_w, k_w, v_w, o_w, out_w = (b.write_port() for b in (q_mem, k_mem, v_mem, o_mem, out_mem))
        q_r = q_mem.read_port(domain="sync")
        k_r = k_mem.read_port(domain="sync", transparent_for=(k_w,))
        v_r = v_mem.read_port(domain="sync")
        o_r = o_mem.read_port(domain="sync")
        out_r = out_mem.read_port(domain="sync")
        m_mem = mem("m_state", 32, S_max)
        cp_mem = mem("softmax_factors", 32 + 16 + 1, S_max)
        r_mem = mem("reciprocals", 32, 2 * S_max)
        m_w, cp_w, r_w = m_mem.write_port(), cp_mem.write_port(), r_mem.write_port()
        m_r = m_mem.read_port(domain="comb")
        cp_r = cp_mem.read_port(domain="comb")
        r_r = r_mem.read_port(domain="comb")

        # ---- control: intake, the clock enable ---------------------------------------------
        pre_count = Signal(range(S_max * B + 1), name="preload_count")
        need_kv = Signal(name="need_kv")
        need_q = Signal(name="need_q")
        stall_out = Signal(name="stall_out")
        job_done = Signal(name="job_done")
        full = Signal(2, name="out_full")
        out_count = [Signal(range(S_max * B + 1), name=f"out_count{i}") for i in range(2)]

        # Next batch's queries (its q comes in during this batch's first period).
        next_queries = Signal(range(n_pe + 1), name="next_queries")
        after = front.remaining - n_pe
        m.d.comb += next_queries.eq(Mux(~front.last_in_head, Mux(after > n_pe, n_pe, after),
                                        Mux(front.kvh == job["kv_heads"] - 1, 0,
                                            job["first_queries"])))
        next_beats = Signal(range(S_max * B + 1), name="next_beats")
        m.d.comb += next_beats.eq(next_queries * job["group"] * B)
        m.d.comb += [
            need_kv.eq(front.active & (front.tau < 2 * B)),
            need_q.eq((state == preload)
                      | (front.active & front.first_key & (front.tau < next_beats))),
            ce.eq(~(need_kv & ~self.kv.valid) & ~(need_q & ~self.q.valid) & ~stall_out),
            self.kv.ready.eq(need_kv & ~(need_q & ~self.q.valid) & ~stall_out),
            self.q.ready.eq(need_q & ~(need_kv & ~self.kv.valid) & ~stall_out),
            self.idle.eq(state == idle_state),
        ]
        # q: the first batch's before the first period, then the next batch's.
        m.d.comb += [
            q_w.data.eq(self.q.payload.as_value()),
            q_w.addr.eq(Mux(state == preload, pre_count,
                            Mux(front.parity, 0, S_max * B) + front.tau)),
            q_w.en.eq(ce & need_q),
            k_w.data.eq(self.kv.payload.as_value()), k_w.addr.eq(front.tau),
            k_w.en.eq(ce & need_kv & (front.tau < B)),
            v_w.data.eq(self.kv.payload.as_value()),
            v_w.addr.eq(front.ring * B + front.tau - B),
            v_w.en.eq(ce & need_kv & (front.tau >= B)),
        ]
        reader_idle = Signal(name="reader_idle")
        m.d.comb += reader_idle.eq((full == 0) & ~self.out.valid)
        m.d.comb += front_go.eq((state == preload) & (pre_count == job["preload"] - 1))
        with m.Switch(state):
            with m.Case(idle_state):
                with m.If(self.q.valid & reader_idle):
                    m.d.sync += [state.eq(preload), pre_count.eq(0), job_done.eq(0)]
            with m.Case(preload):
                with m.If(ce):
                    m.d.sync += pre_count.eq(pre_count + 1)
                    with m.If(front_go):
                        m.d.sync += state.eq(run)
            with m.Case(run):
                with m.If(~front.active):
                    m.d.sync += state.eq(wait)
            with m.Case(wait):
                with m.If(job_done):
                    m.d.sync += state.eq(idle_state)

        # ---- scores -----------------------------------------------------------------------------
        m.submodules.score = score = ScorePath(
            lanes=L, head_dim=self.head_dim, tag_width=sum(w for _, w in self._tag_fields))
        assert score.latency == self.score_latency
        masked = Signal(name="front_masked")
        m.d.comb += masked.eq((front.qi >= front.queries) | (front.n + front.qi > front.pmax))
        tag_slot = Signal(self._tag_fields[0][1], name="front_tag_slot")
        m.d.comb += tag_slot.eq(front.s)
        tag = Cat(tag_slot, front.first_key, masked, front.first_batch & front.first_key)
        m.d.comb += [q_r.addr.eq(Mux(front.parity, S_max * B, 0) + front.s * B + front.b),
                     q_r.en.eq(ce), k_r.addr.eq(front.b), k_r.en.eq(ce)]
        issue_valid = Signal(name="score_issue_valid")
        issue_tag = Signal(len(tag), name="score_issue_tag")
        with m.If(ce):
            m.d.sync += [issue_valid.eq(front.item), issue_tag.eq(tag)]
        m.d.comb += [score.en.eq(ce), score.valid.eq(issue_valid), score.tag.eq(issue_tag),
                     score.q.eq(q_r.data), score.k.eq(k_r.data)]

        # ---- the running max, c and p ------------------------------------------------------
        t, t_valid = score.t, score.t_valid
        widths = [w for _, w in self._tag_fields]
        t_slot = score.t_tag[:widths[0]]
        t_first, t_masked, t_job_first = (score.t_tag[widths[0] + i] for i in range(3))
        m.d.comb += m_r.addr.eq(t_slot)
        m_old = m_r.data
        greater = _fp32_greater(m, t, m_old, "score_greater")
        new = Signal(name="new_max")
        m.d.comb += new.eq(t_first | greater)
        m.d.comb += [m_w.addr.eq(t_slot), m_w.data.eq(t),
                     m_w.en.eq(ce & t_valid & ~t_masked & new)]
        m.submodules.diff = diff = Fp32Add()
        m.submodules.exp2 = exp2 = Exp2Neg()
        m.d.comb += [diff.a.eq(t), diff.b.eq(m_old ^ _SIGN32),
                     diff.en.eq(ce.replicate(Fp32Add.latency)),
                     exp2.x.eq(diff.y), exp2.en.eq(ce.replicate(Exp2Neg.latency))]
        ctl = Cat(t_valid, new & ~t_first & ~t_masked, new, t_masked, t_job_first, t_slot)
        ctl_d = delay_line(m, ctl, Fp32Add.latency + Exp2Neg.latency, en=ce, name="softmax_ctl")[-1]
        f_valid, f_c_new, f_p_one, f_masked, f_job_first = (ctl_d[i] for i in range(5))
        f_slot = ctl_d[5:]
        c16 = Mux(f_c_new, exp2.y, _ONE16)
        p16 = Mux(f_p_one, _ONE16, exp2.y)
        m.d.comb += [cp_w.addr.eq(f_slot), cp_w.data.eq(Cat(_fp16_to_fp32(c16), p16, f_masked)),
                     cp_w.en.eq(ce & f_valid),
                     pv_go.eq(f_valid & f_job_first & (f_slot == 0))]

        # ---- PV: o = round32(round32(o c) + p v), l in lane L -------------------------------
        pv_first = pv.first_key | pv.drain
        finish = Signal(name="finish")
        finish_last = Signal(name="finish_last")
        m.d.comb += [
            finish.eq(pv.item & pv_first & ~pv.first_batch & (pv.qi < pv.prev_queries)),
            finish_last.eq(finish & (pv.qi == pv.prev_queries - 1)
                           & (pv.g == job["group"] - 1) & (pv.b == B - 1)),
            pv_stop.eq(finish_last & pv.drain),
        ]
        addr = pv.s * B + pv.b
        m.d.comb += [o_r.addr.eq(addr), o_r.en.eq(ce),
                     v_r.addr.eq(pv.ring * B + pv.b), v_r.en.eq(ce),
                     cp_r.addr.eq(pv.s)]
        # Stage 1: beside the memories' read registers.
        s1 = {name: Signal(width, name=f"pv1_{name}") for name, width in [
            ("valid", 1), ("cp", len(cp_r.data)), ("first", 1), ("recip", 1),
            ("finish", 1), ("finish_last", 1), ("job_end", 1), ("addr", len(o_w.addr)),
            ("r_addr", len(r_w.addr)), ("r_read", len(r_w.addr)), ("out_addr", len(out_w.addr)),
            ("bank", 1)]}
        with m.If(ce):
            m.d.sync += [
                s1["valid"].eq(pv.item), s1["cp"].eq(cp_r.data),
                s1["r_read"].eq(Mux(pv.parity, 0, S_max) + pv.s),
                s1["first"].eq(pv_first),
                s1["recip"].eq(pv.item & pv.last_key & ~pv.drain & (pv.b == 0)),
                s1["finish"].eq(finish), s1["finish_last"].eq(finish_last),
                s1["job_end"].eq(finish_last & pv.drain), s1["addr"].eq(addr),
                s1["r_addr"].eq(Mux(pv.parity, S_max, 0) + pv.s),
                s1["out_addr"].eq(Mux(pv.parity, 0, S_max * B) + addr),
                s1["bank"].eq(~pv.parity),
            ]
        c32, p16_1, masked1 = s1["cp"][:32], s1["cp"][32:48], s1["cp"][48]
        mul_lat, prod_lat = Fp32Mul.latency, Fp16ToFp32Product.latency
        masked5 = delay_line(m, masked1, mul_lat, en=ce, name="pv_masked")[-1]
        new_o = []
        for i in range(L + 1):
            m.submodules[f"o_mul{i}"] = mul = Fp32Mul()
            m.submodules[f"pv_product{i}"] = prod = Fp16ToFp32Product()
            m.submodules[f"o_add{i}"] = add = Fp32Add()
            o_old = o_r.data[32 * i:32 * (i + 1)]
            v_i = v_r.data[16 * i:16 * (i + 1)] if i < L else Const(_ONE16, 16)
            m.d.comb += [mul.a.eq(Mux(s1["first"], _NEG_ZERO, o_old)), mul.b.eq(c32),
                         mul.en.eq(ce.replicate(mul_lat)),
                         prod.a.eq(p16_1), prod.b.eq(v_i), prod.en.eq(ce.replicate(prod_lat))]
            pv_term = delay_line(m, prod.y, mul_lat - prod_lat, en=ce, name=f"pv_term{i}")[-1]
            # A masked pair: c = 1 and p v replaced by -0, so o and l come back unchanged.
            m.d.comb += [add.a.eq(mul.y), add.b.eq(Mux(masked5, _NEG_ZERO, pv_term)),
                         add.en.eq(ce.replicate(Fp32Add.latency))]
            new_o.append(add.y)
        loop = mul_lat + Fp32Add.latency
        wb = delay_line(m, Cat(s1["valid"], s1["recip"], s1["addr"], s1["r_addr"]), loop,
                        en=ce, name="pv_writeback")[-1]
        wb_valid, wb_recip = wb[0], wb[1]
        wb_addr = wb[2:2 + len(o_w.addr)]
        wb_r_addr = wb[2 + len(o_w.addr):]
        m.d.comb += [o_w.addr.eq(wb_addr), o_w.data.eq(Cat(*new_o)), o_w.en.eq(ce & wb_valid)]
        # 1 / l of a batch's last key, kept per batch parity for the finishing multiply.
        m.submodules.recip = recip = Recip32()
        m.d.comb += [recip.v.eq(new_o[L]), recip.en.eq(ce.replicate(Recip32.latency))]
        rc = delay_line(m, Cat(wb_recip, wb_r_addr), Recip32.latency, en=ce,
                        name="recip_ctl")[-1]
        m.d.comb += [r_w.addr.eq(rc[1:]), r_w.data.eq(recip.y), r_w.en.eq(ce & rc[0])]

        # ---- finishing: out = round16(o * (1/l)), one rounding ------------------------------
        # The final o waits finish_wait cycles for 1/l in a small LUTRAM ring (written every
        # enabled cycle, read finish_wait writes later), so the period need not cover Recip32.
        wait = self.finish_wait
        ring_depth = 1 << wait.bit_length()
        held = mem("finish_wait", 32 * L, ring_depth, "distributed")
        held_w, held_r = held.write_port(), held.read_port(domain="comb")
        held_at = Signal(range(ring_depth), name="finish_wait_at")
        with m.If(ce):
            m.d.sync += held_at.eq(held_at + 1)
        m.d.comb += [held_w.addr.eq(held_at), held_w.data.eq(o_r.data[:32 * L]),
                     held_w.en.eq(ce), held_r.addr.eq(held_at - wait)]
        fw = delay_line(m, Cat(s1["finish"], s1["finish_last"], s1["job_end"], s1["bank"],
                               s1["out_addr"], s1["r_read"]), wait, en=ce,
                        name="finish_wait_ctl")[-1]
        m.d.comb += r_r.addr.eq(fw[4 + len(out_w.addr):])
        finished = []
        for i in range(L):
            m.submodules[f"finish{i}"] = fin = Fp32Mul(output=fp.FP16)
            m.d.comb += [fin.a.eq(held_r.data[32 * i:32 * (i + 1)]), fin.b.eq(r_r.data),
                         fin.en.eq(ce.replicate(mul_lat))]
            finished.append(fin.y)
        fc = delay_line(m, fw[:4 + len(out_w.addr)], mul_lat, en=ce, name="finish_ctl")[-1]
        fc_write, fc_last, fc_job_end, fc_bank = fc[0], fc[1], fc[2], fc[3]
        fc_addr = fc[4:]
        m.d.comb += [stall_out.eq(fc_write & full.bit_select(fc_bank, 1)),
                     out_w.addr.eq(fc_addr), out_w.data.eq(Cat(*finished)),
                     out_w.en.eq(ce & fc_write)]

        # ---- the results out, batch by batch ------------------------------------------------
        rd_bank = Signal(name="read_bank")
        rd_addr = Signal(range(S_max * B), name="read_addr")
        advance = Signal(name="read_advance")
        have = Signal(name="read_have")
        count = Mux(rd_bank, out_count[1], out_count[0])
        m.d.comb += [advance.eq(~self.out.valid | self.out.ready),
                     have.eq(full.bit_select(rd_bank, 1)),
                     out_r.addr.eq(Mux(rd_bank, S_max * B, 0) + rd_addr), out_r.en.eq(advance),
                     self.out.payload.eq(out_r.data)]
        with m.If(advance):
            m.d.sync += self.out.valid.eq(have)
            with m.If(have):
                with m.If(rd_addr == count - 1):
                    m.d.sync += [rd_addr.eq(0), rd_bank.eq(~rd_bank),
                                 full.bit_select(rd_bank, 1).eq(0)]
                with m.Else():
                    m.d.sync += rd_addr.eq(rd_addr + 1)
        with m.If(ce & fc_write & fc_last):
            m.d.sync += full.bit_select(fc_bank, 1).eq(1)
            for i in range(2):
                with m.If(fc_bank == i):
                    m.d.sync += out_count[i].eq(fc_addr - i * S_max * B + 1)
            with m.If(fc_job_end):
                m.d.sync += job_done.eq(1)
        with m.If((state == idle_state) & self.q.valid & reader_idle):
            m.d.sync += rd_bank.eq(0)
        return m
