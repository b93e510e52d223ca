"""Hugging Face BitNet checkpoints (config.json + safetensors) in and out of ``BitNetModel``.

Two weight formats are read, told apart by the tensors themselves:

* packed: each ternary linear is a uint8 ``weight [N / 4, K]`` plus a ``weight_scale``, as in
  microsoft/bitnet-b1.58-2B-4T. Four ternary rows share one byte row: bits ``2i .. 2i+1`` of
  ``packed[r, k]`` hold ``W[i * N/4 + r, k] + 1`` (codes 0, 1, 2; code 3 is unused and is
  rejected). With transformers' default ``linear_class = "bitlinear"`` the layer divides by
  ``weight_scale`` -- it is the *inverse* scale, ``1 / mean|W|`` -- while
  ``linear_class = "autobitlinear"`` (offline) multiplies by it.
* full precision: float/bf16 master weights ``[N, K]`` without ``weight_scale``, quantized
  here with absmean (``numerics.ternary_quantize``), which is what transformers' AutoBitLinear
  does on the fly (``quantization_mode = "online"``, the -bf16 checkpoints' setting).
  AutoBitLinear's offline form (float ternary weights and a multiplying ``weight_scale``)
  is read too.

``save_checkpoint`` writes the packed form or the master weights with the quantization_config
transformers needs to run them as BitNet, so a saved tiny model is a real checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import numerics
from .bitnet import LINEAR_NAMES, BitNetConfig, BitNetModel

__all__ = [
    "CheckpointError", "load_checkpoint", "save_checkpoint", "build_tiny_checkpoint",
    "pack_ternary_rows", "unpack_ternary_rows", "random_master_weights",
    "PACKED_QUANTIZATION_CONFIG", "MASTER_QUANTIZATION_CONFIG",
]

#: transformers' quantization_config for packed uint8 weights (BitLinear, divides by weight_scale).
PACKED_QUANTIZATION_CONFIG = {
    "quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"}
#: ... and for float master weights quantized in every forward (AutoBitLinear, online).
MASTER_QUANTIZATION_CONFIG = {
    "quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}
VALUES_PER_BYTE = 4
_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and tensor."""


# --------------------------------------------------------------------------------------------
# transformers' 2-bit packing (integrations/bitnet.py pack_weights / unpack_weights).


def pack_ternary_rows(values: torch.Tensor) -> torch.Tensor:
    """Ternary int8 ``[N, K]`` -> uint8 ``[N / 4, K]``: row ``i * N/4 + r`` goes to bits
    ``2i .. 2i+1`` of byte row ``r``, stored as ``value + 1``."""
    arr = numerics.check_ternary(values)
    n = arr.shape[0]
    if n % VALUES_PER_BYTE:
        raise ValueError(f"packing needs a row count that is a multiple of {VALUES_PER_BYTE}, "
                         f"not {n}")
    codes = (arr + 1).astype(np.uint8).reshape(VALUES_PER_BYTE, n // VALUES_PER_BYTE,
                                               *arr.shape[1:])
    packed = np.zeros(codes.shape[1:], dtype=np.uint8)
    for i in range(VALUES_PER_BYTE):
        packed |= codes[i] << (2 * i)
    return torch.from_numpy(packed)


def unpack_ternary_rows(packed: torch.Tensor, *, name: str = "weight") -> torch.Tensor:
    """Inverse of ``pack_ternary_rows``; raises ``ValueError`` naming ``name`` and the
    position of the first unused code (3)."""
    arr = np.asarray(packed.detach().cpu(), dtype=np.uint8)
    codes = np.stack([(arr >> (2 * i)) & 3 for i in range(VALUES_PER_BYTE)])
    bad = codes == 3
    if bad.any():
        i, r, *rest = (int(x) for x in np.argwhere(bad)[0])
        row = i * arr.shape[0] + r
        raise ValueError(
            f"{name} is not ternary: packed byte {[r, *rest]} holds the unused 2-bit code 3 "
            f"for row {row} ({int(bad.sum())} such codes)")
    return torch.from_numpy(codes.reshape(-1, *arr.shape[1:]).astype(np.int8) - 1)


# --------------------------------------------------------------------------------------------
# Loading.


def _hf_name(name: str) -> str:
    return name if name == "lm_head" else f"model.{name}"


def _float_names(config: BitNetConfig) -> list[str]:
    names = ["embed_tokens"]
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        names += [p + "input_layernorm", p + "post_attention_layernorm",
                  p + "self_attn.attn_sub_norm", p + "mlp.ffn_sub_norm"]
    names.append("norm")
    if not config.tie_word_embeddings:
        names.append("lm_head")
    return names


def _float_shape(config: BitNetConfig, name: str) -> tuple[int, ...]:
    if name in ("embed_tokens", "lm_head"):
        return (config.vocab_size, config.hidden_size)
    if name.endswith("ffn_sub_norm"):
        return (config.intermediate_size,)
    return (config.hidden_size,)


def _read_config(root: Path) -> tuple[BitNetConfig, dict]:
    path = root / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a checkpoint directory needs config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(raw).__name__}")
    if raw.get("model_type") != "bitnet":
        raise CheckpointError(f"{path}: unsupported model_type {raw.get('model_type')!r}; "
                              f"only 'bitnet' (BitNetForCausalLM) checkpoints are read")
    quant = raw.get("quantization_config") or {}
    if quant.get("quant_method", "bitnet") != "bitnet":
        raise CheckpointError(f"{path}: unsupported quant_method {quant['quant_method']!r}")
    if quant.get("use_rms_norm"):
        raise CheckpointError(f"{path}: quantization_config.use_rms_norm (an RMSNorm inside "
                              f"every linear) is not supported")
    try:
        return BitNetConfig.from_hf_dict(raw), quant
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _tensor_files(root: Path) -> tuple[dict[str, Path], list[Path]]:
    """``tensor name -> file holding it`` (from the index when sharded) and the files read."""
    index = root / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        files = sorted({root / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f} is listed in {index} but missing")
        return {name: root / f for name, f in weight_map.items()}, files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{root} holds no *.safetensors file")
    return {}, files


def load_checkpoint(path) -> BitNetModel:
    """Load a local Hugging Face BitNet checkpoint directory into a ``BitNetModel``."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    config, quant = _read_config(root)
    expected_home, files = _tensor_files(root)

    handles, where = {}, {}
    try:
        for f in files:
            try:
                handles[f] = handle = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{f} is not a readable safetensors file: {e}") from None
            for key in handle.keys():
                if key in where:
                    raise CheckpointError(f"tensor {key} appears in both {where[key].name} "
                                          f"and {f.name}")
                where[key] = f
        return _build(root, config, quant, expected_home, files, handles, where)
    finally:
        handles.clear()


def _build(root, config, quant, expected_home, files, handles, where) -> BitNetModel:
    def home(key):
        f = expected_home.get(key)
        if f is not None:
            return f.name
        return files[0].name if len(files) == 1 else f"any of {[f.name for f in files]}"

    def get(key, shape=None) -> torch.Tensor:
        if key not in where:
            listed = f" (listed in {_INDEX})" if key in expected_home else ""
            raise CheckpointError(f"tensor {key} is missing from {home(key)}{listed}")
        f = where[key]
        actual = tuple(handles[f].get_slice(key).get_shape())
        if shape is not None and actual != tuple(shape):
            raise CheckpointError(f"tensor {key} in {f.name} has shape {list(actual)}, "
                                  f"expected {list(shape)}")
        return handles[f].get_tensor(key)

    model = BitNetModel(config)
    used = set()
    for name in _float_names(config):
        key = _hf_name(name) + ".weight"
        model.set_float(name, get(key, _float_shape(config, name)))
        used.add(key)
    if config.tie_word_embeddings and "lm_head.weight" in where:
        # A tied head is the embedding table; a stored copy is redundant, not an error.
        used.add("lm_head.weight")

    def weight_scale(key, what):
        if key not in where:
            raise CheckpointError(f"tensor {key} is missing from {home(key)}; a {what} needs "
                                  f"its weight_scale")
        raw = get(key).float().reshape(-1)
        if raw.numel() != 1 or not torch.isfinite(raw).all() or raw.item() <= 0:
            raise CheckpointError(f"tensor {key} in {where[key].name} must be one positive "
                                  f"scale, not {raw.tolist()[:4]}")
        used.add(key)
        return raw[0]

    # BitLinear divides by weight_scale (it stores 1 / mean|W|); AutoBitLinear multiplies.
    packed_order = ("bitlinear" if quant.get("linear_class", "bitlinear") == "bitlinear"
                    else "autobitlinear-offline")
    shapes = config.linear_shapes()
    for i in range(config.num_hidden_layers):
        for short in LINEAR_NAMES:
            name = f"layers.{i}.{short}"
            key, scale_key = f"model.{name}.weight", f"model.{name}.weight_scale"
            if key not in where:
                get(key)
            n, k = shapes[short]
            try:
                if handles[where[key]].get_slice(key).get_dtype() == "U8":
                    values = unpack_ternary_rows(get(key, (n // VALUES_PER_BYTE, k)), name=key)
                    scale, order = weight_scale(scale_key, "packed uint8 weight"), packed_order
                elif scale_key in where:    # AutoBitLinear offline: ternary floats, weight_scale
                    values = numerics.check_ternary(get(key, (n, k)).float(), name=key)
                    values = torch.from_numpy(values)
                    scale = weight_scale(scale_key, "ternary weight")
                    order = "autobitlinear-offline"
                else:                       # master weights, quantized here
                    values, scale = numerics.ternary_quantize(get(key, (n, k)))
                    order = "autobitlinear-online"
            except CheckpointError:
                raise
            except ValueError as e:         # not ternary
                raise CheckpointError(f"{where[key].name}: {e}") from None
            model.linear(name).set_weights(values, scale, float_order=order, name=key)
            used.add(key)

    extra = sorted(set(where) - used)
    if extra:
        shown = ", ".join(f"{k} (in {where[k].name})" for k in extra[:5])
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise CheckpointError(f"unexpected tensors in {root}: {shown}{more}")
    return model


# --------------------------------------------------------------------------------------------
# Saving.


def save_checkpoint(source, path, *, packed: bool = True, config: BitNetConfig | None = None,
                    dtype: torch.dtype = torch.float32):
    """Write ``source`` as a Hugging Face BitNet checkpoint (config.json + model.safetensors).

    ``source`` is a ``BitNetModel`` (packed only: a ternary model has no master weights), or
    a dict of full-precision master weights by transformers name (``model.layers.0.
    self_attn.q_proj.weight``, ...) together with ``config``. ``packed=True`` writes uint8
    2-bit weights and BitLinear's inverse ``weight_scale``; ``packed=False`` writes the master
    weights for AutoBitLinear's online quantization. Full-precision tensors are stored in
    ``dtype``; the output is byte-identical for identical inputs.
    """
    root = Path(path)
    if isinstance(source, BitNetModel):
        if not packed:
            raise ValueError("a BitNetModel holds ternary weights, not master weights; save it "
                             "with packed=True or pass the float master weights dict")
        if config is not None and config != source.config:
            raise ValueError("config differs from the model's own config")
        config = source.config
        floats = {_hf_name(n) + ".weight": source.get_submodule(n).weight
                  for n in _float_names(config)}
        # BitLinear's weight_scale is written as held, so a packed checkpoint round-trips
        # bit for bit (1 / (1 / x) need not be x).
        linears = {f"model.{n}.weight": (m.values, m.weight_scale if m.float_order ==
                                         "bitlinear" else 1.0 / m.scale)
                   for n, m in source.ternary_linears().items()}
    elif isinstance(source, Mapping):
        if config is None:
            raise ValueError("saving a weights dict needs its config")
        linear_keys = {f"model.layers.{i}.{s}.weight" for i in range(config.num_hidden_layers)
                       for s in LINEAR_NAMES}
        float_shapes = {_hf_name(n) + ".weight": _float_shape(config, n)
                        for n in _float_names(config)}
        missing = sorted((linear_keys | set(float_shapes)) - set(source))
        if missing:
            raise ValueError(f"weights dict lacks {missing[0]}")
        extra = sorted(set(source) - linear_keys - set(float_shapes))
        if extra:
            raise ValueError(f"weights dict has unexpected tensor {extra[0]}")
        shapes = dict(float_shapes)
        shapes.update({f"model.layers.{i}.{s}.weight": nk for i in range(config.num_hidden_layers)
                       for s, nk in config.linear_shapes().items()})
        for key, shape in shapes.items():
            if tuple(source[key].shape) != shape:
                raise ValueError(f"{key} has shape {list(source[key].shape)}, expected "
                                 f"{list(shape)}")
        floats = {k: source[k] for k in float_shapes}
        masters = {k: source[k] for k in sorted(linear_keys)}
        linears = {}
        if packed:
            for key, w in masters.items():
                values, scale = numerics.ternary_quantize(w)
                linears[key] = (values, 1.0 / scale)
    else:
        raise TypeError(f"source must be a BitNetModel or a weights dict, not "
                        f"{type(source).__name__}")

    tensors = {k: v.detach().to(dtype).contiguous() for k, v in floats.items()}
    if packed:
        for key, (values, weight_scale) in linears.items():
            tensors[key] = pack_ternary_rows(values)
            tensors[key + "_scale"] = torch.as_tensor(weight_scale).reshape(1).to(dtype)
    else:
        tensors.update({k: v.detach().to(dtype).contiguous() for k, v in masters.items()})

    hf = config.to_hf_dict()
    hf["dtype"] = str(dtype).removeprefix("torch.")
    hf["quantization_config"] = dict(PACKED_QUANTIZATION_CONFIG if packed
                                     else MASTER_QUANTIZATION_CONFIG)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n",
                                      encoding="utf-8")
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    return root


def random_master_weights(config: BitNetConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic float master weights by transformers name: linears and embeddings
    ~N(0, 0.02), norm weights 1 + N(0, 0.02), drawn in a fixed order from one generator."""
    gen = torch.Generator().manual_seed(seed)
    names = [(_hf_name(n) + ".weight", _float_shape(config, n)) for n in _float_names(config)]
    names += [(f"model.layers.{i}.{short}.weight", nk) for i in range(config.num_hidden_layers)
              for short, nk in config.linear_shapes().items()]
    weights = {}
    for key, shape in names:
        noise = torch.randn(shape, generator=gen) * 0.02
        weights[key] = noise + 1.0 if len(shape) == 1 else noise
    return weights


def build_tiny_checkpoint(path, config: BitNetConfig | None = None, seed: int = 0,
                          packed: bool = True) -> Path:
    """A deterministic random model saved as a checkpoint (same seed, same bytes).

    The packed and full-precision checkpoints of one seed hold the same master weights, so
    they load into the same ternary model.
    """
    config = BitNetConfig.tiny() if config is None else config
    return save_checkpoint(random_master_weights(config, seed), path, packed=packed,
                           config=config)
