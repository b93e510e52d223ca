"""The whole model in hardware numerics (level 2), as the accelerator and its host run it.

``Level2Model`` is the reference an end-to-end run is compared against, bit for bit: every
decoder layer is ``numerics.fp16_attention`` then ``numerics.fp16_ffn`` with the weight
image's weights (Q/K rows in RoPE pair order), norms and scales; the final RMSNorm runs on the
fabric (fp16); the host embeds tokens (the embedding row rounded to fp16) and runs the LM
head (float32, on the fp16 final-norm output). The KV cache is fp16 codes ``[layer,
kv_head, position, head_dim]``, the DDR layout (docs/attention.md), sized for
``max_context`` positions; a prompt or a decode step past it is refused, never wrapped.

``compare_with_golden`` measures level 2 against the float golden model (level 1) on a
teacher-forced sequence: logits max-abs error and cosine per position, and greedy-token
agreement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trilut.host.weight_image import WeightImage
from trilut.models import attention as at
from trilut.models import numerics as nm
from trilut.models.kv_cache import KvLayout

__all__ = ["Level2Model", "LogitComparison", "compare_with_golden", "attention_half_error"]


def _codes(values) -> np.ndarray:
    return np.asarray(values).astype(np.float16).view(np.uint16)


class Level2Model:
    """Level-2 prefill and decode over ``image``, with the host's float ``embedding`` and
    ``lm_head`` (``[vocab, hidden]`` arrays). ``lanes``: fp16 values per element-wise beat
    (the datapath's); ``attn_lanes``: elements per cycle of the attention units' dot products.
    """

    def __init__(self, image: WeightImage, embedding, lm_head, *, lanes: int, attn_lanes: int,
                 max_context: int | None = None):
        cfg = image.model_config
        self.image, self.config = image, cfg
        self.embedding = np.asarray(embedding, dtype=np.float32)
        self.lm_head = np.asarray(lm_head, dtype=np.float32)
        for name, table in (("embedding", self.embedding), ("lm_head", self.lm_head)):
            if table.shape != (cfg.vocab_size, cfg.hidden_size):
                raise ValueError(f"{name} must be [{cfg.vocab_size}, {cfg.hidden_size}], "
                                 f"not {list(table.shape)}")
        self.lanes, self.attn_lanes = lanes, attn_lanes
        self.max_context = cfg.max_position_embeddings if max_context is None else max_context
        if not 1 <= self.max_context <= cfg.max_position_embeddings:
            raise ValueError(f"max_context must be from 1 to the model's "
                             f"{cfg.max_position_embeddings} positions, not {max_context!r}")
        #: The cache's DDR layout; its check refuses a context overflow.
        self.layout = KvLayout.for_model(cfg, max_context=self.max_context)
        shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, self.max_context, cfg.head_dim)
        self.k_cache = np.zeros(shape, dtype=np.uint16)
        self.v_cache = np.zeros(shape, dtype=np.uint16)
        self.position = 0
        self._layers = [self._layer_weights(i) for i in range(cfg.num_hidden_layers)]
        self._final_norm = _codes(image.norm("norm"))

    @classmethod
    def from_model(cls, model, engine, *, lanes: int, attn_lanes: int, ddr_word_bits: int,
                   max_context: int | None = None) -> "Level2Model":
        """Compile ``model``'s weight image for ``engine`` and take its float embedding and
        LM head (what the host holds)."""
        from trilut.host.weight_image import compile_weight_image
        image = compile_weight_image(model, engine, ddr_word_bits=ddr_word_bits)
        return cls(image, model.embed_tokens.weight.detach().numpy(),
                   model.lm_head.weight.detach().numpy(), lanes=lanes, attn_lanes=attn_lanes,
                   max_context=max_context)

    def _layer_weights(self, i: int) -> dict:
        img, p = self.image, f"layers.{i}"
        lin = {k: f"{p}.self_attn.{k}_proj" for k in "qkvo"}
        mlp = {k: f"{p}.mlp.{k}_proj" for k in ("gate", "up", "down")}
        return {
            "attn": dict(norm_weight=_codes(img.norm(f"{p}.input_layernorm")),
                         sub_norm_weight=_codes(img.norm(f"{p}.self_attn.attn_sub_norm")),
                         **{f"{k}_values": img.layer_values(n) for k, n in lin.items()},
                         scales=tuple(float(img.scale(lin[k])) for k in "qkvo")),
            "ffn": (_codes(img.norm(f"{p}.post_attention_layernorm")),
                    _codes(img.norm(f"{p}.mlp.ffn_sub_norm")),
                    *(img.layer_values(mlp[k]) for k in ("gate", "up", "down")),
                    tuple(float(img.scale(mlp[k])) for k in ("gate", "up", "down"))),
        }

    def reset(self) -> None:
        self.position = 0

    def embed(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("token ids must be a non-empty 1-D sequence")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), "
                             f"got {ids.min()}..{ids.max()}")
        return nm.fp16_from_float(self.embedding[ids].astype(np.float64))

    def _run(self, ids, phase: str) -> np.ndarray:
        cfg = self.config
        h = self.embed(ids)
        self.layout.check_room(self.position, len(h))
        start = self.position
        cos, sin = at.rope_tables(np.arange(start, start + len(h)), cfg.head_dim,
                                  cfg.rope_theta)
        act = cfg.hidden_act
        for i, weights in enumerate(self._layers):
            h = nm.fp16_attention(
                h, **weights["attn"], cos=cos, sin=sin, k_cache=self.k_cache[i],
                v_cache=self.v_cache[i], start=start, phase=phase,
                heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                head_dim=cfg.head_dim, eps=cfg.rms_norm_eps, lanes=self.lanes,
                attn_lanes=self.attn_lanes)
            h = nm.fp16_ffn(h, *weights["ffn"], activation=act, eps=cfg.rms_norm_eps,
                            lanes=self.lanes)
        self.position = start + len(h)
        normed = nm.fp16_rmsnorm(h, self._final_norm, cfg.rms_norm_eps,
                                 partials=nm.rmsnorm_partials(self.lanes))
        return nm.fp16_to_float(normed).astype(np.float32) @ self.lm_head.T

    def prefill(self, ids) -> np.ndarray:
        """Logits ``[T, vocab]`` (float32) of a prompt after the cached positions."""
        return self._run(ids, "prefill")

    def decode(self, token: int) -> np.ndarray:
        """Logits ``[vocab]`` of one token at the next position (the decode unit)."""
        return self._run([int(token)], "decode")[0]


@dataclass(frozen=True)
class LogitComparison:
    positions: int
    max_abs: float                # largest |level 2 - level 1| logit
    reference_max_abs: float      # largest |level 1| logit, for scale
    min_cosine: float             # worst per-position cosine of the logit vectors
    mean_cosine: float
    greedy_agreement: float       # fraction of positions with the same argmax


def compare_with_golden(model, level2: Level2Model, ids, *, prefill: int) -> LogitComparison:
    """Teacher-forced: level 2 prefills ``ids[:prefill]`` and decodes the rest one by one;
    the golden model runs the whole of ``ids`` in one float forward. Compares the logits
    of every position."""
    import torch
    ids = [int(i) for i in ids]
    if not 1 <= prefill <= len(ids):
        raise ValueError(f"prefill must be from 1 to {len(ids)} tokens, not {prefill!r}")
    level2.reset()
    ours = [level2.prefill(ids[:prefill])] + [level2.decode(t)[None] for t in ids[prefill:]]
    ours = np.concatenate(ours).astype(np.float64)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].double().numpy()
    cos = np.sum(ours * ref, axis=1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    return LogitComparison(
        positions=len(ids), max_abs=float(np.abs(ours - ref).max()),
        reference_max_abs=float(np.abs(ref).max()), min_cosine=float(cos.min()),
        mean_cosine=float(cos.mean()),
        greedy_agreement=float(np.mean(ours.argmax(1) == ref.argmax(1))))


def attention_half_error(model, level2: Level2Model, ids, *, layer: int = 0) -> dict:
    """Level 2 against level 1 for one attention half alone (prefill of ``ids``): both take
    the same residual stream entering ``layer`` (the golden model's, rounded to fp16 for
    level 2) and compute ``h + o_proj(sub_norm(attention(norm(h))))``. Returns the max-abs
    error of the half's update (its output minus ``h``), the update's own max-abs, and the
    cosine of the updates."""
    import torch
    from trilut.models.bitnet import _rope_tables
    cfg = level2.config
    ids = torch.tensor([[int(i) for i in ids]])
    t_len = ids.shape[1]
    with torch.no_grad():
        h = torch.nn.functional.embedding(ids, model.embed_tokens.weight)
        rope = _rope_tables(model.config, torch.arange(t_len))
        for i in range(layer):
            h = model.layers[i](h, rope, *_cache(model, t_len), 0)
        x = model.layers[layer]
        ref = x.self_attn(x.input_layernorm(h), rope, *_cache(model, t_len), 0)[0].double()
    h16 = nm.fp16_from_float(h[0].double().numpy())
    k = np.zeros((cfg.num_key_value_heads, t_len, cfg.head_dim), np.uint16)
    v = np.zeros_like(k)
    cos, sin = at.rope_tables(np.arange(t_len), cfg.head_dim, cfg.rope_theta)
    out = nm.fp16_attention(h16, **level2._layers[layer]["attn"], cos=cos, sin=sin,
                            k_cache=k, v_cache=v, start=0, phase="prefill",
                            heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                            head_dim=cfg.head_dim, eps=cfg.rms_norm_eps, lanes=level2.lanes,
                            attn_lanes=level2.attn_lanes)
    ours = nm.fp16_to_float(out) - nm.fp16_to_float(h16)
    ref = ref.numpy()
    return {"max_abs": float(np.abs(ours - ref).max()), "reference_max_abs": float(np.abs(ref).max()),
            "cosine": float(np.sum(ours * ref) / np.linalg.norm(ours) / np.linalg.norm(ref))}


def _cache(model, t_len):
    cache = model.new_cache(max_length=t_len)
    return cache.keys[0], cache.values[0]
