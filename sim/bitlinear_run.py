"""Run a model's BitLinear layer (norm -> quantize -> TLMM from DDR -> dequantize) on
Verilator, and measure its error against the float golden model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trilut.hdl.bitlinear import BitLinearHarness
from trilut.hdl.row_units import lane_beats, unpack_lane_beats
from trilut.host.weight_image import WeightImage
from trilut.models import numerics as nm
from trilut.sim.linear_datapath_run import DdrSetting, weight_feed_spec
from trilut.sim.runner import run_case

__all__ = ["BitLinearOutcome", "run_bitlinear"]


@dataclass(frozen=True)
class BitLinearOutcome:
    layer: str
    y: np.ndarray                 # RTL output, fp16 codes [M, N]
    expected: np.ndarray          # BitLinear.model (level 2)
    cycles: int

    @property
    def exact(self) -> bool:
        return np.array_equal(self.y, self.expected)


def run_bitlinear(image: WeightImage, layer: str, norm: str, x: np.ndarray, *,
                  ddr: DdrSetting = DdrSetting(), tile_beats: int = 512,
                  ddr_words: int = 8192, stall: float = 0.0, seed: int = 1,
                  run_dir: Path | None = None) -> BitLinearOutcome:
    """``x``: fp16 codes ``[M, K]`` entering the layer's norm ``norm`` (an image norm name)."""
    cfg = image.engine
    values = image.layer_values(layer)
    n, k = values.shape
    m = x.shape[0]
    harness = BitLinearHarness(cfg, max_k=cfg.padded_k(k), ddr_words=ddr_words,
                               word_bits=image.ddr_word_bits, tile_beats=tile_beats,
                               latency=ddr.latency, beats_per_window=ddr.beats_per_window,
                               window=ddr.window)
    layer_hw = harness.layer
    norm_w = np.asarray(image.norm(norm)).astype(np.float16).view(np.uint16)
    scale = float(image.scale(layer))
    expected = layer_hw.model(x, norm_w, values, scale)
    lanes = cfg.columns_per_cycle
    spec, _schedule = weight_feed_spec(image, layer, m, layer_hw.datapath, harness.ddr)
    spec.update({
        "k": k, "tiles_per_row": layer_hw.quant.tiles_for(n),
        "weight_scale": int(nm.fp32_from_float(np.float64(scale))),
        "x": [format(b, "x") for b in lane_beats(x, lanes)],
        "norm_weight": [format(b, "x") for b in lane_beats(np.tile(norm_w, (m, 1)), lanes)],
        "expected": [format(b, "x") for b in lane_beats(expected, lanes)],
        "stall": stall, "seed": seed,
    })
    seen, _ = run_case(harness, name="bitlinear", test_module="trilut.sim.tb_bitlinear",
                       case=spec, run_dir=run_dir)
    y = unpack_lane_beats([int(b, 16) for b in seen["y"]], m, n, lanes)
    return BitLinearOutcome(layer=layer, y=y, expected=expected, cycles=seen["cycles"])


def float_reference(model, layer: str, norm_module, x_float: torch.Tensor) -> torch.Tensor:
    """Level 1: the golden model's norm and BitLinear in float32."""
    with torch.no_grad():
        return model.linear(layer)(norm_module(x_float))
