"""Pieces of the cycle models that more than one block composes (BitLinear, the FFN block,
the Q/K/V projection block): where each row's activations can first reach the engine,
and the condition under which the quantizer in front of the engine never makes it wait."""

from __future__ import annotations

from trilut.config import EngineConfig
from trilut.hdl.elementwise.rmsnorm import RmsNorm, RmsNormJob

__all__ = ["check_quantizer_keeps_up", "norm_last_beats"]


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
