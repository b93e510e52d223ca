"""The KV cache's DDR layout (docs/attention.md), one description for the HDL, the host and
the models.

Per layer two regions, K and V, each ``[kv_head][position][head_dim]`` fp16 little-endian,
sized for ``max_context`` positions: ``K(layer, head, pos)`` starts at ``k_base + ((layer *
kv_heads + head) * max_context + pos) * head_dim * 2`` bytes, V likewise from ``v_base``.
K holds keys after RoPE in the pair-consecutive order, V values in checkpoint order.

A prompt plus generation past ``max_context`` is refused (:meth:`KvLayout.check_room`),
never wrapped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trilut.models.checks import positive_int

__all__ = ["KvLayout"]

#: Bytes per cached element (fp16).
ELEMENT_BYTES = 2


@dataclass(frozen=True)
class KvLayout:
    layers: int
    kv_heads: int
    max_context: int
    head_dim: int
    k_base: int = 0
    v_base: int | None = None          # None: the first 4 KiB boundary after the K region

    def __post_init__(self):
        for name in ("layers", "kv_heads", "max_context", "head_dim"):
            positive_int(f"KV layout: {name}", getattr(self, name))
        if self.k_base < 0 or self.k_base % 4096:
            raise ValueError(f"KV layout: k_base must be a non-negative multiple of 4096, "
                             f"not {self.k_base:#x}")
        if self.v_base is None:               # the next 4 KiB boundary after the K region
            object.__setattr__(self, "v_base", -(-(self.k_base + self.region_bytes) // 4096) * 4096)
        if self.v_base % 4096 or (self.v_base < self.k_base + self.region_bytes
                                  and self.v_base + self.region_bytes > self.k_base):
            raise ValueError(f"KV layout: v_base {self.v_base:#x} must be a multiple of 4096 "
                             f"outside the K region [{self.k_base:#x}, "
                             f"{self.k_base + self.region_bytes:#x})")

    @classmethod
    def for_model(cls, config, *, max_context: int, k_base: int = 0,
                  v_base: int | None = None) -> "KvLayout":
        """The layout of a ``BitNetConfig``'s cache for ``max_context`` positions."""
        if max_context > config.max_position_embeddings:
            raise ValueError(f"max_context {max_context} exceeds the model's "
                             f"{config.max_position_embeddings} positions")
        return cls(config.num_hidden_layers, config.num_key_value_heads, max_context,
                   config.head_dim, k_base, v_base)

    @property
    def row_bytes(self) -> int:
        """One position of one head: ``head_dim`` fp16."""
        return self.head_dim * ELEMENT_BYTES

    @property
    def head_stride(self) -> int:
        """Bytes from one KV head's rows to the next head's (or layer's)."""
        return self.max_context * self.row_bytes

    @property
    def layer_stride(self) -> int:
        return self.kv_heads * self.head_stride

    @property
    def region_bytes(self) -> int:
        """Bytes of the K (or V) region: every layer, head and position."""
        return self.layers * self.layer_stride

    def address(self, kind: str, layer: int, head: int, position: int) -> int:
        """Byte address of the row of ``kind`` (``"k"`` or ``"v"``) at ``(layer, head,
        position)``."""
        if kind not in ("k", "v"):
            raise ValueError(f"kind must be 'k' or 'v', not {kind!r}")
        for name, value, bound in (("layer", layer, self.layers), ("head", head, self.kv_heads),
                                   ("position", position, self.max_context)):
            if not 0 <= value < bound:
                raise ValueError(f"KV cache {name} {value} is outside [0, {bound})")
        base = self.k_base if kind == "k" else self.v_base
        return base + layer * self.layer_stride + head * self.head_stride + position * self.row_bytes

    def check_room(self, cached: int, new: int) -> None:
        """Refuse ``new`` positions after ``cached`` ones when they pass the context."""
        if cached + new > self.max_context:
            raise ValueError(f"{cached} positions in the KV cache plus {new} new token(s) "
                             f"exceed the context of {self.max_context} positions")

    def rows_to_words(self, rows, word_bits: int) -> list[int]:
        """fp16 codes ``[..., head_dim]`` -> the DDR words they occupy, row by row (element 0
        in the low bits of the first word)."""
        rows = np.asarray(rows, dtype=np.uint16).reshape(-1, self.head_dim)
        per_word = word_bits // 16
        if word_bits % 16 or self.head_dim % per_word:
            raise ValueError(f"a {word_bits}-bit word must hold whole fp16 rows of "
                             f"{self.head_dim}")
        words = rows.reshape(-1, per_word).astype(object)
        return [sum(int(v) << (16 * i) for i, v in enumerate(w)) for w in words]

    def words_to_rows(self, words, word_bits: int) -> np.ndarray:
        """The inverse of :meth:`rows_to_words`: fp16 codes ``[rows, head_dim]``."""
        per_word = word_bits // 16
        flat = [(int(w) >> (16 * i)) & 0xFFFF for w in words for i in range(per_word)]
        return np.array(flat, dtype=np.uint16).reshape(-1, self.head_dim)
