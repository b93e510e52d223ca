"""fp16 test rows for the row units' tests (Verilator and amaranth.sim): rows drawn like real
activations, and the named edge rows."""

import numpy as np

from trilut.models import fp16 as fp

__all__ = ["activation_rows", "edge_rows"]


def activation_rows(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """fp16 codes ``[rows, n]`` drawn like real activations: normal values times a per-row
    scale spread over decades (exponential in log2), so rows differ in magnitude as residual
    streams and linear outputs do; about one row in three gets an outlier channel."""
    scale = np.exp2(rng.normal(0.0, 3.0, (rows, 1)))
    x = rng.normal(0.0, 1.0, (rows, n)) * scale
    for r in range(rows):
        if rng.random() < 0.35:
            x[r, rng.integers(n)] *= rng.choice([-1, 1]) * rng.uniform(50, 2000)
    return fp.fp16_from_float(np.clip(x, -65504, 65504))


def edge_rows(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """The named edge rows (each ``[1, n]`` fp16 codes)."""
    base = rng.normal(0.0, 1.0, n)
    outlier = base.copy()
    outlier[rng.integers(n)] = 3000.0
    tiny = rng.normal(0.0, 1.0, n) * 1e-4            # straddles fp16's smallest normal
    signed_max = np.where(rng.random(n) < 0.5, -65504.0, 65504.0)
    zeros = np.zeros(n, np.uint16)
    zeros[::2] = 0x8000                               # +0 and -0
    subnormal = rng.integers(1, 0x400, n).astype(np.uint16) | np.where(
        rng.random(n) < 0.5, 0x8000, 0).astype(np.uint16)
    ties = fp.fp16_from_float(np.resize([127.0, -127.0, 63.5, -0.5, 1.5, 2.5], n))
    return {
        "outlier": fp.fp16_from_float(outlier)[None],
        "zeros": zeros[None],
        "fp16-max": fp.fp16_from_float(signed_max)[None],
        "tiny": fp.fp16_from_float(tiny)[None],
        "subnormals": subnormal[None],
        "ties": ties[None],
    }
