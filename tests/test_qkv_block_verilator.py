# amaranth: UnusedElaboratable=no
"""The Q/K/V projection block on Verilator: input RMSNorm -> one int8 quantization per row ->
q, k, v on one DDR-fed engine -> dequantization with each matrix's scale, fp16 out as q | k |
v per row.

On the tiny model's layer 0 (hidden 256; 4 q heads and 2 kv heads of 64: q_out 256, kv_out
128): bit-exact against the level-2 numerics (``QkvBlock.model``, ``numerics.fp16_qkv``) for
decode (one row) and prefill (two rows) at both DDR settings, with no stall at exactly
``QkvBlock.expected_cycles`` and under random stalls on every stream; and the level-2 error
against the float golden model (``q/k/v_proj(input_layernorm(h))``, q and k rows in the
image's RoPE pair order), measured and bounded.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

from ddr_blocks import DATAPATH, ENGINE, EPS, SETTINGS

from trilut.hdl.decoder.qkv_block import QkvBlock
from trilut.host.layer_runs import qkv_job, qkv_layers, qkv_level2, run_job, with_expected_cycles
from trilut.host.weight_image import compile_weight_image, stored_row_order
from trilut.models import numerics as nm
from trilut.models.bitnet import BitNetConfig
from trilut.models.checkpoint import build_tiny_checkpoint, load_checkpoint
from trilut.sim.transport import SimulationTransport, _mark_used, expected_cycles

pytestmark = pytest.mark.rtl

HIDDEN, Q_OUT, KV_OUT = 256, 256, 128


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    config = BitNetConfig.tiny()
    build_tiny_checkpoint(path, config)
    model = load_checkpoint(path)
    # The residual stream entering the attention half: the prompt's embeddings stand in.
    h = model.embed_tokens.weight[torch.tensor(list(b"ternary"))].detach()
    return model, compile_weight_image(model, ENGINE, ddr_word_bits=64), h


def block_model(image, h):
    """``QkvBlock.model`` with the image's tensors."""
    block = QkvBlock(ENGINE, hidden=HIDDEN, q_out=Q_OUT, kv_out=KV_OUT, datapath=DATAPATH)
    _mark_used(block)                       # built for its model only, never elaborated
    names = qkv_layers(0)
    norm_w = np.asarray(image.norm(names["norm"])).astype(np.float16).view(np.uint16)
    return block.model(h, norm_w, *(image.layer_values(names[k]) for k in "qkv"),
                       *(float(image.scale(names[k])) for k in "qkv"))


def test_tiny_layer_shapes(tiny):
    model, image, _ = tiny
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim,
            cfg.num_key_value_heads * cfg.head_dim) == (HIDDEN, Q_OUT, KV_OUT)


# Stall-free cycles measured (equal to the model): decode 5867 (full rate) / 11507 (half
# rate), prefill 11511 / 22771; the weight feed's bound is 5632 words a row.


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("rows", [1, 2], ids=["decode", "prefill"])
def test_qkv_block_bit_exact_and_cycles(tiny, rows, setting, tmp_path):
    """Two phases on one build: stall-free at exactly ``expected_cycles``, then random
    stalls 0.3 on every stream; both bit-exact."""
    model, image, h = tiny
    x = nm.fp16_from_float(h[:rows].double().numpy())
    ddr = SETTINGS[setting]
    exact = qkv_job(image, x, tile_beats=DATAPATH.tile_beats, ddr=ddr, eps=EPS)
    exact = with_expected_cycles(exact, [expected_cycles(exact.request, exact.run.phases[0])])
    stalled = qkv_job(image, x, tile_beats=DATAPATH.tile_beats, ddr=ddr, eps=EPS, stall=0.3,
                      seed=7 + rows)
    # One run, two phases: the DDR holds the same weights for both.
    phases = [replace(exact.run.phases[0], name="stall-free"),
              replace(stalled.run.phases[0], name="stalls-0.3")]
    job = replace(exact, run=replace(exact.run, phases=phases))
    (y0, y1), (p0, p1) = run_job(SimulationTransport(tmp_path), job)
    reference = block_model(image, x)
    np.testing.assert_array_equal(y0, reference)
    np.testing.assert_array_equal(y1, reference)
    np.testing.assert_array_equal(reference, exact.expected[0])
    expected = job.run.phases[0].expected_cycles
    feed = exact.weight_words / ddr.words_per_cycle
    print(f"QKV block rows={rows} {setting}: {p0.cycles} cycles measured, {expected} expected; "
          f"weight-feed bound {feed:.0f} ({exact.weight_words} words), "
          f"cycles / bound {p0.cycles / feed:.3f}; stalled phase {p1.cycles}")
    assert p0.cycles == expected


def test_qkv_block_numerics_against_the_float_golden_model(tiny):
    """Level 2 (what the RTL computes, bit for bit) against level 1 (float32 golden model)."""
    model, image, h = tiny
    x = nm.fp16_from_float(h.double().numpy())
    codes = block_model(image, x)
    q, k, v = qkv_level2(image, x, eps=EPS)
    np.testing.assert_array_equal(codes, np.concatenate([q, k, v], axis=1))
    attn = model.layers[0]
    with torch.no_grad():
        xn = attn.input_layernorm(torch.from_numpy(nm.fp16_to_float(x)).float())
        ref = {p: getattr(attn.self_attn, f"{p}_proj")(xn).double().numpy() for p in "qkv"}
    for p, level2 in zip("qkv", (q, k, v)):
        order = stored_row_order(model.config, f"layers.0.self_attn.{p}_proj")
        level1 = ref[p] if order is None else ref[p][:, order]
        level2 = nm.fp16_to_float(level2)
        cos = float(np.sum(level1 * level2) / np.linalg.norm(level1) / np.linalg.norm(level2))
        rel = np.linalg.norm(level2 - level1) / np.linalg.norm(level1)
        print(f"{p}_proj: max abs {np.abs(level2 - level1).max():.3g}, rel RMS {rel:.3g}, "
              f"cosine {cos:.6f}")
        # The golden model fake-quantizes the same way: fp16 rounding is what is left.
        assert cos > 0.9999 and rel < 0.01


@pytest.mark.fast
@pytest.mark.parametrize("shape, message", [
    (dict(hidden=256, q_out=256, kv_out=130), r"kv_out = 130 must be a multiple of C = 4"),
    (dict(hidden=256, q_out=256, kv_out=32), r"kv_out = 32 must be whole engine tiles of C \* "
                                            r"accumulator_depth = 64 columns"),
    (dict(hidden=258, q_out=256, kv_out=128), r"hidden = 258 must be a multiple of C = 4"),
])
def test_shapes_one_engine_row_cannot_serve_are_refused(shape, message):
    with pytest.raises(ValueError, match=message):
        QkvBlock(ENGINE, datapath=DATAPATH, **shape)
