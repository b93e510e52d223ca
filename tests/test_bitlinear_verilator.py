# amaranth: UnusedElaboratable=no
"""A whole BitLinear layer on Verilator: RMSNorm -> int8 quantization -> TLMM with weights
from the DDR image (AXI read master, weight buffer) -> dequantization, fp16 in and out.

Bit-exact against the level-2 numerics model (``BitLinear.model``), under random stalls on
every stream, at two DDR bandwidth settings, on the tiny model's real shapes; without stalls,
the cycles equal ``BitLinear.expected_cycles`` exactly (decode and a two-row prefill; the
weight feed or the norm/quantizer path binding; full, half and 3/5 DDR rate; latency hidden
and not); and the error of that numerics against the float golden model, measured and
bounded.
"""

import numpy as np
import pytest
import torch

from ddr_blocks import DATAPATH, ENGINE, EPS, SETTINGS

from trilut.config import DdrSimConfig
from trilut.hdl.linear.bitlinear import BitLinear
from trilut.host.layer_runs import bitlinear_job, run_job, with_expected_cycles
from trilut.host.weight_image import compile_weight_image
from trilut.models import numerics as nm
from trilut.models.checkpoint import build_tiny_checkpoint, load_checkpoint
from trilut.sim.transport import SimulationTransport, expected_cycles

pytestmark = pytest.mark.rtl

# (layer, the norm in front of it)
LAYERS = [("layers.0.self_attn.q_proj", "layers.0.input_layernorm"),      # 256 -> 256
          ("layers.0.mlp.gate_proj", "layers.0.post_attention_layernorm")]  # 256 -> 640

Q = LAYERS[0]
GATE = LAYERS[1]
#: Stall-free cases: ((layer, norm), rows, DDR, tile_beats, max_outstanding or None), with
#: the cycles measured (equal to the model).
EXACT = {
    "decode-full-rate": (Q, 1, DdrSimConfig(latency=20), 512, None),                  # 2981
    # 64-beat tiles load before the first activation beat: the norm/quantizer path binds.
    "decode-activations-bind": (Q, 1, DdrSimConfig(latency=20), 64, None),            # 2933
    "prefill-half-rate": (GATE, 2, DdrSimConfig(latency=40, window=2), 512, None),    # 28403
    "decode-slow-ddr-3-of-5": (GATE, 1, DdrSimConfig(latency=60, beats_per_window=3,
                                                     window=5), 512, 2),              # 11996
    "prefill-latency-300": (Q, 2, DdrSimConfig(latency=300), 512, 1),                 # 12393
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    build_tiny_checkpoint(path)
    model = load_checkpoint(path)
    # The residual stream entering layer 0: the prompt's embeddings.
    h = model.embed_tokens.weight[torch.tensor(list(b"ternary"))].detach()
    return model, compile_weight_image(model, ENGINE, ddr_word_bits=64), h


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("layer,norm", LAYERS)
def test_bitlinear_bit_exact_under_stalls(tiny, setting, layer, norm, tmp_path):
    model, image, h = tiny
    x = nm.fp16_from_float(h[:2].double().numpy())
    job = bitlinear_job(image, layer, norm, x, ddr=SETTINGS[setting], tile_beats=512, eps=EPS,
                        stall=0.3, seed=5)
    (y,), _ = run_job(SimulationTransport(tmp_path), job)
    n, k = image.layer_values(layer).shape
    hw = BitLinear(ENGINE, DATAPATH, max_k=k)
    norm_w = np.asarray(image.norm(norm)).astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(y, hw.model(x, norm_w, image.layer_values(layer),
                                              float(image.scale(layer))))
    np.testing.assert_array_equal(y, job.expected[0])


@pytest.mark.parametrize("case", EXACT)
def test_bitlinear_cycles_exact(tiny, case, tmp_path):
    model, image, h = tiny
    (layer, norm), rows, ddr, tile_beats, max_outstanding = EXACT[case]
    x = nm.fp16_from_float(h[:rows].double().numpy())
    job = bitlinear_job(image, layer, norm, x, ddr=ddr, tile_beats=tile_beats, eps=EPS,
                        max_outstanding=max_outstanding)
    expected = expected_cycles(job.request, job.run.phases[0])
    job = with_expected_cycles(job, [expected])
    (y,), (phase,) = run_job(SimulationTransport(tmp_path), job)
    np.testing.assert_array_equal(y, job.expected[0])
    print(f"BitLinear {case}: {phase.cycles} cycles measured, {expected} expected")
    assert phase.cycles == expected


def test_bitlinear_numerics_against_the_float_golden_model(tiny):
    """Level 2 (what the RTL computes, bit for bit) against level 1 (float32 golden model)."""
    model, image, h = tiny
    for layer, norm in LAYERS:
        hw = BitLinear(ENGINE, DATAPATH, max_k=256)
        x = nm.fp16_from_float(h.double().numpy())
        norm_w = np.asarray(image.norm(norm)).astype(np.float16).view(np.uint16)
        level2 = nm.fp16_to_float(hw.model(x, norm_w, image.layer_values(layer),
                                           float(image.scale(layer))))
        module = model.get_submodule(norm)
        with torch.no_grad():
            level1 = model.linear(layer)(module(torch.from_numpy(nm.fp16_to_float(x)).float()))
        # The image stores Q/K rows in RoPE pair order (docs/weight_image.md).
        level1 = level1.double().numpy()[..., image.row_order(layer)]
        cos = float(np.sum(level1 * level2) / np.linalg.norm(level1) / np.linalg.norm(level2))
        rel = np.linalg.norm(level2 - level1) / np.linalg.norm(level1)
        print(f"{layer}: max abs {np.abs(level2 - level1).max():.3g}, rel RMS {rel:.3g}, "
              f"cosine {cos:.6f}")
        # Bounds measured on this model (docs/elementwise.md): int8 code flips dominate.
        assert cos > 0.999 and rel < 0.05
