"""The attention units' score path (``ScorePath``): q and k lane beats in, the log2-domain score
``t = round32(fp32_dot(q, k) * C)`` out, bit-exact with ``models.attention.scores``.

Shared by the decode and the prefill attention units: it knows nothing of heads, positions or
softmax orders, only rows of ``head_dim / lanes`` beats and a tag that travels with each row.
Pipelining convention (``latency``, registered outputs): ``hdl/attention/fp32.py``; here one
global clock enable ``en`` moves every stage at once (docs/attention_decode.md says why).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from amaranth.hdl import Const, Module, Mux, Signal, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from trilut.config import no_memory
from trilut.hdl.attention.dot import Fp32DotTree
from trilut.hdl.attention.dot import _check_lanes as check_dot_lanes
from trilut.hdl.attention.fp32 import Fp16ToFp32Product, Fp32Add, Fp32Mul
from trilut.hdl.elementwise.lanes import lane_layout, positive_int
from trilut.models import attention as att
from trilut.models import fp16 as fp

__all__ = ["ScorePath", "ScoreJob", "score_latency", "delay_line"]


def score_latency(*, lanes: int, head_dim: int) -> int:
    """``ScorePath(lanes=lanes, head_dim=head_dim).latency`` without building one: the tree
    (``2 + 5 log2 lanes``), the chain (0 for one beat a row, else ``1 + 5 (B - 1)``), the
    multiply (4)."""
    beats = head_dim // lanes
    chain = 0 if beats == 1 else 1 + Fp32Add.latency * (beats - 1)
    return (Fp16ToFp32Product.latency + (lanes.bit_length() - 1) * Fp32Add.latency + chain
            + Fp32Mul.latency)


def delay_line(m: Module, value, length: int, *, en, name: str) -> list[Signal]:
    """``length`` registers in a row behind ``value``, each loading when ``en`` is high:
    element ``i`` holds ``value`` as it was ``i + 1`` enabled cycles ago (shift registers:
    SRL16/SRL32 LUTs in Vivado's mapping)."""
    stages, previous = [], value
    for i in range(length):
        stage = Signal(len(value), name=f"{name}{i + 1}")
        with m.If(en):
            m.d.sync += stage.eq(previous)
        stages.append(stage)
        previous = stage
    return stages


@dataclass(frozen=True)
class ScoreJob:
    """``rows`` rows of ``head_dim / lanes`` beats through :class:`ScorePath`, one beat every
    enabled cycle, the enable always high."""

    rows: int

    def __post_init__(self):
        positive_int("rows", self.rows)


class ScorePath(wiring.Component):
    """``t = round32(fp32_dot(q, k) * C)``, ``C = score_scale(head_dim)``, for rows of
    ``B = head_dim / lanes`` beats: ``B`` pairs of ``q``, ``k`` lane beats a row, one pair a
    cycle.

    Ports (a bare pipeline, not a stream: the unit around it owns the handshakes):

    * ``en`` in (1 bit, high when unconnected): the clock enable of every stage at once. On a
      cycle with ``en`` low nothing moves and nothing is sampled.
    * ``valid``, ``q``, ``k`` (``lane_layout(lanes)``), ``tag`` (``tag_width`` bits) in: a
      beat pair is taken on every enabled cycle with ``valid`` high. A row's ``B`` pairs must
      come on ``B`` consecutive enabled cycles with ``valid`` high (no gap inside a row: the
      adder chain below is timed by position); rows may follow each other back to back or with
      gaps between them. ``tag`` is sampled with a row's first beat.
    * ``t`` (an fp32 code), ``t_valid``, ``t_tag`` out (registers): ``t_valid`` is high for
      one enabled cycle per row, ``latency`` enabled cycles after the row's first beat was
      taken, with that row's score and tag.

    Inside: ``Fp32DotTree(lanes)`` sums each beat (``fp32_dot``'s pairwise order within a
    beat); a *systolic chain* of ``B - 1`` ``Fp32Add`` adds the beats in order (``acc =
    round32(acc + beat)``): adder ``k`` adds beat ``k`` to adder ``k - 1``'s result, which
    arrives ``1 + 5 (k - 1)`` cycles after beat 0 left the tree, so beat ``k`` waits ``4 (k -
    1)`` cycles in a tapped delay line (one line of ``4 (B - 2)`` fp32 registers serves every
    adder). Rows therefore stream at one beat per cycle whatever ``B``: a single accumulating
    adder would need ``Fp32Add.latency`` = 5 independent rows in flight. Then ``Fp32Mul`` by
    ``C``.

    ``latency`` = tree (2 + 5 log2 lanes) + chain (0 for ``B = 1``, else ``1 + 5 (B - 1)``)
    + 4. Cost: the tree's ``lanes`` DSP48E2 and ``lanes - 1`` adders, ``B - 1`` adders, the
    multiplier's 2 DSP48E2, ``32 (4 (B - 2) + 1)`` delay-line bits; no memory.
    """

    def __init__(self, *, lanes: int, head_dim: int, tag_width: int = 1):
        check_dot_lanes(lanes)
        positive_int("head_dim", head_dim)
        if head_dim % lanes:
            raise ValueError(f"lanes ({lanes}) must divide head_dim ({head_dim}): a row is "
                             f"whole beats")
        positive_int("tag_width", tag_width)
        self.lanes, self.head_dim, self.tag_width = lanes, head_dim, tag_width
        self.beats = head_dim // lanes
        #: ``Fp32DotTree(lanes).latency`` (the tree is built in ``elaborate``, so that an
        #: unelaborated ScorePath leaves no unused block behind).
        self.tree_latency = (Fp16ToFp32Product.latency
                             + (lanes.bit_length() - 1) * Fp32Add.latency)
        #: Cycles from a row's first beat leaving the tree to its sum leaving the chain.
        self.chain_latency = 0 if self.beats == 1 else 1 + Fp32Add.latency * (self.beats - 1)
        self.latency = self.tree_latency + self.chain_latency + Fp32Mul.latency
        assert self.latency == score_latency(lanes=lanes, head_dim=head_dim)
        self.scale_code = int(fp.FP32.encode(np.float64(att.score_scale(head_dim))))
        super().__init__({
            "en": In(1, init=1),
            "valid": In(1),
            "q": In(lane_layout(lanes)),
            "k": In(lane_layout(lanes)),
            "tag": In(unsigned(tag_width)),
            "t": Out(unsigned(32)),
            "t_valid": Out(1),
            "t_tag": Out(unsigned(tag_width)),
        })

    def elaborate(self, platform):
        m = Module()
        en, B = self.en, self.beats
        m.submodules.tree = tree = Fp32DotTree(lanes=self.lanes)
        assert tree.latency == self.tree_latency
        m.d.comb += [tree.a.eq(self.q), tree.b.eq(self.k), tree.en.eq(en.replicate(tree.latency))]

        # The row's first beat: beats are counted as they are taken.
        first = Signal()
        if B == 1:
            m.d.comb += first.eq(1)
        else:
            beat = Signal(range(B), name="beat")
            m.d.comb += first.eq(beat == 0)
            with m.If(en & self.valid):
                m.d.sync += beat.eq(Mux(beat == B - 1, 0, beat + 1))

        # The systolic chain: adder k (1 .. B-1) adds beat k to the running sum.
        acc = tree.y
        if B > 1:
            # One tapped line: tap 1 is adder 1's running sum (beat 0), tap 4 (k - 1) beat k.
            line = delay_line(m, tree.y, max(1, (Fp32Add.latency - 1) * (B - 2)), en=en,
                              name="beat_delay")
            for k in range(1, B):
                m.submodules[f"chain{k}"] = add = Fp32Add()
                wait = (Fp32Add.latency - 1) * (k - 1)     # cycles beat k waits for the sum
                m.d.comb += [add.a.eq(line[0] if k == 1 else acc),
                             add.b.eq(tree.y if wait == 0 else line[wait - 1]),
                             add.en.eq(en.replicate(Fp32Add.latency))]
                acc = add.y

        m.submodules.scale = scale = Fp32Mul()
        m.d.comb += [scale.a.eq(acc), scale.b.eq(Const(self.scale_code, 32)),
                     scale.en.eq(en.replicate(Fp32Mul.latency)), self.t.eq(scale.y)]

        # The row's valid and tag, sampled with its first beat, alongside.
        valid_line = delay_line(m, self.valid & first, self.latency, en=en, name="row_valid")
        tag_line = delay_line(m, self.tag, self.latency, en=en, name="row_tag")
        m.d.comb += [self.t_valid.eq(valid_line[-1]), self.t_tag.eq(tag_line[-1])]
        return m

    def model(self, q, k) -> np.ndarray:
        """fp16 codes ``q``, ``k`` ``[..., head_dim]`` -> fp32 codes of ``scores``."""
        q, k = np.asarray(q, dtype=np.uint16), np.asarray(k, dtype=np.uint16)
        if q.shape[-1:] != (self.head_dim,):
            raise ValueError(f"q must be [..., {self.head_dim}], not {q.shape}")
        return fp.FP32.encode(att.scores(fp.FP16.decode(q), fp.FP16.decode(k), self.lanes))

    def expected_cycles(self, job: ScoreJob) -> int:
        """Cycles from the first row's first beat to the last row's ``t``, inclusive: the
        beats one a cycle, each row's ``t`` ``latency`` cycles after its first beat."""
        return (job.rows - 1) * self.beats + self.latency + 1

    def memory_blocks(self) -> dict[str, float]:
        """None: the delay lines are registers (the class docstring counts their bits)."""
        return no_memory()
