"""The KV-cache writer: K or V rows from the stream into DDR, through the AXI4 write master.

``KvCacheWriter`` takes the rows of one region (K after RoPE, or V) as lane beats, position
by position and, within a position, KV head by KV head (``head_dim / lanes`` beats a row,
the order the projections produce them), and writes each row to its place in the layout of
``trilut.models.kv_cache.KvLayout``::

    address = base + head * head_stride + (position + row_of_position) * row_bytes

A job (``job`` stream: ``base`` = the region's base plus the layer's offset, the first
``position``, ``positions`` and ``heads``) describes the rows that follow. Each row is one
write command of ``row_bytes / word_bytes`` words (one burst: a row of 64 fp16 is 128 bytes).
The lane beats go to DDR words through a gearbox: a beat of ``16 * lanes`` bits is
``16 * lanes / word_bits`` words when it is wider, or a word packs ``word_bits / (16 *
lanes)`` beats when it is narrower (element 0 in the low bits, as ``KvLayout.rows_to_words``).

``done`` carries one beat per row, after its write response (payload ``resp``, 0 = OKAY):
a row is in DDR, readable by the attention units, when its ``done`` beat has left.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from trilut.hdl.elementwise.lanes import lane_signature
from trilut.hdl.memory.axi_write import AxiWriteMaster, WriteJob
from trilut.models.checks import int_in_range, positive_int
from trilut.models.kv_cache import KvLayout

__all__ = ["KvCacheWriter", "KvWriteJob"]


class KvWriteJob:
    """One job of the writer: ``positions`` rows of ``heads`` each, from ``position``, into
    ``layout`` at ``base``; and, for :meth:`KvCacheWriter.expected_cycles`, ``DdrModel``'s
    write timing (``beats_per_window`` / ``window``, ``b_latency``)."""

    __slots__ = ("layout", "base", "position", "positions", "heads", "beats_per_window",
                 "window", "b_latency")

    def __init__(self, layout: KvLayout, *, base: int, position: int, positions: int,
                 heads: int, beats_per_window: int, window: int, b_latency: int):
        int_in_range("heads", heads, 1, layout.kv_heads, high_name="kv_heads")
        positive_int("positions", positions)
        layout.check_room(position, positions)
        self.layout, self.base, self.position, self.positions = layout, base, position, positions
        self.heads = heads
        self.beats_per_window, self.window, self.b_latency = beats_per_window, window, b_latency

    def commands(self, word_bytes: int) -> list[tuple[int, int]]:
        """The write commands ``(byte address, words)``, in order."""
        lay = self.layout
        return [(self.base + h * lay.head_stride + (self.position + p) * lay.row_bytes,
                 lay.row_bytes // word_bytes)
                for p in range(self.positions) for h in range(self.heads)]

    def payload(self, position_bits: int, addr_bits: int) -> int:
        """The ``job`` stream beat: ``base``, ``position``, ``positions``, ``heads``."""
        return (self.base | self.position << addr_bits
                | self.positions << (addr_bits + position_bits)
                | self.heads << (addr_bits + 2 * position_bits))
class KvCacheWriter(wiring.Component):
    """Jobs and rows of lane beats in, write commands and words out on ``axi``, a ``done``
    per row.

    Ports: ``job`` (stream of ``job_layout``: ``base`` byte address, first ``position``,
    ``positions``, ``heads``; :meth:`KvWriteJob.payload` packs one), ``x``
    (``lane_signature(lanes)``: the job's rows, position-major), ``done`` (stream, payload
    ``resp``), ``axi`` (``AxiWriteSignature``), ``error`` (a non-OKAY write response,
    sticky) and ``idle``.

    A job is taken when the previous one's commands are all issued and its beats all taken;
    its row commands then go to the write master one per cycle, ahead of the data (the master
    holds them back to ``max_outstanding`` bursts awaiting a response), and ``x`` is taken
    as fast as the gearbox passes words on.
    """

    def __init__(self, layout: KvLayout, *, lanes: int, word_bits: int, addr_width: int,
                 max_outstanding: int):
        beat_bits = 16 * lanes
        row_bits = 16 * layout.head_dim
        if layout.head_dim % lanes:
            raise ValueError(f"lanes ({lanes}) must divide head_dim ({layout.head_dim})")
        if row_bits % word_bits:
            raise ValueError(f"a row of {layout.head_dim} fp16 ({row_bits} bits) must be whole "
                             f"{word_bits}-bit words")
        wide, narrow = max(beat_bits, word_bits), min(beat_bits, word_bits)
        if wide % narrow or (wide // narrow) & (wide // narrow - 1):
            raise ValueError(f"lane beats of {beat_bits} bits and {word_bits}-bit words must "
                             f"differ by a power of two")
        self.layout = layout
        self.lanes = lanes
        self.word_bits = word_bits
        self.addr_width = addr_width
        self.beats_per_row = layout.head_dim // lanes
        self.words_per_row = row_bits // word_bits
        self.position_bits = (layout.max_context).bit_length()
        self.job_layout = data.StructLayout({
            "base": unsigned(addr_width),
            "position": unsigned(self.position_bits),
            "positions": unsigned(self.position_bits),
            "heads": unsigned(self.position_bits),
        })
        self.master = AxiWriteMaster(data_width=word_bits, addr_width=addr_width,
                                     max_outstanding=max_outstanding)
        super().__init__({
            "job": In(stream.Signature(self.job_layout)),
            "x": In(lane_signature(lanes)),
            "done": Out(self.master.done.signature),
            "axi": Out(self.master.axi.signature),
            "error": Out(1),
            "idle": Out(1),
        })

    def job_payload(self, job: KvWriteJob) -> int:
        return job.payload(self.position_bits, self.addr_width)

    def model(self, memory: dict, job: KvWriteJob, rows) -> dict:
        """Bit-exact model: ``memory`` (DDR word address -> word) after the rows (fp16 codes
        ``[positions, heads, head_dim]``) were written."""
        word_bytes = self.word_bits // 8
        words = self.layout.rows_to_words(rows, self.word_bits)
        memory = dict(memory)
        at = 0
        for addr, n in job.commands(word_bytes):
            for i in range(n):
                memory[addr // word_bytes + i] = words[at]
                at += 1
        return memory

    @property
    def word_interval(self) -> int:
        """Cycles from one word leaving the gearbox to the next being offered, at the
        earliest: 1 when a beat is one or more words, ``word_bits / (16 lanes)`` beats
        otherwise (they come one per cycle)."""
        return max(1, self.word_bits // (16 * self.lanes))

    def expected_cycles(self, job: KvWriteJob) -> int:
        """Cycles from the ``job`` beat taken to the last ``done`` out, inclusive, with ``x``
        always offered and ``done`` never stalled. The job is taken on cycle 0 and its first
        row command offered to the write master from cycle 2 (the job register, then the
        command register), which is the master's cycle 0 (:meth:`AxiWriteMaster.
        expected_cycles`); ``x`` is taken from cycle 1, so the gearbox offers word 0 on the
        master's cycle ``word_interval - 1`` and word ``n`` ``word_interval`` cycles after
        word ``n - 1`` left."""
        word_bytes = self.word_bits // 8
        gap = self.word_interval
        return 2 + self.master.expected_cycles(
            WriteJob(job.commands(word_bytes), beats_per_window=job.beats_per_window,
                     window=job.window, b_latency=job.b_latency),
            word_offer=lambda n, previous: gap - 1 if n == 0 else previous + gap)

    def memory_blocks(self) -> dict[str, float]:
        """The write master's queues; the job and gearbox registers are flip-flops."""
        return self.master.memory_blocks()

    def elaborate(self, platform):
        m = Module()
        m.submodules.master = master = self.master
        lay = self.layout
        wiring.connect(m, master.axi, wiring.flipped(self.axi))
        wiring.connect(m, master.done, wiring.flipped(self.done))
        m.d.comb += [self.error.eq(master.error)]

        # ---- the job: its row commands, one per cycle -------------------------------------------
        job = Signal(self.job_layout)
        rows_left = Signal(range(lay.max_context * lay.kv_heads + 1))
        beats_left = Signal(range(lay.max_context * lay.kv_heads * self.beats_per_row + 1))
        head = Signal(range(lay.kv_heads))
        row_pos = Signal(self.position_bits)
        cmd = master.cmd
        cmd_free = ~cmd.valid | cmd.ready
        m.d.comb += self.job.ready.eq((rows_left == 0) & (beats_left == 0) & cmd_free)
        with m.If(cmd.valid & cmd.ready):
            m.d.sync += cmd.valid.eq(0)
        with m.If(self.job.valid & self.job.ready):
            p = self.job.payload
            m.d.sync += [job.eq(p), head.eq(0), row_pos.eq(0),
                         rows_left.eq(p.positions * p.heads),
                         beats_left.eq(p.positions * p.heads * self.beats_per_row)]
        with m.Elif((rows_left != 0) & cmd_free):
            m.d.sync += [
                cmd.valid.eq(1),
                cmd.payload.addr.eq(job.base + head * lay.head_stride
                                    + (job.position + row_pos) * lay.row_bytes),
                cmd.payload.length.eq(self.words_per_row),
                rows_left.eq(rows_left - 1),
            ]
            with m.If(head == job.heads - 1):
                m.d.sync += [head.eq(0), row_pos.eq(row_pos + 1)]
            with m.Else():
                m.d.sync += head.eq(head + 1)

        # ---- the gearbox: lane beats -> DDR words ------------------------------------------------
        words = master.data
        beat_bits = 16 * self.lanes
        x_take = self.x.valid & self.x.ready
        if beat_bits >= self.word_bits:
            parts = beat_bits // self.word_bits
            held = Signal(beat_bits)
            part = Signal(range(parts))
            full = Signal()
            m.d.comb += [words.valid.eq(full),
                         words.payload.eq(held.word_select(part, self.word_bits))]
            out = words.valid & words.ready
            last_part = part == parts - 1
            with m.If(out):
                m.d.sync += part.eq(0 if parts == 1 else (part + 1) % parts)
                with m.If(last_part):
                    m.d.sync += full.eq(0)
            can_take = ~full | (out & last_part)
            with m.If(x_take):
                m.d.sync += [held.eq(self.x.payload.as_value()), full.eq(1)]
        else:
            per_word = self.word_bits // beat_bits
            packed = Signal(self.word_bits)
            count = Signal(range(per_word + 1))
            m.d.comb += [words.valid.eq(count == per_word), words.payload.eq(packed)]
            out = words.valid & words.ready
            can_take = (count != per_word) | out
            with m.If(out):
                m.d.sync += count.eq(0)
            with m.If(x_take):
                m.d.sync += [packed.eq(Cat(packed[beat_bits:], self.x.payload.as_value())),
                             count.eq(Mux(out, 1, count + 1))]
        m.d.comb += self.x.ready.eq(can_take & (beats_left != 0))
        with m.If(x_take & ~(self.job.valid & self.job.ready)):
            m.d.sync += beats_left.eq(beats_left - 1)
        m.d.comb += self.idle.eq(master.idle & ~cmd.valid & (rows_left == 0)
                                 & (beats_left == 0) & ~words.valid)
        return m
