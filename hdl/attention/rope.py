"""RoPE in the stream behind the Q and K projections (``Rope``), fp16, table-driven, bit-exact
with ``trilut.models.attention.fp16_rope``. docs/attention_rope.md gives the layout, the
table stream and the measured cost; stream protocol and latency convention: ``lanes.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import memory, wiring
from amaranth.lib.wiring import In, Out

from trilut.hdl.elementwise.fp16 import Fp16Add, Fp16Mul
from trilut.hdl.elementwise.lanes import (Pipeline, check_lanes, lane_layout, lane_signature,
                                          positive_int)
from trilut.models import attention as at

__all__ = ["RopeJob", "Rope"]

_SIGN = 1 << 15


@dataclass(frozen=True)
class RopeJob:
    """A run of the unit: ``positions`` positions of ``heads`` head vectors each (the query
    heads ``H`` behind the Q projection, the KV heads ``H_kv`` behind the K projection)."""
    positions: int
    heads: int

    def __post_init__(self):
        positive_int("positions", self.positions)
        positive_int("heads", self.heads)


class Rope(wiring.Component):
    """RoPE on the pair-consecutive layout: ``y0 = round(round(a c) - round(b s))``,
    ``y1 = round(round(b c) + round(a s))`` for each pair ``(a, b)`` = elements ``2i, 2i+1``
    of a head, with ``(c, s)`` the pair's fp16 ``cos``/``sin`` codes of the position.

    * ``x`` in: ``lanes`` fp16 codes a beat; a head is ``head_dim / lanes`` beats, the
      ``heads`` heads of one position follow each other, then the next position.
    * ``table`` in: per position ``head_dim / lanes`` beats; beat ``j`` carries, for the
      ``lanes / 2`` pairs of ``x``'s beat ``j``, ``cos, sin`` interleaved in the same lanes as
      their ``a, b`` (``trilut.models.attention.rope_table_beats``). Taken once per position,
      paired beat by beat with the first head's ``x`` (neither moves without the other), and
      kept in a ``head_dim / lanes``-word buffer that the other ``heads - 1`` heads read.
    * ``heads`` (held input, ``1 .. max_heads``): head vectors per position. Change it only
      between positions (nothing of a position taken yet, or all of it); 0 reads as 1.
    * ``y`` out: the rotated beats, in ``x``'s order.

    ``latency`` 2 (``round(a c)`` etc. in four ``Fp16Mul`` per pair | the two ``Fp16Add``),
    one beat a cycle: a run of ``N`` ``x`` beats with nothing stalled takes ``N + 2`` cycles
    from its first beat taken to its last out, as long as each position's table beats are
    offered by the time its first head arrives (they are never waited for later).
    """

    latency = 2

    def __init__(self, *, lanes: int, head_dim: int, max_heads: int):
        check_lanes(lanes)
        if lanes < 2 or lanes & (lanes - 1):
            raise ValueError(f"lanes must be an even power of two (RoPE pairs sit in lanes 2i "
                             f"and 2i + 1 of a beat), not {lanes!r}")
        positive_int("head_dim", head_dim)
        if head_dim % lanes:
            raise ValueError(f"head_dim must be a multiple of lanes = {lanes} (a head is whole "
                             f"beats), not {head_dim!r}")
        positive_int("max_heads", max_heads)
        self.lanes, self.head_dim, self.max_heads = lanes, head_dim, max_heads
        super().__init__({
            "x": In(lane_signature(lanes)),
            "table": In(lane_signature(lanes)),
            "heads": In(range(max_heads + 1), init=1),
            "y": Out(lane_signature(lanes)),
        })

    @property
    def beats_per_head(self) -> int:
        """``head_dim / lanes``: beats of one head on ``x`` and ``y``, of one position on
        ``table``, and words of the table buffer."""
        return self.head_dim // self.lanes

    def elaborate(self, platform):
        m = Module()
        L, B = self.lanes, self.beats_per_head
        beat = Signal(range(B), name="beat")
        head = Signal(len(self.heads), name="head")
        first_head = Signal()
        m.d.comb += first_head.eq(head == 0)

        # The first head of a position joins x with the table stream; the later heads read
        # the buffer, and the table stream (already offering the next position) waits.
        in_valid = Signal()
        pipe = Pipeline(m, self.latency, in_valid=in_valid, out_ready=self.y.ready, name="rope")
        m.d.comb += [
            in_valid.eq(self.x.valid & (~first_head | self.table.valid)),
            self.x.ready.eq(pipe.in_ready & (~first_head | self.table.valid)),
            self.table.ready.eq(pipe.in_ready & first_head & self.x.valid),
        ]

        # One position's table: head_dim x 16 bits in B words, written as the first head
        # streams and read asynchronously (distributed RAM or registers, never a block RAM).
        # Word j is overwritten only by the next position's beat j, after the last head read
        # it, so a new position needs no bubble and no second buffer.
        m.submodules.table_buffer = buffer = memory.Memory(shape=lane_layout(L), depth=B,
                                                           init=[])
        write = buffer.write_port()
        read = buffer.read_port(domain="comb")
        m.d.comb += [write.addr.eq(beat), write.data.eq(self.table.payload),
                     write.en.eq(pipe.take[0] & first_head), read.addr.eq(beat)]
        cs = Signal(lane_layout(L), name="cos_sin")
        m.d.comb += cs.eq(Mux(first_head, self.table.payload, read.data))

        with m.If(pipe.take[0]):
            m.d.sync += beat.eq(Mux(beat == B - 1, 0, beat + 1))
            with m.If(beat == B - 1):
                # ``head + 1 >= heads`` rather than ``==``: a 0 on ``heads`` reads as 1.
                m.d.sync += head.eq(Mux(head + 1 >= self.heads, 0, head + 1))

        out = Signal(lane_layout(L), name="out")
        for i in range(L // 2):
            a, b = self.x.payload[2 * i], self.x.payload[2 * i + 1]
            c, s = cs[2 * i], cs[2 * i + 1]
            products = []
            for k, (p, q) in enumerate([(a, c), (b, s), (b, c), (a, s)]):
                m.submodules[f"mul{i}_{k}"] = mul = Fp16Mul()
                m.d.comb += [mul.a.eq(p), mul.b.eq(q)]
                reg = Signal(16, name=f"product{i}_{k}")
                with m.If(pipe.take[0]):
                    m.d.sync += reg.eq(mul.y)
                products.append(reg)
            ac, bs, bc, as_ = products
            for k, (p, q) in enumerate([(ac, bs ^ _SIGN), (bc, as_)]):   # a c - b s, b c + a s
                m.submodules[f"add{i}_{k}"] = add = Fp16Add()
                m.d.comb += [add.a.eq(p), add.b.eq(q)]
                with m.If(pipe.take[1]):
                    m.d.sync += out[2 * i + k].eq(add.y)
        m.d.comb += [self.y.valid.eq(pipe.out_valid), self.y.payload.eq(out)]
        return m

    # --- what it computes, costs and takes ------------------------------------------------------

    def model(self, x, cos, sin) -> np.ndarray:
        """fp16 codes ``x[positions, heads, head_dim]`` (the stream's order) rotated by
        ``cos, sin[positions, head_dim / 2]``: ``trilut.models.attention.fp16_rope``."""
        x = np.asarray(x, dtype=np.uint16)
        if x.ndim != 3 or x.shape[2] != self.head_dim:
            raise ValueError(f"x must be [positions, heads, {self.head_dim}] codes, not "
                             f"{x.shape}")
        self._check_heads(x.shape[1])
        return at.fp16_rope(x.transpose(1, 0, 2), cos, sin).transpose(1, 0, 2)

    def expected_cycles(self, job: RopeJob) -> int:
        """Cycles of ``job`` from its first input beat taken to its last ``y`` beat,
        inclusive, with nothing stalled: one ``x`` beat a cycle, then the latency."""
        if not isinstance(job, RopeJob):
            raise TypeError(f"expected a RopeJob, not {job!r}")
        self._check_heads(job.heads)
        return job.positions * job.heads * self.beats_per_head + self.latency

    def memory_blocks(self) -> dict[str, int]:
        """No block RAM or URAM: the table buffer is ``beats_per_head`` words of
        ``16 * lanes`` bits with an asynchronous read, distributed RAM (LUTRAM) in yosys's
        and Vivado's mapping."""
        return {"bram36": 0, "uram": 0}

    def _check_heads(self, heads) -> None:
        if isinstance(heads, bool) or not isinstance(heads, (int, np.integer)) or not (
                1 <= heads <= self.max_heads):
            raise ValueError(f"heads must be an integer from 1 to max_heads = "
                             f"{self.max_heads}, not {heads!r}")
