"""The lane convention and the stream plumbing shared by the element-wise blocks.

fp16 values move as streams of ``L`` lanes per beat: payload ``lane_layout(L)`` =
``data.ArrayLayout(unsigned(16), L)`` of fp16 codes, lane ``i`` at bits ``16 i .. 16 i + 15``
(lane 0 = the lowest element of the row).

Stream protocol of the pipelined lane blocks (``dequant``, ``activation``, ``residual``):
``amaranth.lib.stream`` valid/ready; a beat moves on a clock edge where both are high. Every
pipeline stage has its own valid bit and takes a new beat when it is empty or its beat moves
on (``load = ~valid | load of the next stage``, ``Pipeline``), so backpressure on the output
stalls the pipeline from the back, bubbles are squeezed out, and nothing is dropped or
duplicated. Output ``valid`` and payload are registers. A block with two input streams joins
them beat by beat (``join``): beat ``i`` of one pairs with beat ``i`` of the other, and
neither is taken without the other.

Latency (``latency``): a beat taken on clock edge ``e`` is offered on the output right after
edge ``e + latency - 1`` and can leave on edge ``e + latency``; throughput one beat per cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

from amaranth.hdl import Module, Signal, unsigned
from amaranth.lib import data, stream

# The one parameter check, re-exported: the lane blocks (and the attention units) import it
# from here with the lane helpers.
from trilut.models.checks import int_in_range, positive_int

__all__ = ["positive_int", "check_lanes", "lane_layout", "lane_signature", "Pipeline", "join",
           "PipelineJob", "FixedLatency"]


@dataclass(frozen=True)
class PipelineJob:
    """The job of a fixed-latency block that takes one beat (or one operand set) a cycle:
    ``beats`` of them, back to back."""

    beats: int

    def __post_init__(self):
        positive_int("beats", self.beats)


class FixedLatency:
    """``expected_cycles`` of a block with a constant ``latency`` and one beat a cycle (the
    pipelined lane blocks here, the attention arithmetic of ``hdl/attention/fp32.py``, the
    combinational fp16 units with ``latency`` 0): the first beat taken on cycle 0 leaves
    ``latency`` edges later and the others follow one a cycle, so ``beats + latency`` cycles
    from the first beat in to the last out, inclusive. The block sets ``latency``."""

    def expected_cycles(self, job: PipelineJob) -> int:
        if not isinstance(job, PipelineJob):
            raise TypeError(f"job must be a PipelineJob, not {job!r}")
        return job.beats + self.latency


def check_lanes(lanes) -> None:
    """Raise ``ValueError`` unless ``lanes`` is an integer from 1 to 256."""
    int_in_range("lanes", lanes, 1, 256)


def lane_layout(lanes: int) -> data.ArrayLayout:
    """``lanes`` fp16 codes per beat."""
    check_lanes(lanes)
    return data.ArrayLayout(unsigned(16), lanes)


def lane_signature(lanes: int) -> stream.Signature:
    """A stream of ``lane_layout(lanes)`` beats."""
    return stream.Signature(lane_layout(lanes))


class Pipeline:
    """Valid bits and enables of ``depth`` register stages in a row, with backpressure.

    ``load[k]``: stage ``k`` may take a beat this cycle (it is empty, or its beat moves on);
    ``take[k] = load[k] & (valid of what feeds it)`` is the data registers' enable. The
    ``load`` chain is combinational from ``out_ready`` to ``in_ready`` (one LUT level a stage).
    """

    def __init__(self, m: Module, depth: int, *, in_valid, out_ready, name: str):
        self.valid = [Signal(name=f"{name}{k + 1}_valid") for k in range(depth)]
        self.load = [Signal(name=f"{name}{k + 1}_load") for k in range(depth)]
        self.take = [Signal(name=f"{name}{k + 1}_take") for k in range(depth)]
        for k in reversed(range(depth)):
            downstream = out_ready if k == depth - 1 else self.load[k + 1]
            upstream = in_valid if k == 0 else self.valid[k - 1]
            m.d.comb += [self.load[k].eq(~self.valid[k] | downstream),
                         self.take[k].eq(self.load[k] & upstream)]
            with m.If(self.load[k]):
                m.d.sync += self.valid[k].eq(upstream)

    @property
    def in_ready(self):
        """The input stream's ``ready``: the first stage can take a beat."""
        return self.load[0]

    @property
    def out_valid(self):
        """The output stream's ``valid``: the last stage holds a beat."""
        return self.valid[-1]


def join(m: Module, a: stream.Interface, b: stream.Interface, *, ready, valid) -> None:
    """Pair beat ``i`` of ``a`` with beat ``i`` of ``b``: both move together, when ``ready``.
    Drives the joined ``valid``. Each stream's ``ready`` depends on the other's ``valid``
    (allowed: a sink's ready may depend on valid), never on its own."""
    m.d.comb += [valid.eq(a.valid & b.valid),
                 a.ready.eq(ready & b.valid),
                 b.ready.eq(ready & a.valid)]

