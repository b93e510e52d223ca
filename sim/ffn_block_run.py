"""Run a model's FFN block (norm -> gate / up -> gated activation -> sub-norm -> down ->
residual add, one DDR-fed engine) on Verilator, and measure its error against the float
golden model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trilut.hdl.ffn_block import FfnBlockHarness
from trilut.hdl.row_units import lane_beats, unpack_lane_beats
from trilut.host.weight_image import WeightImage
from trilut.models import numerics as nm
from trilut.sim.linear_datapath_run import DdrSetting, weight_feed_spec
from trilut.sim.runner import run_case

__all__ = ["FfnOutcome", "run_ffn_block", "ffn_layers", "ffn_level2", "ffn_float_reference",
           "ddr_depth_for"]


def ffn_layers(layer: int = 0) -> dict[str, str]:
    p = f"layers.{layer}"
    return {"gate": f"{p}.mlp.gate_proj", "up": f"{p}.mlp.up_proj",
            "down": f"{p}.mlp.down_proj", "norm": f"{p}.post_attention_layernorm",
            "sub_norm": f"{p}.mlp.ffn_sub_norm"}


@dataclass(frozen=True)
class FfnOutcome:
    y: np.ndarray                 # RTL output, fp16 codes [M, hidden]
    expected: np.ndarray          # FfnBlock.model (level 2)
    cycles: int                   # first input beat taken .. last y beat out
    weight_words: int             # DDR words read for all rows
    weight_feed_cycles: float     # weight_words / DDR words per cycle

    @property
    def exact(self) -> bool:
        return np.array_equal(self.y, self.expected)


def ddr_depth_for(image: WeightImage, names) -> int:
    """The smallest power-of-two DDR model depth in which the layers' spans, wrapped modulo the
    depth, do not overlap."""
    spans = [image.ddr_span(n) for n in names]
    depth = 1 << (max(sum(s.words for s in spans) - 1, 1)).bit_length()
    while True:
        used = np.zeros(depth, dtype=bool)
        ok = True
        for s in spans:
            idx = (s.first_word + np.arange(s.words)) % depth
            if s.words > depth or used[idx].any():
                ok = False
                break
            used[idx] = True
        if ok:
            return depth
        depth *= 2


def _norm_codes(image: WeightImage, name: str) -> np.ndarray:
    return np.asarray(image.norm(name)).astype(np.float16).view(np.uint16)


def ffn_level2(block, image: WeightImage, h: np.ndarray, layer: int = 0) -> np.ndarray:
    """``FfnBlock.model`` with the image's weights, norms and scales."""
    names = ffn_layers(layer)
    return block.model(h, _norm_codes(image, names["norm"]), _norm_codes(image, names["sub_norm"]),
                       image.layer_values(names["gate"]), image.layer_values(names["up"]),
                       image.layer_values(names["down"]), float(image.scale(names["gate"])),
                       float(image.scale(names["up"])), float(image.scale(names["down"])))


def ffn_float_reference(model, h_float: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """Level 1: ``h + mlp(post_attention_layernorm(h))`` in float32."""
    dec = model.layers[layer]
    with torch.no_grad():
        return h_float + dec.mlp(dec.post_attention_layernorm(h_float))


def run_ffn_block(image: WeightImage, h: np.ndarray, *, activation: str = "relu2",
                  layer: int = 0, ddr: DdrSetting = DdrSetting(), tile_beats: int = 512,
                  stall: float = 0.0, seed: int = 1,
                  run_dir: Path | None = None) -> FfnOutcome:
    """``h``: fp16 codes ``[M, hidden]``, the residual stream entering the FFN."""
    cfg = image.engine
    names = ffn_layers(layer)
    ffn, hidden = image.layer_values(names["gate"]).shape
    m = h.shape[0]
    depth = ddr_depth_for(image, [names[k] for k in ("gate", "up", "down")])
    harness = FfnBlockHarness(cfg, hidden=hidden, ffn=ffn, activation=activation,
                              ddr_words=depth, word_bits=image.ddr_word_bits,
                              tile_beats=tile_beats, latency=ddr.latency,
                              beats_per_window=ddr.beats_per_window, window=ddr.window)
    block = harness.block
    expected = ffn_level2(block, image, h, layer)
    lanes = cfg.columns_per_cycle
    ddr_words, cmd, tiles, words = [], [], [], 0
    for key in ("gate", "up", "down"):
        spec, schedule = weight_feed_spec(image, names[key], 1, block.datapath, harness.ddr)
        ddr_words += spec["ddr"]
        cmd.append(spec["cmd"])
        tiles.append(spec["tiles"])
        words += sum(t.words for t in schedule)
    norm_w = _norm_codes(image, names["norm"])
    sub_w = _norm_codes(image, names["sub_norm"])
    case = {
        "word_addr_width": harness.ddr.word_addr_width, "ddr": ddr_words,
        "cmd": [c for _ in range(m) for part in cmd for c in part],
        "tiles": [t for _ in range(m) for part in tiles for t in part],
        **{f"{k}_scale": int(nm.fp32_from_float(np.float64(image.scale(names[k]))))
           for k in ("gate", "up", "down")},
        "h": [format(b, "x") for b in lane_beats(h, lanes)],
        "norm_weight": [format(b, "x") for b in lane_beats(np.tile(norm_w, (m, 1)), lanes)],
        "sub_norm_weight": [format(b, "x") for b in lane_beats(np.tile(sub_w, (m, 1)), lanes)],
        "expected": [format(b, "x") for b in lane_beats(expected, lanes)],
        "stall": stall, "seed": seed,
    }
    seen, _ = run_case(harness, name="ffn_block", test_module="trilut.sim.tb_ffn_block",
                       case=case, run_dir=run_dir)
    y = unpack_lane_beats([int(b, 16) for b in seen["y"]], m, hidden, lanes)
    return FfnOutcome(y=y, expected=expected, cycles=seen["cycles"], weight_words=words * m,
                      weight_feed_cycles=words * m / ddr.words_per_cycle)
