# amaranth: UnusedElaboratable=no
"""The FFN block on Verilator: post-attention RMSNorm -> gate / up (one DDR-fed engine, time
shared) -> gated activation -> ffn_sub_norm -> down -> residual add, fp16 in and out.

Bit-exact against the level-2 numerics model (``FfnBlock.model``) under random stalls on every
stream, at two DDR bandwidth settings, on the tiny model's real shapes (256 -> 640 -> 256); the
error of that numerics against the float golden model (``model.layers[0].mlp`` after
``post_attention_layernorm``, plus the residual), measured and bounded; and, with no stall,
the cycles equal ``FfnBlock.expected_cycles`` exactly (decode and a two-row prefill, both
activations, full, half and 3/5 DDR rate, latency hidden and not), printed.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

from ddr_blocks import DATAPATH, ENGINE, EPS, SETTINGS

from trilut.config import DdrSimConfig
from trilut.hdl.decoder.ffn_block import FfnBlock
from trilut.host.layer_runs import ffn_job, ffn_layers, ffn_level2, run_job, with_expected_cycles
from trilut.host.weight_image import compile_weight_image
from trilut.models import numerics as nm
from trilut.models.bitnet import BitNetConfig
from trilut.models.checkpoint import build_tiny_checkpoint, load_checkpoint
from trilut.sim.transport import SimulationTransport, expected_cycles

pytestmark = pytest.mark.rtl


def run_ffn(image, x, *, activation="relu2", ddr, stall, seed=1, run_dir, exact=False,
            max_outstanding=None):
    job = ffn_job(image, x, activation=activation, tile_beats=512, ddr=ddr, eps=EPS,
                  stall=stall, seed=seed, max_outstanding=max_outstanding)
    if exact:
        job = with_expected_cycles(job, [expected_cycles(job.request, job.run.phases[0])])
    (y,), (phase,) = run_job(SimulationTransport(run_dir), job)
    return job, y, phase


def ffn_float_reference(model, h_float: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """Level 1: ``h + mlp(post_attention_layernorm(h))`` in float32."""
    dec = model.layers[layer]
    with torch.no_grad():
        return h_float + dec.mlp(dec.post_attention_layernorm(h_float))


def block_model(block, image, h):
    """``FfnBlock.model`` with the image's tensors."""
    names = ffn_layers(0)
    codes = {k: np.asarray(image.norm(names[k])).astype(np.float16).view(np.uint16)
             for k in ("norm", "sub_norm")}
    return block.model(h, codes["norm"], codes["sub_norm"],
                       *(image.layer_values(names[k]) for k in ("gate", "up", "down")),
                       *(float(image.scale(names[k])) for k in ("gate", "up", "down")))



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
    job, y, _ = run_ffn(image, x, ddr=SETTINGS[setting], stall=0.3, seed=7, run_dir=tmp_path)
    block = FfnBlock(ENGINE, DATAPATH, hidden=256, ffn=640)
    np.testing.assert_array_equal(y, block_model(block, image, x))
    np.testing.assert_array_equal(y, job.expected[0])


def test_ffn_block_silu_bit_exact_under_stalls(tiny_silu, tmp_path):
    model, image, h = tiny_silu
    x = nm.fp16_from_float(h[:1].double().numpy())
    job, y, _ = run_ffn(image, x, activation="silu", ddr=SETTINGS["ddr-full-rate"], stall=0.3,
                        seed=11, run_dir=tmp_path)
    block = FfnBlock(ENGINE, replace(DATAPATH, activation="silu"), hidden=256, ffn=640)
    np.testing.assert_array_equal(y, block_model(block, image, x))


#: Stall-free cases: (fixture, rows, DDR, max_outstanding or None), with the cycles measured
#: (equal to the model).
EXACT = {
    "decode-full-rate": ("tiny", 1, DdrSimConfig(latency=20), None),                  # 21194
    "decode-silu-half-rate": ("tiny_silu", 1, DdrSimConfig(latency=40, window=2), None),  # 42164
    "prefill-full-rate": ("tiny", 2, DdrSimConfig(latency=20), None),                 # 42228
    "decode-slow-ddr-3-of-5": ("tiny", 1, DdrSimConfig(latency=60, beats_per_window=3,
                                                       window=5), 2),     # 35187
    "decode-latency-300-one-burst": ("tiny", 1, DdrSimConfig(latency=300), 1),      # 46115
}


@pytest.mark.parametrize("case", EXACT)
def test_ffn_block_cycles_exact(case, request, tmp_path):
    fixture, rows, ddr, max_outstanding = EXACT[case]
    model, image, h = request.getfixturevalue(fixture)
    x = nm.fp16_from_float(h[:rows].double().numpy())
    job, y, phase = run_ffn(image, x, activation=model.config.hidden_act, ddr=ddr, stall=0.0,
                            run_dir=tmp_path, exact=True, max_outstanding=max_outstanding)
    np.testing.assert_array_equal(y, job.expected[0])
    expected = job.run.phases[0].expected_cycles
    feed = job.weight_words / ddr.words_per_cycle
    print(f"FFN block {case}: {phase.cycles} cycles measured, {expected} expected; "
          f"weight-feed bound {feed:.0f} ({job.weight_words} words), "
          f"cycles / bound {phase.cycles / feed:.3f}")
    assert phase.cycles == expected


@pytest.mark.parametrize("fixture", ["tiny", "tiny_silu"])
def test_ffn_block_numerics_against_the_float_golden_model(fixture, request):
    """Level 2 (what the RTL computes, bit for bit) against level 1 (float32 golden model)."""
    model, image, h = request.getfixturevalue(fixture)
    block = FfnBlock(ENGINE, replace(DATAPATH, activation=model.config.hidden_act), hidden=256,
                     ffn=640)
    x = nm.fp16_from_float(h.double().numpy())
    codes = block_model(block, image, x)
    np.testing.assert_array_equal(
        codes, ffn_level2(image, x, activation=model.config.hidden_act, eps=EPS))
    level2 = nm.fp16_to_float(codes)
    level1 = ffn_float_reference(model, torch.from_numpy(nm.fp16_to_float(x)).float())
    level1 = level1.double().numpy()
    cos = float(np.sum(level1 * level2) / np.linalg.norm(level1) / np.linalg.norm(level2))
    rel = np.linalg.norm(level2 - level1) / np.linalg.norm(level1)
    print(f"FFN block ({model.config.hidden_act}): max abs {np.abs(level2 - level1).max():.3g}, "
          f"rel RMS {rel:.3g}, cosine {cos:.6f}")
    # Two BitLinear quantizations in a row (int8 code flips dominate, docs/elementwise.md).
    assert cos > 0.998 and rel < 0.06
