"""The float reference (numerics level 1) against transformers' BitNetForCausalLM, its KV
cache, and BitNet checkpoint I/O.

transformers is the outside reference: the same tiny checkpoint directory is loaded by
``BitNetForCausalLM.from_pretrained`` and by ``load_checkpoint``, in every weight format.
"""

import json
import shutil

import pytest
import torch
import torch._dynamo
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import BitNetForCausalLM, DynamicCache
from transformers.integrations.bitnet import pack_weights, unpack_weights

from trilut.models import numerics
from trilut.models.bitnet import BitNetConfig, BitNetModel
from trilut.models.checkpoint import (
    CheckpointError, build_tiny_checkpoint, load_checkpoint, pack_ternary_rows,
    random_master_weights, save_checkpoint, unpack_ternary_rows,
)

VARIANTS = {
    "relu2": BitNetConfig.tiny(),
    "silu-tied": BitNetConfig.tiny(hidden_act="silu", tie_word_embeddings=True),
}
FORMATS = ("packed", "master")
#: Measured max |logit difference| against transformers on this machine: 0.0 in every
#: variant and format, and at every prefill/decode step of the KV-cache comparison (the
#: reference follows transformers' float arithmetic op for op).
#: The bound leaves room for a BLAS that sums in another order, not for a flipped int8 code
#: (~1e-3).
LOGIT_BOUND = 1e-5
PROMPTS = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(7))
#: Weight (and prompt) seeds of the KV-cache comparison against transformers' KV cache.
KV_SEEDS = (0, 1, 2)

pytestmark = pytest.mark.golden


@pytest.fixture(scope="module", autouse=True)
def eager_single_thread_torch():
    # transformers' BitNet layers are wrapped in torch.compile, which costs ~40 s of CPU
    # compilation here; the eager ops compute the same numbers. The matmuls are tiny, and
    # OpenMP workers spinning on a shared 2-core machine made this file 4x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch._dynamo.config.patch(disable=True):
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {(v, f): build_tiny_checkpoint(root / f"{v}-{f}", config, seed=0,
                                          packed=f == "packed")
            for v, config in VARIANTS.items() for f in FORMATS}


@pytest.fixture(scope="module")
def checkpoint_of(checkpoints, tmp_path_factory):
    """``(variant, fmt, seed) -> checkpoint directory``, built once; seed 0 is
    ``checkpoints``'s own."""
    root = tmp_path_factory.mktemp("seeded-checkpoints")
    built = {(v, f, 0): path for (v, f), path in checkpoints.items()}

    def get(variant, fmt, seed):
        if (variant, fmt, seed) not in built:
            built[variant, fmt, seed] = build_tiny_checkpoint(
                root / f"{variant}-{fmt}-{seed}", VARIANTS[variant], seed=seed,
                packed=fmt == "packed")
        return built[variant, fmt, seed]
    return get


def _transformers_model(path):
    model = BitNetForCausalLM.from_pretrained(path, dtype=torch.float32,
                                              attn_implementation="eager")
    return model.eval()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_greedy_tokens_match_transformers(checkpoints, variant, fmt):
    path = checkpoints[variant, fmt]
    ours, theirs = load_checkpoint(path), _transformers_model(path)
    linear_type = type(theirs.model.layers[0].mlp.down_proj).__name__
    assert linear_type == ("BitLinear" if fmt == "packed" else "AutoBitLinear")
    assert type(theirs.lm_head) is torch.nn.Linear  # the LM head stays full precision

    with torch.no_grad():
        reference = theirs(PROMPTS).logits
    diff = (ours(PROMPTS) - reference).abs().max().item()
    print(f"\n{variant} {fmt}: max |logit - transformers| = {diff:.3g} "
          f"(logits up to {reference.abs().max().item():.2f})")
    assert diff < LOGIT_BOUND

    prompt = PROMPTS[:1, :12]
    with torch.no_grad():
        expected = theirs.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours.generate_greedy(prompt, 8, stop_at_eos=True), expected)


def test_autobitlinear_offline_format_matches_transformers(checkpoints, tmp_path):
    # AutoBitLinear offline multiplies by weight_scale where BitLinear divides by it.
    path = shutil.copytree(checkpoints["relu2", "packed"], tmp_path / "offline")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                     "quantization_mode": "offline"}
    (path / "config.json").write_text(json.dumps(config))
    tensors = load_file(path / "model.safetensors")
    for key in [k for k in tensors if k.endswith("weight_scale")]:
        tensors[key] = 1.0 / tensors[key]
    save_file(tensors, path / "model.safetensors")

    ours = load_checkpoint(path)
    with torch.no_grad():
        reference = _transformers_model(path)(PROMPTS).logits
    diff = (ours(PROMPTS) - reference).abs().max().item()
    print(f"\nrelu2 autobitlinear-offline: max |logit - transformers| = {diff:.3g}")
    assert diff < LOGIT_BOUND
    packed = load_checkpoint(checkpoints["relu2", "packed"])
    for (name, (v, s)), (_, (v_packed, s_packed)) in zip(ours.linear_weights().items(),
                                                         packed.linear_weights().items()):
        assert torch.equal(v, v_packed), name
        assert s == pytest.approx(s_packed, rel=1e-6), name


def test_packed_and_master_checkpoints_hold_the_same_ternary_model(checkpoints):
    config = VARIANTS["relu2"]
    masters = random_master_weights(config, seed=0)
    packed = load_checkpoint(checkpoints["relu2", "packed"]).linear_weights()
    master = load_checkpoint(checkpoints["relu2", "master"]).linear_weights()
    assert list(packed) == [f"layers.{i}.{n}" for i in range(2) for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    for name, (values, scale) in packed.items():
        w = masters[f"model.{name}.weight"]
        assert values.dtype == torch.int8 and values.shape == w.shape
        assert torch.equal(values, master[name][0])
        assert scale == pytest.approx(w.abs().mean().item(), rel=1e-6)
        assert scale == pytest.approx(master[name][1], rel=1e-6)


# --------------------------------------------------------------------------------------------
# Prefill and decode share one forward.


@pytest.fixture(scope="module")
def tiny_model(checkpoints):
    return load_checkpoint(checkpoints["relu2", "packed"])


@pytest.mark.parametrize("seed", KV_SEEDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_then_decode_matches_transformers_kv_cache(checkpoint_of, variant, seed):
    # Our KV path against transformers' KV path (DynamicCache), step by step. Not against a
    # full forward: a decode step's attention sums in another order than the full forward's,
    # one ulp there can flip an int8 activation code (silu-tied seed 1: 1e-2 apart), and
    # transformers' own KV path differs from its full forward in just the same way.
    path = checkpoint_of(variant, "packed", seed)
    ours, theirs = load_checkpoint(path), _transformers_model(path)
    prompt = torch.randint(3, 512, (2, 13), generator=torch.Generator().manual_seed(100 + seed))
    decode_steps = 10
    cache = ours.new_cache(batch_size=2, max_length=prompt.shape[1] + decode_steps)
    past = DynamicCache(config=theirs.config)
    diffs = []

    def step(tokens, **kwargs):
        with torch.no_grad():
            expected = theirs(tokens, past_key_values=past, use_cache=True).logits
        logits = ours(tokens, cache, **kwargs)
        diffs.append((logits - expected).abs().max().item())
        torch.testing.assert_close(logits, expected, rtol=0, atol=LOGIT_BOUND)
        assert cache.length == past.get_seq_length()
        greedy = expected[:, -1:].argmax(dim=-1)
        assert torch.equal(logits[:, -1:].argmax(dim=-1), greedy)
        return greedy

    # Prefill in two chunks (the second attends over the cache and within itself), then
    # decode one token at a time, feeding the greedy token back.
    step(prompt[:, :10])
    generated = [step(prompt[:, 10:])]
    for _ in range(decode_steps - 1):
        generated.append(step(generated[-1]))
    sequence = torch.cat([prompt, *generated], dim=1)
    assert cache.length == sequence.shape[1] - 1   # the last greedy token is not fed
    assert torch.equal(ours.generate_greedy(prompt, decode_steps), sequence)

    # Rewinding overwrites the later positions, as cropping transformers' cache does.
    past.crop(5 - past.get_seq_length())
    step(sequence[:, 5:-1], start_pos=5)
    print(f"\n{variant} seed {seed}: max |logit - transformers' KV path| = {max(diffs):.3g} "
          f"over {len(diffs)} steps")


def test_one_dimensional_ids_are_one_sequence(tiny_model):
    tokens = PROMPTS[0, :24]
    assert torch.equal(tiny_model(tokens), tiny_model(tokens[None])[0])


def test_forward_rejects_bad_positions(tiny_model):
    cache = tiny_model.new_cache(max_length=8)
    tiny_model(PROMPTS[:1, :4], cache)
    with pytest.raises(ValueError, match=r"start_pos = 6 must be within \[0, 4\]"):
        tiny_model(PROMPTS[:1, :1], cache, start_pos=6)
    with pytest.raises(ValueError, match="do not fit the cache's max_length = 8"):
        tiny_model(PROMPTS[:1, :5], cache)
    with pytest.raises(ValueError, match="token id 512 is outside the vocabulary"):
        tiny_model(torch.tensor([[1, 512]]))


def test_captured_linear_inputs_reproduce_the_linear_in_integers(tiny_model):
    names = ["layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"]
    captured = tiny_model.capture_linear_inputs(PROMPTS[0, :16], names)
    assert captured["layers.0.self_attn.q_proj"].shape == (16, 256)
    assert captured["layers.1.mlp.down_proj"].shape == (16, 640)

    layer0 = tiny_model.layers[0]
    embedded = tiny_model.embed_tokens.weight[PROMPTS[0, :16]]
    torch.testing.assert_close(captured[names[0]], layer0.input_layernorm(embedded),
                               rtol=0, atol=0)
    weights = tiny_model.linear_weights()
    for name in names:
        values, scale = weights[name]
        q, act_scale = numerics.int8_quantize(captured[name])
        acc = torch.from_numpy(numerics.ternary_matmul(q, values)).float()
        torch.testing.assert_close(tiny_model.linear(name)(captured[name]),
                                   acc * scale / act_scale, rtol=1e-6, atol=1e-6)
    with pytest.raises(KeyError, match="no ternary linear named 'layers.0.q_proj'"):
        tiny_model.capture_linear_inputs(PROMPTS[0, :4], ["layers.0.q_proj"])


# --------------------------------------------------------------------------------------------
# Formats and configs.


def test_two_bit_packing_is_transformers_layout():
    values = torch.randint(-1, 2, (24, 10), generator=torch.Generator().manual_seed(3),
                           dtype=torch.int8)
    packed = pack_ternary_rows(values)
    assert torch.equal(packed, pack_weights(values.clone()))
    assert torch.equal(unpack_ternary_rows(packed), values)
    assert torch.equal(unpack_weights(packed, dtype=torch.float32), values.float())
    # Row i * N/4 + r lives in bits 2i.. of byte row r.
    assert (packed[1, 0] >> 4) & 3 == values[2 * 6 + 1, 0] + 1


def test_build_is_deterministic(tmp_path):
    a = build_tiny_checkpoint(tmp_path / "a", seed=3)
    b = build_tiny_checkpoint(tmp_path / "b", seed=3)
    c = build_tiny_checkpoint(tmp_path / "c", seed=4)
    for name in ("model.safetensors", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_saving_a_loaded_model_round_trips(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "again")
    again = load_checkpoint(tmp_path / "again")
    assert tiny_model.linear_weights().keys() == again.linear_weights().keys()
    for name, (values, scale) in tiny_model.linear_weights().items():
        assert torch.equal(values, again.linear_weights()[name][0]), name
        assert scale == again.linear_weights()[name][1], name
    assert torch.equal(again(PROMPTS), tiny_model(PROMPTS))
    with pytest.raises(ValueError, match="has no master weights|not master weights"):
        save_checkpoint(tiny_model, tmp_path / "master", packed=False)


def test_config_round_trips_and_presets():
    tiny = BitNetConfig.tiny()
    assert (tiny.hidden_size, tiny.num_hidden_layers, tiny.num_attention_heads,
            tiny.num_key_value_heads, tiny.head_dim, tiny.intermediate_size,
            tiny.vocab_size, tiny.max_position_embeddings, tiny.hidden_act) == (
        256, 2, 4, 2, 64, 640, 512, 256, "relu2")
    assert tiny.intermediate_size % 84 != 0
    for config in VARIANTS.values():
        assert BitNetConfig.from_hf_dict(config.to_hf_dict()) == config
    legacy = {"model_type": "bitnet", "rope_theta": 1234.0, "eos_token_id": [5, 6]}
    legacy_config = BitNetConfig.from_hf_dict(legacy)
    assert legacy_config.rope_theta == 1234.0 and legacy_config.eos_token_id == (5, 6)
    assert legacy_config.num_key_value_heads == 5  # transformers' 2B-4T defaults


@pytest.mark.parametrize("changes, message", [
    (dict(num_attention_heads=3), "num_attention_heads = 3 does not divide hidden_size = 256"),
    (dict(num_key_value_heads=3),
     "num_key_value_heads = 3 does not divide num_attention_heads = 4"),
    (dict(head_dim=32), "head_dim = 32 must be hidden_size / num_attention_heads = 64"),
    (dict(hidden_act="gelu"), "hidden_act must be one of .*, not 'gelu'"),
    (dict(vocab_size=0), "vocab_size must be a positive integer, not 0"),
    (dict(eos_token_id=600), "eos_token_id = 600 is not a token id below vocab_size = 512"),
    (dict(rms_norm_eps=-1.0), "rms_norm_eps must be a positive number, not -1.0"),
])
def test_config_rejects_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        BitNetConfig.tiny(**changes)


# --------------------------------------------------------------------------------------------
# Malformed checkpoints.


@pytest.fixture
def broken(checkpoints, tmp_path):
    """A fresh copy of the packed relu2 checkpoint to break."""
    return shutil.copytree(checkpoints["relu2", "packed"], tmp_path / "broken")


def _edit_tensors(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def _load_error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    return str(info.value)


def test_missing_directory_config_and_weights(broken, tmp_path):
    assert "does not exist" in _load_error(tmp_path / "nowhere")
    (broken / "model.safetensors").unlink()
    assert "holds no *.safetensors file" in _load_error(broken)
    (broken / "config.json").unlink()
    assert "config.json is missing" in _load_error(broken)


def test_bad_config_json(broken):
    (broken / "config.json").write_text('{"model_type": "bitnet",')
    assert "config.json is not valid JSON" in _load_error(broken)
    (broken / "config.json").write_text('{"model_type": "llama"}')
    assert "unsupported model_type 'llama'" in _load_error(broken)
    config = BitNetConfig.tiny().to_hf_dict() | {"num_key_value_heads": 3}
    (broken / "config.json").write_text(json.dumps(config))
    message = _load_error(broken)
    assert "config.json" in message and "num_key_value_heads = 3" in message


def test_missing_tensor_names_it_and_its_file(broken):
    _edit_tensors(broken, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    message = _load_error(broken)
    assert "model.layers.1.mlp.up_proj.weight is missing from model.safetensors" in message


def test_missing_weight_scale(broken):
    _edit_tensors(broken, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight_scale"))
    assert "model.layers.0.self_attn.k_proj.weight_scale is missing" in _load_error(broken)


def test_wrong_shape_names_tensor_file_and_shapes(broken):
    def shrink(t):
        t["model.layers.0.mlp.ffn_sub_norm.weight"] = torch.ones(600)
        gate = "model.layers.1.mlp.gate_proj.weight"
        t[gate] = t[gate][:, :9].clone()
    _edit_tensors(broken, shrink)
    assert ("model.layers.0.mlp.ffn_sub_norm.weight in model.safetensors has shape [600], "
            "expected [640]") in _load_error(broken)
    _edit_tensors(broken, lambda t: t.update({
        "model.layers.0.mlp.ffn_sub_norm.weight": torch.ones(640)}))
    assert ("model.layers.1.mlp.gate_proj.weight in model.safetensors has shape [160, 9], "
            "expected [160, 256]") in _load_error(broken)


def test_unused_packed_code_is_not_ternary(broken):
    def corrupt(t):
        t["model.layers.1.self_attn.v_proj.weight"][3, 5] |= 0b11 << 4
    _edit_tensors(broken, corrupt)
    message = _load_error(broken)
    assert "model.safetensors: model.layers.1.self_attn.v_proj.weight is not ternary" in message
    assert "unused 2-bit code 3 for row 67" in message   # row 2 * (128 / 4) + 3


def test_non_ternary_unpacked_weight(broken):
    # AutoBitLinear offline stores ternary floats; a 0.5 in one is an error, not rounding.
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"]["linear_class"] = "autobitlinear"
    (broken / "config.json").write_text(json.dumps(config))

    def unpack(t):
        for key in [k for k in t if k.endswith("_proj.weight")]:
            t[key] = unpack_ternary_rows(t[key]).float()
        t["model.layers.0.mlp.up_proj.weight"][7, 1] = 0.5
    _edit_tensors(broken, unpack)
    message = _load_error(broken)
    assert "model.safetensors: model.layers.0.mlp.up_proj.weight is not ternary" in message
    assert "[7, 1] = 0.5" in message


def test_unexpected_tensor(broken):
    _edit_tensors(broken, lambda t: t.update({"model.layers.0.mlp.bias": torch.zeros(4)}))
    message = _load_error(broken)
    assert "unexpected tensors" in message and "model.layers.0.mlp.bias (in model.safetensors)" \
        in message


def test_sharded_checkpoint(broken, tiny_model):
    tensors = load_file(broken / "model.safetensors")
    (broken / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    weight_map = {}
    for i, (key, tensor) in enumerate(sorted(tensors.items())):
        shard = list(shards)[i % 2]
        shards[shard][key] = tensor
        weight_map[key] = shard
    for shard, part in shards.items():
        save_file(part, broken / shard)
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert torch.equal(load_checkpoint(broken)(PROMPTS[:1]), tiny_model(PROMPTS[:1]))

    key = "model.layers.0.mlp.down_proj.weight"
    shard = weight_map[key]
    part = load_file(broken / shard)
    del part[key]
    save_file(part, broken / shard)
    assert f"{key} is missing from {shard} (listed in model.safetensors.index.json)" \
        in _load_error(broken)
    (broken / shard).unlink()
    assert f"{shard} is listed in" in _load_error(broken)


def test_checkpoint_matches_the_layout_transformers_saves(checkpoints):
    # The tensor names and dtypes of a packed checkpoint are the ones a BitNetForCausalLM
    # state dict holds, so from_pretrained neither misses nor drops a tensor.
    path = checkpoints["relu2", "packed"]
    with safe_open(path / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.uint8
    theirs = _transformers_model(path).state_dict()
    assert names == set(theirs)
    with safe_open(path / "model.safetensors", framework="pt") as f:
        for name in names:
            assert f.get_slice(name).get_shape() == list(theirs[name].shape), name
    assert isinstance(load_checkpoint(path), BitNetModel)
