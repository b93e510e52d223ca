"""The attention half of a decoder layer in hardware (``AttentionBlock``): one prefill chunk or
one decode step of one layer, from the residual rows ``h`` to ``h + o_proj(sub_norm(attn))``,
with the weights, the RoPE table and the KV cache in DDR. docs/attention_block.md gives the
phases, the buffers and the measured figures.

A job runs four phases, one after the other (each drains before the next starts, so each runs
as its own blocks' models say):

1. TABLE: the chunk's RoPE table rows (``tokens`` rows of ``head_dim`` fp16 codes at
   ``rope_base + start * row_bytes``, the ``rope_table_beats`` order) are read from DDR into
   the table FIFO.
2. QKV: ``h`` rows go to the ``QkvBlock`` (norm, one quantization, q | k | v from DDR weights)
   and to the residual FIFO; each row's q and k segments go through ONE ``Rope`` unit (its
   ``heads`` = query heads + KV heads: a row's q heads then its k heads share the position's
   table beats), q into the query buffer (row-major), k into the K FIFO; v into the V FIFO.
3. ATTN: the ``AttentionCore`` takes the chunk's K rows then V rows (``kv_new``) and writes
   them to the cache, reads the cache back and attends; its ``q`` is read from the query
   buffer in the unit's order, its ``out`` written to the output buffer in the same order
   (:func:`query_order`: per KV head, per batch of ``n_pe`` queries from the last, per query
   head of the group; a decode step is the case ``tokens = 1``, head-major).
4. OPROJ: the output buffer's rows, in token order, through ``BitLinear`` (the attention
   sub-norm, o_proj from DDR weights), then ``ResidualAdd`` with the residual FIFO -> ``y``.

Four DDR readers (Q/K/V weights, the table, the KV cache, o_proj weights) share the block's
one AXI4 read port through an ``AxiReadArbiter``; the core's writer is the AXI4 write port.
This block has its own engines for Q/K/V and o_proj (two ``WeightFedTlmm``): it is the
attention half as a unit of verification; the accelerator top shares one engine between all
projections.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import data, fifo, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from trilut.config import DatapathConfig, EngineConfig, memory_blocks, sum_memory
from trilut.hdl.attention.core import DECODE, PREFILL, AttentionCore
from trilut.hdl.attention.rope import Rope
from trilut.hdl.decoder.qkv_block import QkvBlock
from trilut.hdl.elementwise.lanes import lane_signature
from trilut.hdl.elementwise.residual import ResidualAdd
from trilut.hdl.linear.bitlinear import BitLinear
from trilut.hdl.memory.axi import AXI_ADDR_WIDTH, AxiReadMaster
from trilut.hdl.memory.axi_arbiter import AxiReadArbiter
from trilut.models import numerics as nm
from trilut.models.checks import int_in_range, positive_int
from trilut.models.kv_cache import KvLayout

__all__ = ["AttentionBlock", "AttentionBlockJob", "query_order"]


@dataclass(frozen=True)
class AttentionBlockJob:
    """One job: a prefill chunk (``prefill``: ``tokens`` tokens at ``start ..``, ``plain``
    the prefill unit's every-pair schedule) or a decode step (one token at ``start``) of
    ``layer``. The context overflow is refused here, with ``KvLayout.check_room``'s message."""
    layout: KvLayout
    layer: int
    start: int
    tokens: int
    prefill: bool
    plain: bool = False

    def __post_init__(self):
        int_in_range("layer", self.layer, 0, self.layout.layers - 1)
        int_in_range("start", self.start, 0)
        positive_int("tokens", self.tokens)
        if not self.prefill and self.tokens != 1:
            raise ValueError(f"a decode step takes one token, not {self.tokens}")
        if self.plain and not self.prefill:
            raise ValueError("plain is the prefill unit's schedule; a decode step has none")
        self.layout.check_room(self.start, self.tokens)


def query_order(*, tokens: int, heads: int, kv_heads: int, n_pe: int) -> list[tuple[int, int]]:
    """The ``(token, head)`` order in which the attention core takes ``q`` and gives ``out``
    (``models.attention.prefill_batches``: per KV head, batches of ``n_pe`` tokens from the
    last, descending, per query head of the group). A decode step is ``tokens = 1``."""
    group = heads // kv_heads
    out = []
    for h in range(kv_heads):
        for first in range(tokens - 1, -1, -n_pe):
            for i in range(min(n_pe, first + 1)):
                out += [(first - i, h * group + g) for g in range(group)]
    return out


class AttentionBlock(wiring.Component):
    """``h + o_proj(sub_norm(attention(rope(q), rope(k), v)))`` with ``q, k, v = q/k/v_proj(
    norm(h))``, for a chunk of at most ``max_chunk`` rows of ``hidden`` fp16 values.

    Shapes fixed at construction: ``heads`` query heads and ``kv_heads`` KV heads of
    ``layout.head_dim``; one lane width ``C = engine.columns_per_cycle`` everywhere.

    Streams (``C`` fp16 codes a beat unless said):

    * ``job`` in: one beat a job (:meth:`job_payload`); taken only when the block is idle.
    * ``h`` in: the chunk's residual rows, ``hidden / C`` beats each; ``norm_weight`` in: the
      input norm's weights, one row per ``h`` row; ``sub_norm_weight`` in: the attention
      sub-norm's weights (``heads * head_dim``), one row per row.
    * ``qkv_cmd`` / ``qkv_tiles``, ``o_cmd`` / ``o_tiles`` in: the weight schedules of
      q, k, v per row (``QkvBlock``'s) and of o_proj per row (``BitLinear``'s).
    * ``y`` out: the rows ``h + o``, ``hidden / C`` beats each.
    * ``axi_read``, ``axi_write``: AXI4 to DDR.

    Held inputs: ``q_scale``, ``k_scale``, ``v_scale``, ``o_scale`` (fp32 codes), ``rope_base``
    (byte address of position 0's RoPE table row). Out: ``idle``, ``error`` (a non-OKAY
    response on any port, sticky).
    """

    def __init__(self, engine: EngineConfig, datapath: DatapathConfig, layout: KvLayout, *,
                 hidden: int, heads: int, kv_heads: int, n_pe: int, max_chunk: int,
                 addr_width: int = AXI_ADDR_WIDTH):
        C = engine.columns_per_cycle
        d = layout.head_dim
        positive_int("heads", heads)
        int_in_range("kv_heads", kv_heads, 1, layout.kv_heads, high_name="the layout's kv_heads")
        if heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        positive_int("max_chunk", max_chunk)
        if max_chunk > layout.max_context:
            raise ValueError(f"max_chunk {max_chunk} exceeds the context of "
                             f"{layout.max_context} positions")
        self.cfg, self.layout, self.lanes = engine, layout, C
        self.hidden, self.heads, self.kv_heads, self.n_pe = hidden, heads, kv_heads, n_pe
        self.max_chunk, self.eps = max_chunk, datapath.norm_eps
        self.q_out, self.kv_out = heads * d, kv_heads * d
        self.qkv = QkvBlock(engine, hidden=hidden, q_out=self.q_out, kv_out=self.kv_out,
                            datapath=datapath)
        self.rope = Rope(lanes=C, head_dim=d, max_heads=heads + kv_heads)
        W = datapath.ddr_word_bits
        self.word_bits = W
        self.core = AttentionCore(layout, lanes=C, n_pe=n_pe, max_heads=heads,
                                  max_group=heads // kv_heads, word_bits=W, addr_width=addr_width,
                                  max_outstanding=datapath.max_outstanding)
        self.linear = BitLinear(engine, datapath, max_k=self.q_out)
        self.residual = ResidualAdd(lanes=C)
        self.table_reader = AxiReadMaster(data_width=W, addr_width=addr_width,
                                          max_outstanding=datapath.max_outstanding)
        readers = [self.qkv.axi, self.table_reader.axi, self.core.axi_read, self.linear.axi]
        for port in readers:
            if len(port.ar.araddr) != addr_width:
                raise ValueError("every DDR reader of the block must have the same address width")
        self.arbiter = AxiReadArbiter(ports=len(readers), data_width=W, addr_width=addr_width)
        self.beats = d // C                              # beats per head vector
        self.hidden_beats = hidden // C
        self.q_beats, self.kv_beats = self.q_out // C, self.kv_out // C
        self.row_words = layout.row_bytes * 8 // W
        T = max_chunk
        beat = 16 * C
        self.h_fifo = fifo.SyncFIFOBuffered(width=beat, depth=T * self.hidden_beats)
        self.k_fifo = fifo.SyncFIFOBuffered(width=beat, depth=T * self.kv_beats)
        self.v_fifo = fifo.SyncFIFOBuffered(width=beat, depth=T * self.kv_beats)
        self.table_fifo = fifo.SyncFIFOBuffered(width=beat, depth=T * self.beats)
        self.query_buffer = memory.Memory(shape=beat, depth=T * self.q_beats, init=[])
        self.out_buffer = memory.Memory(shape=beat, depth=T * self.q_beats, init=[])
        ctx = layout.max_context
        self.job_layout = data.StructLayout({
            "prefill": 1, "plain": 1, "layer": range(layout.layers), "start": range(ctx),
            "tokens": range(max_chunk + 1)})
        lanes = lane_signature(C)
        super().__init__({
            "job": In(stream.Signature(self.job_layout)),
            "h": In(lanes),
            "norm_weight": In(lanes),
            "sub_norm_weight": In(lanes),
            "qkv_cmd": In(self.qkv.cmd.signature.flip()),
            "qkv_tiles": In(self.qkv.tiles.signature.flip()),
            "o_cmd": In(self.linear.cmd.signature.flip()),
            "o_tiles": In(self.linear.tiles.signature.flip()),
            "y": Out(lanes),
            "axi_read": Out(self.arbiter.m.signature),
            "axi_write": Out(self.core.axi_write.signature),
            "q_scale": In(unsigned(32)),
            "k_scale": In(unsigned(32)),
            "v_scale": In(unsigned(32)),
            "o_scale": In(unsigned(32)),
            "rope_base": In(addr_width),
            "idle": Out(1),
            "error": Out(1),
        })

    # --- the contract ------------------------------------------------------------------------

    def check_job(self, job: AttentionBlockJob) -> None:
        """Raise ``ValueError`` naming the value and the limit unless the block runs ``job``."""
        if not isinstance(job, AttentionBlockJob):
            raise TypeError(f"expected an AttentionBlockJob, not {job!r}")
        if job.layout != self.layout:
            raise ValueError("the job's KV layout is not the block's")
        if job.tokens > self.max_chunk:
            raise ValueError(f"a chunk of {job.tokens} tokens exceeds the block's max_chunk = "
                             f"{self.max_chunk}: split the prompt into chunks")

    def job_payload(self, job: AttentionBlockJob) -> int:
        """The ``job`` stream's beat for ``job``."""
        self.check_job(job)
        fields = self.job_layout
        value = 0
        for name, v in (("prefill", int(job.prefill)), ("plain", int(job.plain)),
                        ("layer", job.layer), ("start", job.start), ("tokens", job.tokens)):
            value |= v << fields[name].offset
        return value

    def model(self, h, norm_weight, sub_norm_weight, q_values, k_values, v_values, o_values,
              scales, cos, sin, k_cache, v_cache, job: AttentionBlockJob) -> np.ndarray:
        """Bit-exact (level 2): ``numerics.fp16_attention`` with the block's lanes (the caches
        ``[kv_heads, S, d]`` are written in place)."""
        self.check_job(job)
        return nm.fp16_attention(
            h, norm_weight, sub_norm_weight, q_values, k_values, v_values, o_values, scales,
            cos, sin, k_cache, v_cache, start=job.start,
            phase="prefill" if job.prefill else "decode", heads=self.heads,
            kv_heads=self.kv_heads, head_dim=self.layout.head_dim, eps=self.eps,
            lanes=self.lanes, attn_lanes=self.lanes)

    def memory_blocks(self, board=None) -> dict[str, float]:
        """The children's block memories and the block's buffers (FIFOs and the query and
        output buffers, in 36 Kib block RAMs)."""
        beat = 16 * self.lanes
        own = [memory_blocks(beat, f.depth) for f in (self.h_fifo, self.k_fifo, self.v_fifo,
                                                       self.table_fifo)]
        own += [memory_blocks(beat, m.depth) for m in (self.query_buffer, self.out_buffer)]
        return sum_memory(self.qkv.memory_blocks(board), self.core.memory_blocks(),
                          self.linear.memory_blocks(board), self.table_reader.memory_blocks(),
                          *own)

    # --- the hardware ------------------------------------------------------------------------

    def elaborate(self, platform):
        m = Module()
        for name in ("qkv", "rope", "core", "linear", "residual", "table_reader", "arbiter",
                     "h_fifo", "k_fifo", "v_fifo", "table_fifo", "query_buffer", "out_buffer"):
            m.submodules[name] = getattr(self, name)
        qkv, rope, core, lin, res = self.qkv, self.rope, self.core, self.linear, self.residual
        arb, tr = self.arbiter, self.table_reader
        hf, kf, vf, tf = self.h_fifo, self.k_fifo, self.v_fifo, self.table_fifo
        C, B, W, lay = self.lanes, self.beats, self.word_bits, self.layout
        for i, port in enumerate((qkv.axi, tr.axi, core.axi_read, lin.axi)):
            wiring.connect(m, port, arb.slave(i))
        wiring.connect(m, arb.m, wiring.flipped(self.axi_read))
        wiring.connect(m, core.axi_write, wiring.flipped(self.axi_write))
        m.d.comb += self.error.eq(qkv.error | tr.error | core.error | lin.error)
        m.d.comb += [qkv.q_scale.eq(self.q_scale), qkv.k_scale.eq(self.k_scale),
                     qkv.v_scale.eq(self.v_scale), rope.heads.eq(self.heads + self.kv_heads)]

        IDLE, TABLE, QKV, ATTN, OPROJ = range(5)
        state = Signal(range(5), name="state", init=IDLE)
        m.d.comb += self.idle.eq(state == IDLE)
        job = Signal(self.job_layout, name="current_job")
        tokens = job.tokens
        m.d.comb += self.job.ready.eq(state == IDLE)

        # ---- 1. TABLE -------------------------------------------------------------------
        tcmd = tr.cmd
        with m.If(tcmd.valid & tcmd.ready):
            m.d.sync += tcmd.valid.eq(0)
        table_left = Signal(range(self.max_chunk * B + 1), name="table_left")
        with m.If(self.job.valid & self.job.ready):
            p = self.job.payload
            m.d.sync += [job.eq(p), state.eq(TABLE), tcmd.valid.eq(1),
                         tcmd.payload.addr.eq(self.rope_base + p.start * lay.row_bytes),
                         tcmd.payload.length.eq(p.tokens * self.row_words),
                         table_left.eq(p.tokens * B)]
        parts = W // (16 * C)
        word = tr.data
        tw = tf.w_stream
        if parts == 1:
            m.d.comb += [tw.payload.eq(word.payload), tw.valid.eq(word.valid),
                         word.ready.eq(tw.ready)]
        else:
            part = Signal(range(parts), name="table_part")
            m.d.comb += [tw.payload.eq(word.payload.word_select(part, 16 * C)),
                         tw.valid.eq(word.valid), word.ready.eq(tw.ready & (part == parts - 1))]
            with m.If(tw.valid & tw.ready):
                m.d.sync += part.eq(Mux(part == parts - 1, 0, part + 1))
        with m.If(tw.valid & tw.ready):
            m.d.sync += table_left.eq(table_left - 1)
        with m.If((state == TABLE) & (table_left == 0)):
            m.d.sync += state.eq(QKV)
        wiring.connect(m, tf.r_stream, rope.table)

        # ---- 2. QKV ---------------------------------------------------------------------
        in_qkv = state == QKV
        h_left = Signal(range(self.max_chunk * self.hidden_beats + 1), name="h_left")
        nw_left = Signal.like(h_left, name="norm_weight_left")
        with m.If(self.job.valid & self.job.ready):
            m.d.sync += [h_left.eq(self.job.payload.tokens * self.hidden_beats),
                         nw_left.eq(self.job.payload.tokens * self.hidden_beats)]
        hw = hf.w_stream
        h_open = in_qkv & (h_left != 0)
        m.d.comb += [qkv.h.payload.eq(self.h.payload), hw.payload.eq(self.h.payload),
                     qkv.h.valid.eq(self.h.valid & hw.ready & h_open),
                     hw.valid.eq(self.h.valid & qkv.h.ready & h_open),
                     self.h.ready.eq(qkv.h.ready & hw.ready & h_open)]
        with m.If(self.h.valid & self.h.ready):
            m.d.sync += h_left.eq(h_left - 1)
        nw_open = in_qkv & (nw_left != 0)
        m.d.comb += [qkv.norm_weight.payload.eq(self.norm_weight.payload),
                     qkv.norm_weight.valid.eq(self.norm_weight.valid & nw_open),
                     self.norm_weight.ready.eq(qkv.norm_weight.ready & nw_open)]
        with m.If(self.norm_weight.valid & self.norm_weight.ready):
            m.d.sync += nw_left.eq(nw_left - 1)
        for outer, inner in ((self.qkv_cmd, qkv.cmd), (self.qkv_tiles, qkv.tiles)):
            m.d.comb += [inner.payload.eq(outer.payload), inner.valid.eq(outer.valid & in_qkv),
                         outer.ready.eq(inner.ready & in_qkv)]

        # q | k | v per row: q and k through RoPE, v into the V FIFO.
        row_beats = self.q_beats + 2 * self.kv_beats
        y_count = Signal(range(row_beats), name="qkv_beat")
        to_rope = y_count < self.q_beats + self.kv_beats
        vw = vf.w_stream
        y = qkv.y
        m.d.comb += [rope.x.payload.eq(y.payload), vw.payload.eq(y.payload),
                     rope.x.valid.eq(y.valid & to_rope), vw.valid.eq(y.valid & ~to_rope),
                     y.ready.eq(Mux(to_rope, rope.x.ready, vw.ready))]
        with m.If(y.valid & y.ready):
            m.d.sync += y_count.eq(Mux(y_count == row_beats - 1, 0, y_count + 1))
        r_count = Signal(range(self.q_beats + self.kv_beats), name="rope_beat")
        is_q = r_count < self.q_beats
        kw = kf.w_stream
        q_wr = self.query_buffer.write_port()
        q_addr = Signal(range(self.max_chunk * self.q_beats + 1), name="query_write_addr")
        m.d.comb += [kw.payload.eq(rope.y.payload), kw.valid.eq(rope.y.valid & ~is_q),
                     q_wr.data.eq(rope.y.payload), q_wr.addr.eq(q_addr),
                     q_wr.en.eq(rope.y.valid & is_q),
                     rope.y.ready.eq(Mux(is_q, 1, kw.ready))]
        with m.If(rope.y.valid & rope.y.ready):
            m.d.sync += r_count.eq(Mux(r_count == self.q_beats + self.kv_beats - 1, 0,
                                       r_count + 1))
            with m.If(is_q):
                m.d.sync += q_addr.eq(q_addr + 1)
        k_in = Signal(range(self.max_chunk * self.kv_beats + 1), name="k_written")
        v_in = Signal.like(k_in, name="v_written")
        with m.If(kw.valid & kw.ready):
            m.d.sync += k_in.eq(k_in + 1)
        with m.If(vw.valid & vw.ready):
            m.d.sync += v_in.eq(v_in + 1)
        chunk_kv = Signal.like(k_in, name="chunk_kv_beats")
        m.d.comb += chunk_kv.eq(tokens * self.kv_beats)
        with m.If(in_qkv & (k_in == chunk_kv) & (v_in == chunk_kv)):
            m.d.sync += [state.eq(ATTN), k_in.eq(0), v_in.eq(0), q_addr.eq(0)]

        # ---- 3. ATTN --------------------------------------------------------------------
        in_attn = state == ATTN
        m.d.comb += [core.mode.eq(Mux(job.prefill, PREFILL, DECODE)), core.layer.eq(job.layer),
                     core.start.eq(job.start), core.tokens.eq(tokens),
                     core.heads.eq(self.heads), core.kv_heads.eq(self.kv_heads),
                     core.plain.eq(job.plain)]
        kv_sent = Signal(range(2 * self.max_chunk * self.kv_beats + 1), name="kv_sent")
        from_v = kv_sent >= chunk_kv
        kr, vr = kf.r_stream, vf.r_stream
        m.d.comb += [core.kv_new.payload.eq(Mux(from_v, vr.payload, kr.payload)),
                     core.kv_new.valid.eq(in_attn & Mux(from_v, vr.valid, kr.valid)
                                          & (kv_sent != 2 * chunk_kv)),
                     kr.ready.eq(in_attn & ~from_v & core.kv_new.ready),
                     vr.ready.eq(in_attn & from_v & core.kv_new.ready & (kv_sent != 2 * chunk_kv))]
        with m.If(core.kv_new.valid & core.kv_new.ready):
            m.d.sync += kv_sent.eq(kv_sent + 1)

        enter_attn = in_qkv & (k_in == chunk_kv) & (v_in == chunk_kv)
        q_rd = self.query_buffer.read_port(transparent_for=())
        q_next = _QueryOrder(self, m, "q_order", restart=enter_attn, tokens=tokens)
        _prefetch(m, "q_prefetch", q_rd, q_next, core.q, active=in_attn,
                  limit=tokens * self.q_beats)
        o_wr = self.out_buffer.write_port()
        o_next = _QueryOrder(self, m, "out_order", restart=enter_attn, tokens=tokens)
        out_left = Signal(range(self.max_chunk * self.q_beats + 1), name="out_left")
        with m.If(enter_attn):
            m.d.sync += [out_left.eq(tokens * self.q_beats), kv_sent.eq(0)]
        m.d.comb += [o_wr.addr.eq(o_next.addr), o_wr.data.eq(core.out.payload),
                     o_wr.en.eq(core.out.valid & in_attn), core.out.ready.eq(in_attn),
                     o_next.advance.eq(core.out.valid & in_attn)]
        with m.If(core.out.valid & in_attn):
            m.d.sync += out_left.eq(out_left - 1)
            with m.If(out_left == 1):
                m.d.sync += state.eq(OPROJ)

        # ---- 4. OPROJ -------------------------------------------------------------------
        in_o = state == OPROJ
        enter_o = in_attn & core.out.valid & (out_left == 1)
        m.d.comb += [lin.k.eq(self.q_out), lin.k_blocks.eq(self.cfg.padded_k(self.q_out)
                                                              // self.cfg.block_k),
                     lin.n_groups.eq(self.hidden // C),
                     lin.tiles_per_row.eq(self.cfg.output_tiles(self.hidden)),
                     lin.weight_scale.eq(self.o_scale)]
        o_rd = self.out_buffer.read_port(transparent_for=())
        seq = _Sequential(m, "out_read", restart=enter_o)
        _prefetch(m, "o_prefetch", o_rd, seq, lin.x, active=in_o,
                  limit=tokens * self.q_beats)
        sn_left = Signal(range(self.max_chunk * self.q_beats + 1), name="sub_norm_left")
        with m.If(enter_o):
            m.d.sync += sn_left.eq(tokens * self.q_beats)
        sn_open = in_o & (sn_left != 0)
        m.d.comb += [lin.norm_weight.payload.eq(self.sub_norm_weight.payload),
                     lin.norm_weight.valid.eq(self.sub_norm_weight.valid & sn_open),
                     self.sub_norm_weight.ready.eq(lin.norm_weight.ready & sn_open)]
        with m.If(self.sub_norm_weight.valid & self.sub_norm_weight.ready):
            m.d.sync += sn_left.eq(sn_left - 1)
        for outer, inner in ((self.o_cmd, lin.cmd), (self.o_tiles, lin.tiles)):
            m.d.comb += [inner.payload.eq(outer.payload), inner.valid.eq(outer.valid & in_o),
                         outer.ready.eq(inner.ready & in_o)]
        wiring.connect(m, lin.y, res.update)
        wiring.connect(m, hf.r_stream, res.residual)
        wiring.connect(m, res.y, wiring.flipped(self.y))
        y_left = Signal(range(self.max_chunk * self.hidden_beats + 1), name="y_left")
        with m.If(enter_o):
            m.d.sync += y_left.eq(tokens * self.hidden_beats)
        with m.If(self.y.valid & self.y.ready):
            m.d.sync += y_left.eq(y_left - 1)
            with m.If(y_left == 1):
                m.d.sync += state.eq(IDLE)
        return m


class _Sequential:
    """Addresses 0, 1, 2, ... (restarted by ``restart``), advanced by ``advance``."""

    def __init__(self, m: Module, name: str, *, restart):
        self.addr = Signal(16, name=f"{name}_addr")
        self.advance = Signal(name=f"{name}_advance")
        with m.If(restart):
            m.d.sync += self.addr.eq(0)
        with m.Elif(self.advance):
            m.d.sync += self.addr.eq(self.addr + 1)


class _QueryOrder:
    """The buffer address of each beat in :func:`query_order`: ``(token * heads + head) *
    beats + beat``, advanced by ``advance``, restarted by ``restart``."""

    def __init__(self, block: AttentionBlock, m: Module, name: str, *, restart, tokens):
        H, Hk, B, n_pe = block.heads, block.kv_heads, block.beats, block.n_pe
        G, T = H // Hk, block.max_chunk
        self.advance = Signal(name=f"{name}_advance")
        kvh = Signal(range(Hk), name=f"{name}_kv_head")
        first = Signal(range(T), name=f"{name}_first")
        i = Signal(range(max(n_pe, 2)), name=f"{name}_query")
        g = Signal(range(max(G, 2)), name=f"{name}_group_head")
        b = Signal(range(max(B, 2)), name=f"{name}_beat")
        self.addr = Signal(range(T * H * B + 1), name=f"{name}_addr")
        token = first - i
        m.d.comb += self.addr.eq((token * H + kvh * G + g) * B + b)
        with m.If(restart):
            m.d.sync += [kvh.eq(0), first.eq(tokens - 1), i.eq(0), g.eq(0), b.eq(0)]
        with m.Elif(self.advance):
            m.d.sync += b.eq(b + 1)
            with m.If(b == B - 1):
                m.d.sync += [b.eq(0), g.eq(g + 1)]
                with m.If(g == G - 1):
                    m.d.sync += [g.eq(0), i.eq(i + 1)]
                    with m.If((i == n_pe - 1) | (i == first)):
                        m.d.sync += [i.eq(0), first.eq(first - n_pe)]
                        with m.If(first < n_pe):
                            m.d.sync += [first.eq(tokens - 1), kvh.eq(kvh + 1)]


def _prefetch(m: Module, name: str, port, order, sink, *, active, limit):
    """Stream a memory's words (``port``: a read port with one cycle of latency) at the
    addresses ``order`` gives into ``sink``, one a cycle when ``sink`` takes them: reads run
    ahead into a 4-word FIFO while ``active``, until ``limit`` words were read."""
    q = fifo.SyncFIFO(width=len(port.data), depth=4)
    m.submodules[name] = q
    inflight = Signal(name=f"{name}_inflight")
    issue = Signal(name=f"{name}_issue")
    room = (q.level + inflight) < 3
    count = Signal(16, name=f"{name}_count")
    with m.If(~active):
        m.d.sync += count.eq(0)
    with m.Elif(issue):
        m.d.sync += count.eq(count + 1)
    m.d.comb += [issue.eq(active & room & (count < limit)), port.addr.eq(order.addr), port.en.eq(issue),
                 order.advance.eq(issue)]
    m.d.sync += inflight.eq(issue)
    m.d.comb += [q.w_data.eq(port.data), q.w_en.eq(inflight),
                 sink.payload.eq(q.r_data), sink.valid.eq(q.r_rdy), q.r_en.eq(sink.ready)]
    return q
