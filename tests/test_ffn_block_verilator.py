# amaranth: UnusedElaboratable=no
"""The FFN block on Verilator: post-attention RMSNorm -> gate / up (one DDR-fed engine, time
shared) -> gated activation -> ffn_sub_norm -> down -> residual add, fp16 in and out.

Bit-exact against the level-2 numerics model (``FfnBlock.model``) under random stalls on every
stream, at two DDR bandwidth settings, on the tiny model's real shapes (256 -> 640 -> 256); the
error of that numerics against the float golden model (``model.layers[0].mlp`` after
``post_attention_layernorm``, plus the residual), measured and bounded; and the cycles with no
stall against the weight-feed bound, printed.
"""

import numpy as np
import pytest
import torch

from trilut.config import EngineConfig
from trilut.hdl.ffn_block import FfnBlock
from trilut.host.weight_image import compile_weight_image
from trilut.models import numerics as nm
from trilut.models.bitnet import BitNetConfig
from trilut.models.checkpoint import build_tiny_checkpoint, load_checkpoint
from trilut.sim.ffn_block_run import ffn_float_reference, ffn_level2, run_ffn_block
from trilut.sim.linear_datapath_run import DdrSetting

ENGINE = EngineConfig(group_size=3, tables_per_step=4, columns_per_cycle=4, accumulator_depth=16,
                      max_k=1024)
SETTINGS = {
    "ddr-full-rate": DdrSetting(latency=20, beats_per_window=1, window=1),
    "ddr-half-rate": DdrSetting(latency=40, beats_per_window=1, window=2),
}


def _tiny(path, activation):
    config = BitNetConfig.tiny(hidden_act=activation)
    build_tiny_checkpoint(path, config)
    model = load_checkpoint(path)
    # The residual stream entering the FFN: the prompt's embeddings stand in for it.
    h = model.embed_tokens.weight[torch.tensor(list(b"ternary"))].detach()
    return model, compile_weight_image(model, ENGINE, ddr_word_bits=64), h


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny(tmp_path_factory.mktemp("tiny"), "relu2")


@pytest.fixture(scope="module")
def tiny_silu(tmp_path_factory):
    return _tiny(tmp_path_factory.mktemp("tiny_silu"), "silu")


@pytest.mark.parametrize("setting", SETTINGS)
def test_ffn_block_bit_exact_under_stalls(tiny, setting, tmp_path):
    model, image, h = tiny
    x = nm.fp16_from_float(h[:2].double().numpy())
    out = run_ffn_block(image, x, ddr=SETTINGS[setting], stall=0.3, seed=7, run_dir=tmp_path)
    np.testing.assert_array_equal(out.y, out.expected)


def test_ffn_block_silu_bit_exact_under_stalls(tiny_silu, tmp_path):
    model, image, h = tiny_silu
    x = nm.fp16_from_float(h[:1].double().numpy())
    out = run_ffn_block(image, x, activation="silu", ddr=SETTINGS["ddr-full-rate"], stall=0.3,
                        seed=11, run_dir=tmp_path)
    np.testing.assert_array_equal(out.y, out.expected)


@pytest.mark.parametrize("setting", SETTINGS)
def test_ffn_block_cycles_against_the_weight_feed_bound(tiny, setting, tmp_path):
    model, image, h = tiny
    x = nm.fp16_from_float(h[:1].double().numpy())
    out = run_ffn_block(image, x, ddr=SETTINGS[setting], stall=0.0, run_dir=tmp_path)
    np.testing.assert_array_equal(out.y, out.expected)
    ratio = out.cycles / out.weight_feed_cycles
    print(f"FFN block, {setting}: {out.cycles} cycles, weight-feed bound "
          f"{out.weight_feed_cycles:.0f} ({out.weight_words} words), cycles / bound {ratio:.3f}")
    assert out.cycles >= out.weight_feed_cycles
    assert ratio < 1.5


@pytest.mark.parametrize("fixture", ["tiny", "tiny_silu"])
def test_ffn_block_numerics_against_the_float_golden_model(fixture, request):
    """Level 2 (what the RTL computes, bit for bit) against level 1 (float32 golden model)."""
    model, image, h = request.getfixturevalue(fixture)
    block = FfnBlock(ENGINE, hidden=256, ffn=640, activation=model.config.hidden_act,
                     word_bits=64, tile_beats=512)
    x = nm.fp16_from_float(h.double().numpy())
    level2 = nm.fp16_to_float(ffn_level2(block, image, x))
    level1 = ffn_float_reference(model, torch.from_numpy(nm.fp16_to_float(x)).float())
    level1 = level1.double().numpy()
    cos = float(np.sum(level1 * level2) / np.linalg.norm(level1) / np.linalg.norm(level2))
    rel = np.linalg.norm(level2 - level1) / np.linalg.norm(level1)
    print(f"FFN block ({model.config.hidden_act}): max abs {np.abs(level2 - level1).max():.3g}, "
          f"rel RMS {rel:.3g}, cosine {cos:.6f}")
    # Two BitLinear quantizations in a row (int8 code flips dominate, docs/elementwise.md).
    assert cos > 0.998 and rel < 0.06
