"""Pieces of the cycle models that more than one block composes (BitLinear, the FFN block,
the Q/K/V projection block): where each row's activations can first reach the engine,
and the condition under which the quantizer in front of the engine never makes it wait."""

from __future__ import annotations

from trilut.config import EngineConfig
from trilut.hdl.elementwise.rmsnorm import RmsNorm, RmsNormJob

__all__ = ["check_quantizer_keeps_up", "norm_last_beats", "norm_quant_matmul_cycles"]


def check_quantizer_keeps_up(cfg: EngineConfig, name: str, groups: int, latency: int) -> None:
    """Refuse an engine row of ``groups`` column groups whose tiles (``accumulator_depth``
    groups, the last one ``groups % depth``) are shorter than the quantizer's ``latency``:
    the quantizer then refills its next activation beat late, which the stall-free models
    do not describe."""
    depth = cfg.accumulator_depth
    tail = groups % depth
    if min(groups, depth) < latency or 0 < tail < latency:
        raise ValueError(f"{name}: an engine tile of {min(tail or depth, groups)} column "
                         f"groups is shorter than the quantizer's {latency}-cycle refill: "
                         "the cycle model is exact only without that wait")


def norm_last_beats(norm: RmsNorm, n: int, rows: int) -> list[int]:
    """The cycle each of ``rows`` rows of ``n`` values leaves ``norm`` with its last
    normalized beat, counted from its first input beat taken (never backpressured)."""
    return [norm.expected_cycles(RmsNormJob(n=n, rows=r + 1)) - 1 for r in range(rows)]


def norm_quant_matmul_cycles(block, name: str, n: int, shape: tuple[int, int], job,
                             quant_latency: int) -> int:
    """The stall-free cycles of ``norm -> quantizer -> WeightFedTlmm -> dequantizer`` for
    ``job.rows`` rows of ``n`` values and an engine row of ``shape`` (k blocks, column
    groups), the chain BitLinear and the Q/K/V block share: row ``r``'s last normalized beat
    (:func:`norm_last_beats`) plus ``quant_latency`` is when its first activation beat can
    reach the engine, ``WeightFedTlmm.timing`` does the rest, and the last result leaves
    the dequantizer ``latency + 1`` cycles after it is offered. ``block`` has ``cfg``,
    ``norm``, ``datapath`` and ``dequant``; refused as :func:`check_quantizer_keeps_up`."""
    check_quantizer_keeps_up(block.cfg, name, shape[1], quant_latency)
    first = [t + quant_latency for t in norm_last_beats(block.norm, n, job.rows)]
    results = block.datapath.timing(job.reads, job.tiles, job.ddr, [shape] * job.rows,
                                    lambda row, done: first[row])
    return results[-1][-1] + block.dequant.latency + 1
