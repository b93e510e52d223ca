"""The float reference (numerics level 1): a PyTorch BitNet b1.58 decoder.

It computes what Hugging Face transformers' ``BitNetForCausalLM`` computes (modeling_bitnet.py
with the BitLinear layers of integrations/bitnet.py), in float32, for inference only:

    h = embed(ids)
    per layer:
        h = h + o_proj(attn_sub_norm(attention(rope(q_proj(x)), rope(k_proj(x)), v_proj(x))))
                                                      with x = input_layernorm(h)
        h = h + down_proj(ffn_sub_norm(act(gate_proj(x)) * up_proj(x)))
                                                      with x = post_attention_layernorm(h)
    logits = lm_head(norm(h))

Every ``*_proj`` is a ternary linear (int8 per-token activations, ternary weights, one
scale per tensor, both from ``trilut.models.numerics``); the embedding, the norms and the
LM head are full precision, as in transformers. Each linear orders its float arithmetic like
the transformers layer its checkpoint format targets (``FLOAT_ORDERS``), so the logits equal
transformers' bit for bit in float32. RoPE is the ``rotate_half`` convention
(the two halves of each head are the real and imaginary parts), and query head ``h`` reads
KV head ``h // (num_attention_heads // num_key_value_heads)``.

One ``forward`` serves prefill and decode: it writes the keys and values of the positions it
computes into a ``KVCache`` and attends over everything the cache holds up to each query.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import numerics
from .checks import positive_int

__all__ = ["BitNetConfig", "BitNetModel", "KVCache", "TernaryLinear", "LINEAR_NAMES",
           "FLOAT_ORDERS"]

#: The ternary linears of one decoder layer, by their transformers names.
LINEAR_NAMES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
HIDDEN_ACTS = ("relu2", "silu")
#: transformers' BitNetConfig defaults (the microsoft/bitnet-b1.58-2B-4T shape); a config.json
#: that leaves a key out means this value.
_HF_DEFAULTS = dict(
    vocab_size=128256, hidden_size=2560, intermediate_size=6912, num_hidden_layers=30,
    num_attention_heads=20, num_key_value_heads=5, head_dim=None,
    max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="relu2",
    tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
)


@dataclass(frozen=True)
class BitNetConfig:
    """Shape and hyper-parameters of a BitNet b1.58 decoder, checked when built.

    ``num_key_value_heads`` defaults to ``num_attention_heads`` (no GQA) and ``head_dim`` to
    ``hidden_size // num_attention_heads``; transformers' BitNet applies the sub-LN before
    o_proj over ``hidden_size`` features, so ``num_attention_heads * head_dim`` must equal
    ``hidden_size``.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    hidden_act: str = "relu2"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            positive_int(name, getattr(self, name))
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        positive_int("num_key_value_heads", self.num_key_value_heads)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads = {self.num_attention_heads} does not divide "
                f"hidden_size = {self.hidden_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads = {self.num_key_value_heads} does not divide "
                f"num_attention_heads = {self.num_attention_heads}")
        derived = self.hidden_size // self.num_attention_heads
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", derived)
        positive_int("head_dim", self.head_dim)
        if self.head_dim != derived:
            raise ValueError(
                f"head_dim = {self.head_dim} must be hidden_size / num_attention_heads = "
                f"{derived}: BitNet's attn_sub_norm normalizes hidden_size features")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE (rotate_half), not {self.head_dim}")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act must be one of {HIDDEN_ACTS}, not {self.hidden_act!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, not {value!r}")
            object.__setattr__(self, name, float(value))
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(
                f"tie_word_embeddings must be a bool, not {self.tie_word_embeddings!r}")
        eos = self.eos_token_id
        if isinstance(eos, list):
            object.__setattr__(self, "eos_token_id", eos := tuple(eos))
        tokens = (("bos_token_id", self.bos_token_id),) + tuple(
            ("eos_token_id", t) for t in (eos if isinstance(eos, tuple) else (eos,)))
        for name, token in tokens:
            if token is not None and (isinstance(token, bool) or not isinstance(token, int)
                                      or not 0 <= token < self.vocab_size):
                raise ValueError(
                    f"{name} = {token!r} is not a token id below vocab_size = {self.vocab_size}")

    @property
    def kv_groups(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        return () if eos is None else eos if isinstance(eos, tuple) else (eos,)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``[N, K]`` of each ternary linear of one layer, by ``LINEAR_NAMES``."""
        h, i = self.hidden_size, self.intermediate_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        return dict(zip(LINEAR_NAMES, ((q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i))))

    def replace(self, **changes) -> BitNetConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls, **changes) -> BitNetConfig:
        """The built-in demo/test model: 2 layers, GQA (4 heads over 2 KV heads), FFN 640.

        640 is deliberately not a multiple of the engine's 84-activation step, so padding is
        exercised; everything is small enough for a CPU forward in milliseconds.
        """
        base = cls(vocab_size=512, hidden_size=256, intermediate_size=640, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                   max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                   hidden_act="relu2", tie_word_embeddings=False, bos_token_id=1,
                   eos_token_id=2)
        return base.replace(**changes) if changes else base

    @classmethod
    def from_hf_dict(cls, d: Mapping) -> BitNetConfig:
        """Read a transformers ``BitNetConfig`` dict (a config.json); missing keys mean
        transformers' defaults."""
        if d.get("model_type") != "bitnet":
            raise ValueError(f"model_type must be 'bitnet', not {d.get('model_type')!r}")
        if d.get("attention_bias", False):
            raise ValueError("attention_bias = true is not supported (BitNet has no biases)")
        values = {k: d.get(k, v) for k, v in _HF_DEFAULTS.items()}
        rope = d.get("rope_parameters") or d.get("rope_scaling")
        if rope is not None:
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type != "default":
                raise ValueError(f"rope_type must be 'default', not {rope_type!r}")
            values["rope_theta"] = rope.get("rope_theta", values["rope_theta"])
        return cls(**values)

    def to_hf_dict(self) -> dict:
        """The config.json of transformers' ``BitNetForCausalLM`` (without quantization_config)."""
        d = dict(architectures=["BitNetForCausalLM"], model_type="bitnet")
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        # transformers 5 reads rope_parameters; 4.x reads rope_theta. Both are written.
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        d.update(attention_bias=False, attention_dropout=0.0, use_cache=True)
        return d


# --------------------------------------------------------------------------------------------
# Layers.


#: The float arithmetic order of a ternary linear, after the transformers layer a checkpoint
#: is meant for. All three compute ``(q @ values.T) * scale / act_scale`` with ``q`` the int8
#: activations; they differ only in float rounding. That matters more than it looks: one ulp
#: upstream can move ``x * act_scale`` across a .5 and flip an int8 code, which moves the
#: logits by ~1e-3. Following the layer op for op keeps the reference equal to transformers.
#:
#: * ``bitlinear`` -- BitLinear, packed checkpoints (bitnet-b1.58-2B-4T): integer dot
#:   products, then ``/ (weight_scale * act_scale)`` with ``weight_scale = 1 / scale``.
#: * ``autobitlinear-offline`` -- AutoBitLinear offline: ``(q / act_scale) @ values.T``, then
#:   ``* weight_scale`` with ``weight_scale = scale``. The default for weights set by hand.
#: * ``autobitlinear-online`` -- AutoBitLinear online, master-weight checkpoints (the -bf16
#:   repos): ``(q / act_scale) @ (values * scale).T``.
FLOAT_ORDERS = ("bitlinear", "autobitlinear-offline", "autobitlinear-online")


class TernaryLinear(nn.Module):
    """A BitNet linear: int8 per-token activations times ternary weights, one weight scale.

    ``values`` is int8 ternary ``[N, K]`` and ``W ~= values * scale``. ``weight_scale`` is
    the scale as the transformers layer of ``float_order`` holds it (see ``FLOAT_ORDERS``).
    Integer dot products are exact in float32 while K * 128 < 2**24.
    """

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.register_buffer("values", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32))
        self.float_order = "autobitlinear-offline"

    @property
    def scale(self) -> torch.Tensor:
        """``W ~= values * scale`` (0-d float32)."""
        if self.float_order == "bitlinear":
            return 1.0 / self.weight_scale
        return self.weight_scale

    def set_weights(self, values: torch.Tensor, weight_scale, *,
                    float_order: str = "autobitlinear-offline", name: str = "weight"):
        if float_order not in FLOAT_ORDERS:
            raise ValueError(f"float_order must be one of {FLOAT_ORDERS}, not {float_order!r}")
        if tuple(values.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{name} has shape {list(values.shape)}, expected "
                             f"{[self.out_features, self.in_features]}")
        weight_scale = torch.as_tensor(weight_scale, dtype=torch.float32).reshape(())
        if not (torch.isfinite(weight_scale) and weight_scale > 0):
            raise ValueError(f"{name} needs a positive finite scale, not {float(weight_scale)}")
        self.values = torch.from_numpy(numerics.check_ternary(values, name=name))
        self.weight_scale = weight_scale
        self.float_order = float_order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, act_scale = numerics.int8_quantize(x)
        if self.float_order == "bitlinear":
            return F.linear(q.float(), self.values.float()) / (self.weight_scale * act_scale)
        x_fq = q.float() / act_scale     # numerics.fake_quant_activation(x), unrepeated
        if self.float_order == "autobitlinear-offline":
            return F.linear(x_fq, self.values.float()) * self.weight_scale
        return F.linear(x_fq, self.values.float() * self.weight_scale)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"float_order={self.float_order!r}")


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(size))

    def forward(self, x):
        # transformers' order: normalize in float32, then scale by the weight.
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope_tables(config: BitNetConfig, positions: torch.Tensor):
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    freqs = positions[:, None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class KVCache:
    """Keys (after RoPE) and values of positions ``[0, length)`` for every layer.

    ``keys[layer]`` / ``values[layer]`` are ``[batch, num_key_value_heads, max_length,
    head_dim]`` float32; a forward at ``start_pos`` overwrites positions ``start_pos ..`` and
    sets ``length`` to the end of what it wrote.
    """

    def __init__(self, config: BitNetConfig, *, batch_size: int = 1,
                 max_length: int | None = None):
        max_length = config.max_position_embeddings if max_length is None else max_length
        positive_int("batch_size", batch_size)
        positive_int("max_length", max_length)
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_length,
                 config.head_dim)
        self.keys = torch.zeros(shape)
        self.values = torch.zeros(shape)
        self.batch_size, self.max_length = batch_size, max_length
        self.length = 0

    def __repr__(self):
        return (f"KVCache(length={self.length}, max_length={self.max_length}, "
                f"batch_size={self.batch_size})")


class Attention(nn.Module):
    def __init__(self, config: BitNetConfig):
        super().__init__()
        self.config = config
        shapes = config.linear_shapes()
        for name in LINEAR_NAMES[:4]:
            setattr(self, name.split(".")[1], TernaryLinear(*shapes[name]))
        self.attn_sub_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rope, keys, values, start_pos):
        cfg = self.config
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, cfg.head_dim).transpose(1, 2)
        cos, sin = rope
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        end = start_pos + t
        keys[:, :, start_pos:end] = k
        values[:, :, start_pos:end] = v
        k_all = keys[:, :, :end].repeat_interleave(cfg.kv_groups, dim=1)
        v_all = values[:, :, :end].repeat_interleave(cfg.kv_groups, dim=1)
        scores = (q @ k_all.transpose(2, 3)) * cfg.head_dim ** -0.5
        query_pos = torch.arange(start_pos, end)[:, None]
        scores = scores.masked_fill(torch.arange(end)[None, :] > query_pos, float("-inf"))
        out = scores.softmax(dim=-1) @ v_all
        out = out.transpose(1, 2).reshape(b, t, -1)
        return self.o_proj(self.attn_sub_norm(out))


class FeedForward(nn.Module):
    def __init__(self, config: BitNetConfig):
        super().__init__()
        shapes = config.linear_shapes()
        for name in LINEAR_NAMES[4:]:
            setattr(self, name.split(".")[1], TernaryLinear(*shapes[name]))
        self.ffn_sub_norm = RMSNorm(config.intermediate_size, config.rms_norm_eps)
        self.hidden_act = config.hidden_act

    def forward(self, x):
        gate = self.gate_proj(x)
        gate = F.relu(gate).square() if self.hidden_act == "relu2" else F.silu(gate)
        return self.down_proj(self.ffn_sub_norm(gate * self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: BitNetConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = FeedForward(config)

    def forward(self, h, rope, keys, values, start_pos):
        h = h + self.self_attn(self.input_layernorm(h), rope, keys, values, start_pos)
        return h + self.mlp(self.post_attention_layernorm(h))


class _Weight(nn.Module):
    """A bare float weight (embedding table, LM head), named like transformers' modules."""

    def __init__(self, rows: int, cols: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(rows, cols))


# --------------------------------------------------------------------------------------------
# The model.


class BitNetModel(nn.Module):
    """BitNet b1.58 decoder with its LM head, float32, eval only.

    Built with placeholder weights (zeros); ``trilut.models.checkpoint.load_checkpoint``
    fills them. Module names are transformers' without the ``model.`` prefix
    (``layers.0.self_attn.q_proj``, ``norm``, ``lm_head``).
    """

    def __init__(self, config: BitNetConfig):
        super().__init__()
        if not isinstance(config, BitNetConfig):
            raise TypeError(f"config must be a BitNetConfig, not {type(config).__name__}")
        self.config = config
        self.embed_tokens = _Weight(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = _Weight(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.eval()

    # -- weights ---------------------------------------------------------------------------

    def ternary_linears(self) -> dict[str, TernaryLinear]:
        return {name: m for name, m in self.named_modules() if isinstance(m, TernaryLinear)}

    def linear_weights(self) -> dict[str, tuple[torch.Tensor, float]]:
        """``name -> (ternary int8 [N, K], scale)`` for every ternary linear, in layer order.

        ``W ~= values * scale``; names are like ``layers.0.self_attn.q_proj``.
        """
        return {name: (m.values, float(m.scale)) for name, m in self.ternary_linears().items()}

    def set_linear(self, name: str, values: torch.Tensor, scale):
        """Set one ternary linear from int8 ternary ``values [N, K]`` and ``scale`` (``W ~=
        values * scale``)."""
        self.linear(name).set_weights(values, scale, name=name)

    def linear(self, name: str) -> TernaryLinear:
        """The ternary linear called ``name`` (``layers.0.self_attn.q_proj``, ...)."""
        linears = self.ternary_linears()
        if name not in linears:
            raise KeyError(f"no ternary linear named {name!r}; e.g. {next(iter(linears))!r}")
        return linears[name]

    def set_float(self, name: str, tensor: torch.Tensor):
        """Set a full-precision weight by its module name (``embed_tokens``, ``norm``,
        ``layers.0.input_layernorm``, ``lm_head``, ...)."""
        module = self.get_submodule(name)
        if isinstance(module, TernaryLinear) or not hasattr(module, "weight"):
            raise KeyError(f"{name!r} is not a full-precision weight")
        if tuple(tensor.shape) != tuple(module.weight.shape):
            raise ValueError(f"{name} has shape {list(tensor.shape)}, expected "
                             f"{list(module.weight.shape)}")
        # In place, so a tied LM head keeps sharing the embedding table.
        module.weight.copy_(tensor.detach().float())

    # -- inference -------------------------------------------------------------------------

    def new_cache(self, *, batch_size: int = 1, max_length: int | None = None) -> KVCache:
        return KVCache(self.config, batch_size=batch_size, max_length=max_length)

    @torch.no_grad()
    def forward(self, input_ids, cache: KVCache | None = None,
                start_pos: int | None = None) -> torch.Tensor:
        """Logits ``[batch, T, vocab]`` (``[T, vocab]`` for 1-D ids) for tokens at positions
        ``start_pos .. start_pos + T - 1``.

        Prefill and decode are the same call: with ``cache``, ``start_pos`` defaults to
        ``cache.length`` (continue) and may be lower (rewind; later positions are dropped).
        Without a cache the tokens are a whole sequence from position 0.
        """
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        squeeze = ids.dim() == 1
        if squeeze:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [T] or [batch, T] with T >= 1, not "
                             f"{list(ids.shape)}")
        vocab = self.config.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"token id {int(ids.max() if ids.max() >= vocab else ids.min())} "
                             f"is outside the vocabulary [0, {vocab})")
        b, t = ids.shape
        if cache is None:
            if start_pos not in (None, 0):
                raise ValueError(f"start_pos = {start_pos} needs a cache holding the earlier "
                                 f"positions")
            cache = KVCache(self.config, batch_size=b, max_length=t)
        start_pos = cache.length if start_pos is None else start_pos
        if not 0 <= start_pos <= cache.length:
            raise ValueError(f"start_pos = {start_pos} must be within [0, {cache.length}] "
                             f"(the cache holds {cache.length} positions)")
        if start_pos + t > cache.max_length:
            raise ValueError(f"positions up to {start_pos + t} do not fit the cache's "
                             f"max_length = {cache.max_length}")
        if cache.batch_size != b:
            raise ValueError(f"cache batch size {cache.batch_size} != input batch size {b}")

        rope = _rope_tables(self.config, torch.arange(start_pos, start_pos + t))
        h = F.embedding(ids, self.embed_tokens.weight)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, cache.keys[i], cache.values[i], start_pos)
        cache.length = start_pos + t
        logits = F.linear(self.norm(h), self.lm_head.weight)
        return logits[0] if squeeze else logits

    def generate_greedy(self, input_ids, max_new_tokens: int, *,
                        stop_at_eos: bool = False) -> torch.Tensor:
        """Prompt followed by up to ``max_new_tokens`` argmax tokens (same rank as the input).

        One prefill, then one decode step per token through the KV cache. With
        ``stop_at_eos`` a batch-1 run stops after the config's EOS token.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, not "
                             f"{max_new_tokens!r}")
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        squeeze = ids.dim() == 1
        seq = ids[None] if squeeze else ids
        cache = self.new_cache(batch_size=seq.shape[0], max_length=seq.shape[1] + max_new_tokens)
        logits = self(seq, cache)
        for step in range(max_new_tokens):
            nxt = logits[:, -1].argmax(dim=-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            if stop_at_eos and seq.shape[0] == 1 and int(nxt) in self.config.eos_token_ids:
                break
            if step + 1 < max_new_tokens:
                logits = self(nxt, cache)
        return seq[0] if squeeze else seq

    def capture_linear_inputs(self, input_ids, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The float activation each named ternary linear receives (before its int8
        quantization) in a full forward over ``input_ids``: ``[batch, T, K]``, or ``[T, K]``
        for 1-D ids.

        ``numerics.int8_quantize`` of a captured tensor is exactly what that linear
        multiplies with its ternary weights.
        """
        linears = self.ternary_linears()
        names = list(names)
        unknown = [n for n in names if n not in linears]
        if unknown:
            raise KeyError(f"no ternary linear named {unknown[0]!r}; names look like "
                           f"{next(iter(linears))!r}")
        captured: dict[str, torch.Tensor] = {}
        squeeze = torch.as_tensor(input_ids).dim() == 1

        def hook_for(name):
            def hook(module, args):
                x = args[0].detach().clone()
                captured[name] = x[0] if squeeze else x
            return hook

        handles = [linears[n].register_forward_pre_hook(hook_for(n)) for n in names]
        try:
            self(input_ids)
        finally:
            for handle in handles:
                handle.remove()
        return captured
