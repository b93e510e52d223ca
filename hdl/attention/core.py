"""The attention core (``AttentionCore``): the decode and prefill units fed from the KV cache in
DDR, one AXI4 read port and one AXI4 write port. docs/attention_core.md gives the stream
orders, the command schedule and the measured cycles.

For one decode step or one prefill chunk of one layer, the core

1. writes the chunk's new K rows (after RoPE) and V rows into the cache through a
   ``KvCacheWriter`` (two jobs: the layer's K region, then its V region, at the
   ``KvLayout`` addresses) and waits for every row's ``done``;
2. reads the keys and values back with an ``AxiReadMaster``, one command per KV-head range
   (decode) or per key row (prefill), in the order the unit takes them, and feeds the unit,
   whose ``q`` comes from outside and whose ``out`` goes out.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from trilut.config import DdrSimConfig
from trilut.hdl.attention.decode import DecodeAttention, DecodeJob
from trilut.hdl.attention.fp32 import Fp32Mul
from trilut.hdl.attention.kv_writer import KvCacheWriter, KvWriteJob
from trilut.hdl.attention.prefill import PrefillAttention, PrefillJob, prefill_batches
from trilut.hdl.elementwise.lanes import lane_signature
from trilut.hdl.memory.axi import AxiReadMaster, ReadJob
from trilut.models.checks import int_in_range, positive_int
from trilut.models.kv_cache import KvLayout

__all__ = ["CoreJob", "AttentionCore", "DECODE", "PREFILL"]

#: Values of the ``mode`` held input.
DECODE, PREFILL = 0, 1


@dataclass(frozen=True)
class CoreJob:
    """One job of the core: a decode step (``prefill`` false: one new token at position
    ``start``, the query at ``start``) or a prefill chunk (``tokens`` new tokens at ``start ..
    start + tokens - 1``, ``plain``: the prefill unit's reference schedule) of layer
    ``layer``, ``heads`` query heads over ``kv_heads`` KV heads; ``ddr`` and ``b_latency``
    the memory's timing, for the cycle model. ``layout`` refuses a chunk past its context
    (:meth:`KvLayout.check_room`'s message)."""
    layout: KvLayout
    layer: int
    start: int
    tokens: int
    heads: int
    kv_heads: int
    prefill: bool
    plain: bool = False
    #: The DDR model's timing, for :meth:`AttentionCore.expected_cycles` only: reads and
    #: writes (``DdrSimConfig``) and the write response's latency (``DdrModel.b_latency``).
    ddr: DdrSimConfig | None = None
    b_latency: int = 2

    def __post_init__(self):
        int_in_range("layer", self.layer, 0, self.layout.layers - 1)
        int_in_range("start", self.start, 0)
        positive_int("tokens", self.tokens)
        int_in_range("kv_heads", self.kv_heads, 1, self.layout.kv_heads, high_name="the "
                     "layout's kv_heads")
        positive_int("heads", self.heads)
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads "
                             f"({self.kv_heads}): every KV head serves a whole group")
        if not self.prefill and self.tokens != 1:
            raise ValueError(f"a decode step writes one token, not {self.tokens}")
        if self.plain and not self.prefill:
            raise ValueError("plain is the prefill unit's schedule; a decode step has none")
        if self.ddr is not None and not isinstance(self.ddr, DdrSimConfig):
            raise TypeError(f"ddr must be a DdrSimConfig, not {self.ddr!r}")
        int_in_range("b_latency", self.b_latency, 1, why="cycles")
        self.layout.check_room(self.start, self.tokens)

    @property
    def unit_job(self):
        """The job of the unit that runs it (``PrefillJob`` or ``DecodeJob``)."""
        if self.prefill:
            return PrefillJob(start=self.start, tokens=self.tokens, heads=self.heads,
                              kv_heads=self.kv_heads, plain=self.plain)
        return DecodeJob(position=self.start, heads=self.heads, kv_heads=self.kv_heads)

    def write_jobs(self) -> list[KvWriteJob]:
        """The writer's two jobs, K region then V region (with the job's DDR timing, or full
        rate when it has none: it only matters for ``KvCacheWriter.expected_cycles``)."""
        lay, ddr = self.layout, self.ddr or DdrSimConfig()
        beats_per_window, window, b_latency = ddr.beats_per_window, ddr.window, self.b_latency
        return [KvWriteJob(lay, base=base + self.layer * lay.layer_stride,
                           position=self.start, positions=self.tokens, heads=self.kv_heads,
                           beats_per_window=beats_per_window, window=window,
                           b_latency=b_latency)
                for base in (lay.k_base, lay.v_base)]

    def read_commands(self, word_bytes: int, n_pe: int) -> list[tuple[int, int]]:
        """The read commands ``(byte address, words)``, in the order the core issues them:
        decode, per KV head its K range ``0 .. start`` then its V range; prefill, per batch
        (``models.attention.prefill_batches``) per key its K row then its V row."""
        from trilut.models.attention import prefill_batches
        lay = self.layout
        row_words = lay.row_bytes // word_bytes
        if not self.prefill:
            return [(lay.address(kind, self.layer, h, 0), (self.start + 1) * row_words)
                    for h in range(self.kv_heads) for kind in ("k", "v")]
        return [(lay.address(kind, self.layer, h, j), row_words)
                for h, _, _, keys in prefill_batches(start=self.start, tokens=self.tokens,
                                                     kv_heads=self.kv_heads, n_pe=n_pe,
                                                     plain=self.plain)
                for j in range(keys) for kind in ("k", "v")]


class AttentionCore(wiring.Component):
    """Decode steps and prefill chunks of attention against the KV cache in DDR.

    Held inputs (constant from a job's first ``kv_new`` beat to its last ``out`` beat):
    ``mode`` (``DECODE`` or ``PREFILL``), ``layer``, ``start`` (decode: the step's position;
    prefill: the chunk's first position), ``tokens`` (1 for decode), ``heads``, ``kv_heads``,
    ``plain`` (prefill only). A job outside the limits is not defined; :meth:`check_job`
    refuses it on the host side.

    Streams (``lane_signature(lanes)``, ``B = head_dim / lanes`` beats a row):

    * ``kv_new`` in: the chunk's K rows (after RoPE), position by position and within a
      position KV head by KV head (``tokens * kv_heads * B`` beats), then its V rows in the
      same order -- the ``KvCacheWriter``'s ``x`` order, one job per region.
    * ``q`` in: the unit's ``q`` order (decode: head-major; prefill:
      ``models.attention.prefill_streams``). Taken only while a job runs.
    * ``out`` out: the unit's ``out`` order.
    * ``axi_read``, ``axi_write``: AXI4 (``AxiReadSignature``, ``AxiWriteSignature``).
    * ``idle`` out: no job; ``error`` out: a non-OKAY response on either port (sticky).

    A job starts when ``idle`` is high and ``kv_new`` offers a beat. Schedule: the writer's K
    and V jobs; every row's ``done`` (``2 tokens kv_heads`` of them); then the read commands
    (:meth:`CoreJob.read_commands`), one per cycle into the read master, whose words go
    through a gearbox (a ``word_bits`` word is ``word_bits / 16 lanes`` lane beats, low
    first) to the unit (decode: a KV head's first ``(start + 1) B`` beats to ``k``, the next
    as many to ``v``; prefill: all to ``kv``); the job ends with its last ``out`` beat.
    """

    def __init__(self, layout: KvLayout, *, lanes: int, n_pe: int, max_heads: int,
                 max_group: int, word_bits: int, addr_width: int, max_outstanding: int,
                 max_burst: int = 16, buffer_depth: int | None = None):
        beat_bits = 16 * lanes
        if word_bits % beat_bits or (word_bits // beat_bits) & (word_bits // beat_bits - 1):
            raise ValueError(f"a {word_bits}-bit DDR word must be a power-of-two number of "
                             f"{beat_bits}-bit lane beats ({lanes} lanes)")
        self.layout = layout
        self.lanes, self.n_pe, self.word_bits = lanes, n_pe, word_bits
        self.max_heads, self.max_group = max_heads, max_group
        self.addr_width = addr_width
        self.writer = KvCacheWriter(layout, lanes=lanes, word_bits=word_bits,
                                    addr_width=addr_width, max_outstanding=max_outstanding)
        self.reader = AxiReadMaster(data_width=word_bits, addr_width=addr_width,
                                    max_outstanding=max_outstanding, max_burst=max_burst,
                                    buffer_depth=buffer_depth)
        unit_args = dict(lanes=lanes, head_dim=layout.head_dim, max_context=layout.max_context,
                         max_heads=max_heads, max_group=max_group)
        self.decode = DecodeAttention(**unit_args)
        self.prefill = PrefillAttention(n_pe=n_pe, **unit_args)
        self.beats = layout.head_dim // lanes
        self.row_words = layout.row_bytes * 8 // word_bits
        ctx = layout.max_context
        super().__init__({
            "kv_new": In(lane_signature(lanes)),
            "q": In(lane_signature(lanes)),
            "out": Out(lane_signature(lanes)),
            "axi_read": Out(self.reader.axi.signature),
            "axi_write": Out(self.writer.axi.signature),
            "mode": In(1),
            "layer": In(range(layout.layers)),
            "start": In(range(ctx)),
            "tokens": In(range(ctx + 1), init=1),
            "heads": In(range(max_heads + 1), init=1),
            "kv_heads": In(range(layout.kv_heads + 1), init=1),
            "plain": In(1),
            "idle": Out(1),
            "error": Out(1),
        })

    # --- the contract ------------------------------------------------------------------------

    def check_job(self, job: CoreJob) -> None:
        """Raise ``ValueError`` naming the value and the limit unless the core runs ``job``
        (the context overflow is refused by ``CoreJob`` itself, with ``KvLayout``'s message)."""
        if not isinstance(job, CoreJob):
            raise TypeError(f"expected a CoreJob, not {job!r}")
        if job.layout != self.layout:
            raise ValueError("the job's KV layout is not the core's")
        (self.prefill if job.prefill else self.decode).check_job(job.unit_job)

    def scalars(self, job: CoreJob) -> dict[str, int]:
        """The held inputs of ``job``."""
        return {"mode": PREFILL if job.prefill else DECODE, "layer": job.layer,
                "start": job.start, "tokens": job.tokens, "heads": job.heads,
                "kv_heads": job.kv_heads, "plain": int(job.plain)}

    def model(self, memory: dict, job: CoreJob, q, k_new, v_new) -> tuple[dict, np.ndarray]:
        """Bit-exact model: DDR ``memory`` (word address -> word) and fp16 codes ``q[H, T,
        d]``, ``k_new, v_new[T, H_kv, d]`` (the chunk's rows, the writer's row order) ->
        (``memory`` after the job, ``out[H, T, d]``): ``KvCacheWriter.model`` twice, then the
        unit's ``model`` on the layer's cache as it is in ``memory`` afterwards."""
        self.check_job(job)
        k_job, v_job = job.write_jobs()
        memory = self.writer.model(memory, k_job, k_new)
        memory = self.writer.model(memory, v_job, v_new)
        k, v = self.cache(memory, job.layer, job.kv_heads)
        if job.prefill:
            out = self.prefill.model(q, k, v, job.start, job.plain)
        else:
            out = self.decode.model(q, k, v, job.start)
        return memory, out

    def cache(self, memory: dict, layer: int, kv_heads: int) -> tuple[np.ndarray, np.ndarray]:
        """fp16 codes ``k, v[kv_heads, max_context, d]`` of ``layer`` as they lie in
        ``memory`` (word address -> word; missing words read as zero)."""
        lay, word_bytes = self.layout, self.word_bits // 8
        out = []
        for kind in ("k", "v"):
            first = lay.address(kind, layer, 0, 0) // word_bytes
            words = [memory.get(first + i, 0)
                     for i in range(kv_heads * lay.head_stride // word_bytes)]
            out.append(lay.words_to_rows(words, self.word_bits)
                       .reshape(kv_heads, lay.max_context, lay.head_dim))
        return out[0], out[1]

    def expected_cycles(self, job: CoreJob) -> int:
        """Cycles from the first ``kv_new`` beat taken to the last ``out`` beat, inclusive,
        with ``kv_new`` and ``q`` always offered and ``out`` never stalled, against a
        ``DdrModel`` of timing ``job.ddr`` (reads and writes) and write response
        ``job.b_latency``.

        Composed from the children's models (cycle 0: the first ``kv_new`` beat; the K job
        was taken on cycle -1):

        * writes: ``KvCacheWriter.expected_cycles`` of the K job; the V job is taken the
          cycle after the last K ``done`` + 1, and runs its own ``expected_cycles``;
        * reads: the commands are presented back to back from 3 cycles after the last V
          ``done`` (``q`` is offered to the unit from 2 cycles after it);
          ``AxiReadTiming`` gives each word's offer given the unit's takes; the gearbox
          offers a word's lane beats one a cycle;
        * the unit: its datapath moves on one enable, so its input demands have fixed
          enabled-cycle offsets (:meth:`_decode_demands`, :meth:`_prefill_demands`, from the
          units' schedules); a demand is served on the first cycle at least its offset after
          the previous one where its beat is offered; the rest runs without a stall
          (decode: ``DecodeAttention.expected_cycles``; prefill: its result recurrence,
          ``PrefillAttention.expected_cycles``'s, in real cycles).
        """
        self.check_job(job)
        if job.ddr is None:
            raise ValueError("the cycle model needs the DDR's timing: give the job ddr=")
        ddr = job.ddr
        k_job, v_job = job.write_jobs()
        last_k_done = -1 + self.writer.expected_cycles(k_job) - 1
        last_v_done = last_k_done + 1 + self.writer.expected_cycles(v_job) - 1
        q_from, r0 = last_v_done + 2, last_v_done + 3
        timing = self.reader.timing(ReadJob(job.read_commands(self.word_bits // 8, self.n_pe),
                                            ddr))
        parts = self.word_bits // (16 * self.lanes)
        taken = []                                           # beat -> cycle taken

        def beat_offer(i):
            if i % parts:
                return taken[-1] + 1
            return r0 + timing.offered(i // parts)

        if job.prefill:
            demands, q_from = self._prefill_demands(job), q_from + 1   # idle -> preload
        else:
            demands = self._decode_demands(job)
        times = []                                           # (enabled cycle, real cycle)
        for e, needs_q, beat in demands:
            t = times[-1][1] + e - times[-1][0] if times else q_from
            if needs_q:
                t = max(t, q_from)
            if beat is not None:
                t = max(t, beat_offer(beat))
                taken.append(t)
                if beat % parts == parts - 1:
                    timing.take(beat // parts, t - r0)
            times.append((e, t))
        enabled = [e for e, _ in times]

        def real(e):
            """The cycle enabled cycle ``e`` runs on: after the last demand at or before it,
            the datapath runs without stalls."""
            i = bisect.bisect_right(enabled, e) - 1
            return times[i][1] + e - times[i][0]

        if not job.prefill:
            return real(self.decode.expected_cycles(job.unit_job) - 1) + 1
        unit, uj = self.prefill, job.unit_job
        B, P = unit.beats, unit.period(uj)
        batches = prefill_batches(uj, self.n_pe)
        v0 = batches[0][2] * uj.group * B + unit.pv_offset
        finish_delay = 1 + unit.finish_wait + Fp32Mul.latency
        keys_done, last_issue = 0, -1
        for _, _, queries, keys in batches:
            keys_done += keys
            beats = queries * uj.group * B
            written = real(v0 + keys_done * P + beats - 1 + finish_delay)
            last_issue = max(written + 1, last_issue + 1) + beats - 1
        return last_issue + 2

    def _decode_demands(self, job: CoreJob) -> list[tuple[int, bool, int | None]]:
        """The decode unit's input demands ``(enabled cycle, q, beat of the read stream or
        None)``: per KV head the score pass (``q`` at position 0, ``k`` at head 0 of the
        group), the drain, the value pass (``v`` at head 0, the empty slots before each later
        position), its drain (``DecodeAttention``'s schedule)."""
        unit, uj = self.decode, job.unit_job
        n, B, P = uj.group, unit.beats, job.start
        out, e, beat = [], 0, 0
        for _ in range(uj.kv_heads):
            for j in range(P + 1):
                for h in range(n):
                    for _ in range(B):
                        if j == 0 or h == 0:
                            out.append((e, j == 0, beat if h == 0 else None))
                            beat += h == 0
                        e += 1
            e += unit.score_latency - B + 2
            for j in range(P + 1):
                if j:
                    e += unit.slots_per_position(n) - n * B
                for h in range(n):
                    for _ in range(B):
                        if h == 0:
                            out.append((e, False, beat))
                            beat += 1
                        e += 1
            e += unit._o_done
        return out

    def _prefill_demands(self, job: CoreJob) -> list[tuple[int, bool, int | None]]:
        """The prefill unit's input demands: the first batch's ``q`` beats (the preload),
        then per key of every batch a period of ``P`` cycles whose first ``2 B`` take the
        key's ``kv`` beats, and whose first ``next_beats`` take the next batch's ``q`` during
        a batch's first key (``PrefillAttention``'s schedule)."""
        unit, uj = self.prefill, job.unit_job
        B, P = unit.beats, unit.period(uj)
        batches = prefill_batches(uj, self.n_pe)
        f0 = batches[0][2] * uj.group * B
        out = [(e, True, None) for e in range(f0)]
        e, beat = f0, 0
        for i, (_, _, _, keys) in enumerate(batches):
            next_beats = batches[i + 1][2] * uj.group * B if i + 1 < len(batches) else 0
            for j in range(keys):
                for tau in range(P):
                    needs_kv, needs_q = tau < 2 * B, j == 0 and tau < next_beats
                    if needs_kv or needs_q:
                        out.append((e, needs_q, beat if needs_kv else None))
                        beat += needs_kv
                    e += 1
        return out

    def memory_blocks(self) -> dict[str, float]:
        """The children's block memories, summed (the decode unit's scores in block RAM:
        ``uram=False``)."""
        total: dict[str, float] = {}
        for blocks in (self.writer.memory_blocks(), self.reader.memory_blocks(),
                       self.decode.memory_blocks(uram=False), self.prefill.memory_blocks()):
            for kind, n in blocks.items():
                total[kind] = total.get(kind, 0) + n
        return total

    # --- the hardware ------------------------------------------------------------------------

    def elaborate(self, platform):
        m = Module()
        lay = self.layout
        L, B, W = self.lanes, self.layout.head_dim // self.lanes, self.word_bits
        m.submodules.writer = writer = self.writer
        m.submodules.reader = reader = self.reader
        m.submodules.decode = dec = self.decode
        m.submodules.prefill = pre = self.prefill
        wiring.connect(m, writer.axi, wiring.flipped(self.axi_write))
        wiring.connect(m, reader.axi, wiring.flipped(self.axi_read))
        m.d.comb += self.error.eq(writer.error | reader.error)

        for unit in (dec, pre):
            m.d.comb += [unit.heads.eq(self.heads), unit.kv_heads.eq(self.kv_heads)]
        m.d.comb += [dec.position.eq(self.start), pre.start.eq(self.start),
                     pre.tokens.eq(self.tokens), pre.plain.eq(self.plain)]

        IDLE, WRITE, READ = range(3)
        state = Signal(range(3), name="state", init=IDLE)
        prefill = Signal(name="prefill_job")
        m.d.comb += self.idle.eq(state == IDLE)

        ctx, H = lay.max_context, lay.kv_heads
        k_layer = Signal(self.addr_width, name="k_layer_base")
        v_layer = Signal(self.addr_width, name="v_layer_base")
        jobs_sent = Signal(range(3), name="jobs_sent")
        dones_left = Signal(range(ctx * H + 1), name="dones_left")
        out_left = Signal(range(ctx * self.max_heads * B + 1), name="out_left")

        done_now = writer.done.valid                  # ``done`` is always ready
        with m.If(done_now):
            m.d.sync += dones_left.eq(dones_left - 1)

        # ---- the job's start ------------------------------------------------------------------
        with m.If((state == IDLE) & self.kv_new.valid):
            m.d.sync += [state.eq(WRITE), prefill.eq(self.mode == PREFILL), jobs_sent.eq(0),
                         k_layer.eq(lay.k_base + self.layer * lay.layer_stride),
                         v_layer.eq(lay.v_base + self.layer * lay.layer_stride),
                         out_left.eq(self.heads * self.tokens * B)]

        # ---- writes: the K job, the V job, every done -----------------------------------------
        job = writer.job
        # The V job waits for every K row's ``done``: each job then runs as
        # ``KvCacheWriter.expected_cycles`` says (its commands back to back), which makes the
        # core's cycles composable (docs/attention_core.md: it costs one write round trip).
        m.d.comb += [job.valid.eq((state == WRITE) & (jobs_sent != 2) & (dones_left == 0)),
                     job.payload.base.eq(Mux(jobs_sent == 0, k_layer, v_layer)),
                     job.payload.position.eq(self.start),
                     job.payload.positions.eq(self.tokens),
                     job.payload.heads.eq(self.kv_heads)]
        with m.If(job.valid & job.ready):
            m.d.sync += [jobs_sent.eq(jobs_sent + 1),
                         dones_left.eq(self.tokens * self.kv_heads)]
        m.d.comb += [writer.x.payload.eq(self.kv_new.payload),
                     writer.x.valid.eq(self.kv_new.valid & (state == WRITE)),
                     self.kv_new.ready.eq(writer.x.ready & (state == WRITE)),
                     writer.done.ready.eq(1)]

        # ---- reads: the command generator -------------------------------------------------------
        # Decode: per KV head ``h``, kind K then V, one range of ``(start + 1)`` rows.
        # Prefill: per KV head, per batch (``first`` from ``tokens - 1`` down by ``n_pe``), per
        # key ``j`` of the batch, K row then V row.
        gen = Signal(name="gen_active")
        g_head = Signal(range(H), name="gen_head")
        g_kind = Signal(name="gen_kind")                      # 0: K, 1: V
        g_first = Signal(range(ctx), name="gen_first")
        g_key = Signal(range(ctx), name="gen_key")
        cmd = reader.cmd
        cmd_free = ~cmd.valid | cmd.ready
        with m.If(cmd.valid & cmd.ready):
            m.d.sync += cmd.valid.eq(0)

        start_reads = (state == WRITE) & (jobs_sent == 2) & (dones_left == 0)
        with m.If(start_reads):
            m.d.sync += [state.eq(READ), gen.eq(1), g_head.eq(0), g_kind.eq(0),
                         g_first.eq(self.tokens - 1), g_key.eq(0)]

        row_bytes = lay.row_bytes
        base = Mux(g_kind, v_layer, k_layer) + g_head * lay.head_stride
        last_key = g_key == Mux(self.plain, self.start + self.tokens - 1, self.start + g_first)
        last_batch = g_first < self.n_pe
        last_head = g_head == self.kv_heads - 1
        with m.If(gen & cmd_free):
            m.d.sync += cmd.valid.eq(1)
            with m.If(prefill):
                m.d.sync += [cmd.payload.addr.eq(base + g_key * row_bytes),
                             cmd.payload.length.eq(self.row_words),
                             g_kind.eq(~g_kind)]
                with m.If(g_kind):
                    m.d.sync += g_key.eq(g_key + 1)
                    with m.If(last_key):
                        m.d.sync += [g_key.eq(0), g_first.eq(g_first - self.n_pe)]
                        with m.If(last_batch):
                            m.d.sync += [g_first.eq(self.tokens - 1), g_head.eq(g_head + 1)]
                            with m.If(last_head):
                                m.d.sync += gen.eq(0)
            with m.Else():
                m.d.sync += [cmd.payload.addr.eq(base),
                             cmd.payload.length.eq((self.start + 1) * self.row_words),
                             g_kind.eq(~g_kind)]
                with m.If(g_kind):
                    m.d.sync += g_head.eq(g_head + 1)
                    with m.If(last_head):
                        m.d.sync += gen.eq(0)

        # ---- words -> lane beats -> the unit ----------------------------------------------------
        parts = W // (16 * L)
        word = reader.data
        beat_valid, beat_ready = Signal(name="beat_valid"), Signal(name="beat_ready")
        beat = Signal(16 * L, name="beat")
        if parts == 1:
            m.d.comb += [beat_valid.eq(word.valid), beat.eq(word.payload),
                         word.ready.eq(beat_ready)]
        else:
            part = Signal(range(parts), name="part")
            m.d.comb += [beat_valid.eq(word.valid), beat.eq(word.payload.word_select(part, 16 * L)),
                         word.ready.eq(beat_ready & (part == parts - 1))]
            with m.If(beat_valid & beat_ready):
                m.d.sync += part.eq(Mux(part == parts - 1, 0, part + 1))

        # Decode: beats alternate between ``k`` and ``v`` every ``(start + 1) B`` beats.
        to_v = Signal(name="route_v")
        routed = Signal(range(ctx * B + 1), name="routed")
        region = (self.start + 1) * B
        with m.If(beat_valid & beat_ready & ~prefill):
            m.d.sync += routed.eq(routed + 1)
            with m.If(routed == region - 1):
                m.d.sync += [routed.eq(0), to_v.eq(~to_v)]
        with m.If(start_reads):
            m.d.sync += [routed.eq(0), to_v.eq(0)]
        reading = state == READ
        m.d.comb += [
            pre.kv.payload.eq(beat), dec.k.payload.eq(beat), dec.v.payload.eq(beat),
            pre.kv.valid.eq(beat_valid & prefill & reading),
            dec.k.valid.eq(beat_valid & ~prefill & ~to_v & reading),
            dec.v.valid.eq(beat_valid & ~prefill & to_v & reading),
            beat_ready.eq(reading & Mux(prefill, pre.kv.ready, Mux(to_v, dec.v.ready,
                                                                    dec.k.ready))),
        ]

        # ---- q in, out out ---------------------------------------------------------------------
        busy = state != IDLE
        m.d.comb += [
            pre.q.payload.eq(self.q.payload), dec.q.payload.eq(self.q.payload),
            # q only once the reads start: the unit's cycles then count from a known point.
            pre.q.valid.eq(self.q.valid & reading & prefill),
            dec.q.valid.eq(self.q.valid & reading & ~prefill),
            self.q.ready.eq(reading & Mux(prefill, pre.q.ready, dec.q.ready)),
            self.out.payload.eq(Mux(prefill, pre.out.payload, dec.out.payload)),
            self.out.valid.eq(busy & Mux(prefill, pre.out.valid, dec.out.valid)),
            pre.out.ready.eq(self.out.ready & busy & prefill),
            dec.out.ready.eq(self.out.ready & busy & ~prefill),
        ]
        with m.If(self.out.valid & self.out.ready):
            m.d.sync += out_left.eq(out_left - 1)
            with m.If((out_left == 1) & (state == READ)):
                m.d.sync += state.eq(IDLE)
        return m
