"""The single source of truth for trilut's numbers.

Everything that quantizes, encodes, packs or accumulates imports this module: the PyTorch
golden model, each hardware block's bit-exact ``model()``, the host packers and the tests.

Conventions
-----------
* Weights follow PyTorch's ``nn.Linear`` layout: ``W[N, K]`` (out features, in features),
  and a linear layer computes ``y = x @ W.T``.
* Ternary weights are ``int8`` arrays with values in ``{-1, 0, +1}``.
* Activations entering a ternary linear layer are ``int8`` in ``[-128, 127]``.

Table-lookup encoding (TLMM)
----------------------------
A group of ``G`` consecutive ternary weights ``w_0 .. w_{G-1}`` (along K) is read as a
balanced-ternary number ``v = sum_i w_i * 3**i`` in ``[-c, c]`` with ``c = (3**G - 1) // 2``.
``v`` identifies the pattern uniquely, and negating every weight negates ``v``; both table
forms fall out of that:

* full table: ``3**G`` entries, index ``v + c``; entry ``e`` holds the signed sum for the
  pattern whose value is ``e - c``.
* sign-mirror table: ``c + 1`` entries, index ``(sign << m) | abs(v)`` with ``sign = v < 0``
  and ``m = bits(c)``; entry ``e`` holds the sum for the pattern of value ``+e`` and the
  adder negates it when ``sign`` is set. Half the storage, one conditional negation.

For G = 3 both need 5 bits per index (27 patterns; 14 entries + a sign bit), 1.67 bits per
weight, which is TeLLMe's format. See ``docs/numerics.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

# torch is imported inside the four float-reference functions below, which take torch tensors:
# everything else here (and so the config and the HDL) imports without it.

__all__ = [
    "ACT_BITS", "ACT_MIN", "ACT_MAX", "QUANT_EPS",
    "ternary_quantize", "int8_quantize", "fake_quant_weight", "fake_quant_activation",
    "check_ternary", "check_int8",
    "TableCode", "group_values", "build_tables", "lookup",
    "ternary_matmul", "table_entry_width", "accumulator_width", "signed_width",
    "pad_to_multiple", "pack_fields", "unpack_fields", "pack_words",
    "lane_beats", "unpack_lane_beats",
]

ACT_BITS = 8
ACT_MIN = -(1 << (ACT_BITS - 1))
ACT_MAX = (1 << (ACT_BITS - 1)) - 1
#: Clamp on the absmean / absmax statistics, as in the public BitNet modelling code.
QUANT_EPS = 1e-5


# --------------------------------------------------------------------------------------------
# Quantization (float <-> integer), matching the public BitNet b1.58 code bit for bit.


def ternary_quantize(weight: "torch.Tensor") -> "tuple[torch.Tensor, torch.Tensor]":
    """Absmean ternary quantization of a whole tensor.

    Returns ``(values, scale)``: ``values`` is int8 in {-1, 0, +1} and ``weight ~= values *
    scale`` with ``scale = mean|W|`` (a 0-d float32 tensor). The arithmetic order (multiply by
    the reciprocal, round half to even, clamp) is the public BitNet code's, so that the
    ternary values agree with it exactly.
    """
    import torch

    w = weight.detach().float()
    inv_scale = 1.0 / w.abs().mean().clamp(min=QUANT_EPS)
    values = (w * inv_scale).round().clamp(-1, 1).to(torch.int8)
    return values, (1.0 / inv_scale)


def int8_quantize(x: "torch.Tensor") -> "tuple[torch.Tensor, torch.Tensor]":
    """Per-token absmax int8 quantization along the last dimension.

    Returns ``(values, scale)`` with ``values`` int8 and ``x ~= values / scale``, where
    ``scale = 127 / max|x|`` (shape ``[..., 1]``, same dtype as ``x``).
    """
    import torch

    scale = ACT_MAX / x.abs().amax(dim=-1, keepdim=True).clamp(min=QUANT_EPS)
    values = (x * scale).round().clamp(ACT_MIN, ACT_MAX)
    return values.to(torch.int8), scale


def fake_quant_weight(weight: "torch.Tensor") -> "torch.Tensor":
    """Ternary-quantize then dequantize, in the weight's dtype (float reference level)."""
    values, scale = ternary_quantize(weight)
    return (values.float() * scale).to(weight.dtype)


def fake_quant_activation(x: "torch.Tensor") -> "torch.Tensor":
    """int8-quantize then dequantize per token, in ``x``'s dtype (float reference level)."""
    values, scale = int8_quantize(x)
    return values.to(x.dtype) / scale


def _as_numpy(values) -> np.ndarray:
    """A numpy view of an array or of a (CPU or not) torch tensor, without importing torch."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def check_ternary(values, *, name: str = "weight") -> np.ndarray:
    """Return ``values`` as an int8 numpy array, or raise naming the first non-ternary entry."""
    arr = _as_numpy(values)
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite values; ternary weights must be -1, 0 or +1")
    bad = (arr != -1) & (arr != 0) & (arr != 1)
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} is not ternary: {name}{list(pos)} = {arr[pos].item()!r}; "
            f"weights must be -1, 0 or +1 ({int(bad.sum())} bad entries)")
    return arr.astype(np.int8)


def check_int8(values, *, name: str = "activation") -> np.ndarray:
    """Return ``values`` as an int64 numpy array, or raise naming the first out-of-range entry."""
    arr = _as_numpy(values)
    if arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr)):
        raise ValueError(f"{name} must hold integers, not {arr.dtype} fractions")
    arr = arr.astype(np.int64)
    bad = (arr < ACT_MIN) | (arr > ACT_MAX)
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}{list(pos)} = {arr[pos].item()} is outside int8 [{ACT_MIN}, {ACT_MAX}]")
    return arr


# --------------------------------------------------------------------------------------------
# Widths.


def signed_width(magnitude: int) -> int:
    """Bits of a two's-complement number that holds every value in ``[-magnitude, magnitude]``."""
    return int(magnitude).bit_length() + 1


def table_entry_width(group_size: int, act_bits: int = ACT_BITS) -> int:
    """Width of a table entry: the sum of ``group_size`` activations, each as low as -2**(b-1).

    G = 3, int8: |sum| <= 384, 10 bits (TeLLMe's released HLS uses 10-bit entries).
    """
    return signed_width(group_size << (act_bits - 1))


def accumulator_width(k: int, act_bits: int = ACT_BITS) -> int:
    """Width that holds any ternary x int``act_bits`` dot product of length ``k`` exactly."""
    if k < 1:
        raise ValueError(f"k must be a positive integer, not {k!r}")
    return signed_width(k << (act_bits - 1))


# --------------------------------------------------------------------------------------------
# Table-lookup encoding.


def _balanced_ternary_digits(value: int, group_size: int) -> list[int]:
    digits = []
    for _ in range(group_size):
        r = value % 3
        if r == 2:
            r = -1
        digits.append(r)
        value = (value - r) // 3
    assert value == 0
    return digits


@dataclass(frozen=True)
class TableCode:
    """How a group of ``group_size`` ternary weights becomes one table index."""

    group_size: int
    mirror: bool = True

    def __post_init__(self):
        if not isinstance(self.group_size, int) or not 1 <= self.group_size <= 6:
            raise ValueError(
                f"group_size must be an integer from 1 to 6, not {self.group_size!r}")

    @property
    def center(self) -> int:
        return (3 ** self.group_size - 1) // 2

    @property
    def entries(self) -> int:
        """Entries stored per table: 3**G (full) or (3**G - 1) / 2 + 1 (sign-mirror)."""
        return self.center + 1 if self.mirror else 3 ** self.group_size

    @property
    def magnitude_bits(self) -> int:
        return max(1, self.center.bit_length())

    @property
    def index_bits(self) -> int:
        if self.mirror:
            return 1 + self.magnitude_bits
        return max(1, (3 ** self.group_size - 1).bit_length())

    @property
    def zero_index(self) -> int:
        """Index of the all-zero pattern (what padding encodes to)."""
        return 0 if self.mirror else self.center

    @cached_property
    def entry_patterns(self) -> np.ndarray:
        """``[entries, G]`` int8: the ternary weights each stored entry sums against."""
        offset = 0 if self.mirror else -self.center
        return np.array([_balanced_ternary_digits(e + offset, self.group_size)
                         for e in range(self.entries)], dtype=np.int8)

    def encode(self, values: np.ndarray) -> np.ndarray:
        """Balanced-ternary group values (``group_values``) -> table indices (int64)."""
        v = np.asarray(values, dtype=np.int64)
        if self.mirror:
            return (v < 0).astype(np.int64) << self.magnitude_bits | np.abs(v)
        return v + self.center

    def decode(self, index: np.ndarray) -> np.ndarray:
        """Table indices -> balanced-ternary group values (inverse of ``encode``)."""
        idx = np.asarray(index, dtype=np.int64)
        if self.mirror:
            mag = idx & ((1 << self.magnitude_bits) - 1)
            if np.any(mag > self.center):
                raise ValueError(f"index magnitude above {self.center} is not a valid pattern")
            return np.where(idx >> self.magnitude_bits, -mag, mag)
        if np.any((idx < 0) | (idx >= 3 ** self.group_size)):
            raise ValueError(f"index outside [0, {3 ** self.group_size}) is not a valid pattern")
        return idx - self.center


def pad_to_multiple(arr: np.ndarray, multiple: int, axis: int = -1) -> np.ndarray:
    """Zero-pad ``arr`` along ``axis`` up to a multiple of ``multiple`` (explicit, never a crop)."""
    n = arr.shape[axis]
    extra = (-n) % multiple
    if not extra:
        return arr
    pad = [(0, 0)] * arr.ndim
    pad[axis] = (0, extra)
    return np.pad(arr, pad)


def group_values(weights, group_size: int) -> np.ndarray:
    """Ternary ``W[N, K]`` -> balanced-ternary group values ``[N, ceil(K / G)]``.

    K is zero-padded to a multiple of G; a zero weight contributes nothing, so padding never
    changes a result.
    """
    w = pad_to_multiple(check_ternary(weights), group_size).astype(np.int64)
    grouped = w.reshape(*w.shape[:-1], -1, group_size)
    powers = 3 ** np.arange(group_size, dtype=np.int64)
    return grouped @ powers


def build_tables(acts, code: TableCode) -> np.ndarray:
    """int8 activations ``[..., K]`` -> tables ``[..., ceil(K / G), entries]`` (int64).

    Entry ``e`` of table ``j`` is the exact signed sum of activations ``j*G .. j*G+G-1``
    against ``code.entry_patterns[e]``; K is zero-padded to a multiple of G.
    """
    a = pad_to_multiple(check_int8(acts), code.group_size)
    grouped = a.reshape(*a.shape[:-1], -1, code.group_size)
    return grouped @ code.entry_patterns.T.astype(np.int64)


def lookup(tables: np.ndarray, index: np.ndarray, code: TableCode) -> np.ndarray:
    """What the engine's lookup returns: ``tables[..., index]``, negated for mirror sign bits."""
    idx = np.asarray(index, dtype=np.int64)
    if code.mirror:
        mag = idx & ((1 << code.magnitude_bits) - 1)
        vals = np.take_along_axis(tables, mag, axis=-1)
        return np.where(idx >> code.magnitude_bits, -vals, vals)
    return np.take_along_axis(tables, idx, axis=-1)


def ternary_matmul(acts, weights) -> np.ndarray:
    """The exact integer result ``acts[M, K] @ weights[N, K].T`` as int64 ``[M, N]``."""
    a = check_int8(acts)
    w = check_ternary(weights).astype(np.int64)
    if a.shape[-1] != w.shape[-1]:
        raise ValueError(f"activations have K = {a.shape[-1]} but weights have K = {w.shape[-1]}")
    return a @ w.T


# --------------------------------------------------------------------------------------------
# Bit packing (little-endian: field 0 in the least significant bits).


def pack_fields(fields, bits: int) -> int:
    """Pack a 1-D sequence of unsigned fields, ``bits`` each, into one integer (field 0 lowest)."""
    word = 0
    limit = 1 << bits
    for i, f in enumerate(np.asarray(fields, dtype=np.int64).ravel().tolist()):
        if not 0 <= f < limit:
            raise ValueError(f"field {i} = {f} does not fit {bits} unsigned bits")
        word |= f << (i * bits)
    return word


def unpack_fields(word: int, bits: int, count: int, *, signed: bool = False) -> np.ndarray:
    """Inverse of ``pack_fields``; ``signed`` reads each field as two's complement."""
    mask = (1 << bits) - 1
    out = [(word >> (i * bits)) & mask for i in range(count)]
    if signed:
        out = [f - (1 << bits) if f >> (bits - 1) else f for f in out]
    return np.array(out, dtype=np.int64)


def pack_words(fields, bits: int, word_bits: int) -> list[int]:
    """Pack fields contiguously into ``word_bits``-wide memory words (a field may straddle two)."""
    stream = pack_fields(fields, bits)
    total = len(np.asarray(fields).ravel()) * bits
    n_words = -(-total // word_bits)
    mask = (1 << word_bits) - 1
    return [(stream >> (i * word_bits)) & mask for i in range(n_words)]


# --------------------------------------------------------------------------------------------
# The TLMM engine's arithmetic and stream layout (``trilut.hdl.linear.tlmm_engine``).


def tlmm_matmul(acts, weights, code: TableCode, tables_per_step: int) -> np.ndarray:
    """``acts[M, K] @ weights[N, K].T`` computed the engine's way: tables of G-sums built per
    block of G*T activations, one lookup (sign applied) per table per column, exact int64 adds.
    Equal to ``ternary_matmul`` by construction; the tests check both against the RTL."""
    a = check_int8(acts)
    w = check_ternary(weights)
    if a.shape[-1] != w.shape[-1]:
        raise ValueError(f"activations have K = {a.shape[-1]} but weights have K = {w.shape[-1]}")
    block = code.group_size * tables_per_step
    a = pad_to_multiple(a, block)
    w = pad_to_multiple(w, block)
    tables = build_tables(a, code)                         # [M, K/G, E]
    index = code.encode(group_values(w, code.group_size))  # [N, K/G]
    m, n = a.shape[0], w.shape[0]
    out = np.zeros((m, n), dtype=np.int64)
    for row in range(m):
        looked = lookup(np.broadcast_to(tables[row], (n, *tables[row].shape)),
                        index[:, :, None], code)[..., 0]   # [N, K/G]
        out[row] = looked.sum(axis=-1)
    return out


def pack_rows(fields: np.ndarray, bits: int) -> list[int]:
    """Pack each row of ``fields[B, F]`` (unsigned, ``bits`` each, field 0 lowest) into an int.

    Vectorized equivalent of ``[pack_fields(row, bits) for row in fields]``."""
    f = np.asarray(fields, dtype=np.int64)
    if f.size and (f.min() < 0 or f.max() >= 1 << bits):
        raise ValueError(f"fields must fit {bits} unsigned bits")
    bit_array = ((f[..., None] >> np.arange(bits, dtype=np.int64)) & 1).astype(np.uint8)
    packed = np.packbits(bit_array.reshape(f.shape[0], -1), axis=-1, bitorder="little")
    return [int.from_bytes(row.tobytes(), "little") for row in packed]


def _tile_schedule(n_groups: int, depth: int):
    for start in range(0, n_groups, depth):
        yield start, min(depth, n_groups - start)


def tlmm_weight_beats(weights, code: TableCode, tables_per_step: int, columns: int,
                      depth: int) -> list[int]:
    """Ternary ``W[N, K]`` -> the engine's weight-beat stream for one activation row.

    Order: tile (D groups of C columns), K block (G*T), group in tile. Beat field (c, t) is
    the index of column ``g*C + c`` for table ``kb*T + t``, at bit ``(c*T + t) * index_bits``.
    K and N are zero-padded (padding encodes the all-zero pattern and adds nothing)."""
    block = code.group_size * tables_per_step
    w = pad_to_multiple(pad_to_multiple(check_ternary(weights), block, -1), columns, 0)
    index = code.encode(group_values(w, code.group_size))        # [Np, Kp/G]
    n_groups = w.shape[0] // columns
    k_blocks = w.shape[1] // block
    index = index.reshape(n_groups, columns, k_blocks, tables_per_step)
    beats = []
    for start, tile in _tile_schedule(n_groups, depth):
        fields = index[start:start + tile].transpose(2, 0, 1, 3)  # [kb, d, C, T]
        beats += pack_rows(fields.reshape(k_blocks * tile, -1), code.index_bits)
    return beats


def tlmm_act_beats(acts, code: TableCode, tables_per_step: int, columns: int,
                   depth: int, n: int) -> list[int]:
    """int8 ``acts[M, K]`` -> the engine's activation-beat stream for an N-column matmul:
    per row, per tile, per K block one beat of G*T two's-complement bytes (element 0 lowest)."""
    block = code.group_size * tables_per_step
    a = pad_to_multiple(check_int8(acts), block) & 0xFF
    n_groups = -(-n // columns)
    blocks = a.reshape(a.shape[0], -1, block)
    beats = []
    for row in blocks:
        row_beats = pack_rows(row, ACT_BITS)
        for _start, _tile in _tile_schedule(n_groups, depth):
            beats += row_beats
    return beats


def tlmm_result_beats(results: np.ndarray, columns: int, acc_width: int) -> list[int]:
    """Exact ``[M, N]`` results -> the engine's result beats (per row, per group of C columns,
    two's complement ``acc_width`` bits per column, padded columns zero)."""
    r = pad_to_multiple(np.asarray(results, dtype=np.int64), columns, -1)
    lo, hi = -(1 << (acc_width - 1)), (1 << (acc_width - 1)) - 1
    if r.size and (r.min() < lo or r.max() > hi):
        raise ValueError(f"result does not fit {acc_width} signed bits")
    u = r & ((1 << acc_width) - 1)
    return pack_rows(u.reshape(-1, columns), acc_width)


def tlmm_unpack_results(beats: list[int], m: int, n: int, columns: int,
                        acc_width: int) -> np.ndarray:
    """The engine's result beats -> int64 ``[M, N]`` (padding columns dropped)."""
    groups = -(-n // columns)
    if len(beats) != m * groups:
        raise ValueError(f"expected {m * groups} result beats for {m} x {n}, got {len(beats)}")
    out = np.array([unpack_fields(b, acc_width, columns, signed=True) for b in beats])
    return out.reshape(m, groups * columns)[:, :n]


# --------------------------------------------------------------------------------------------
# The element-wise datapath's number format (fp16 with RNE, flush-to-zero and saturation;
# docs/elementwise.md) lives in ``trilut.models.fp16`` and is part of this module's surface.

# --------------------------------------------------------------------------------------------
# fp16 lane streams: the element-wise units' beats (C fp16 codes per beat).


def lane_beats(codes, lanes: int) -> list[int]:
    """fp16 codes ``[rows, n]`` -> the lane stream: per row ``ceil(n/L)`` beats of ``L`` codes
    (lane 0 lowest), the last beat zero-padded."""
    if isinstance(lanes, bool) or not isinstance(lanes, int) or lanes < 1:
        raise ValueError(f"lanes must be a positive integer, not {lanes!r}")
    c = np.atleast_2d(np.asarray(codes, dtype=np.int64))
    padded = pad_to_multiple(c, lanes)
    return pack_rows(padded.reshape(-1, lanes), 16)


def unpack_lane_beats(beats, rows: int, n: int, lanes: int) -> np.ndarray:
    """Inverse of ``lane_beats``: beats -> ``np.uint16`` codes ``[rows, n]``."""
    per_row = -(-n // lanes)
    if len(beats) != rows * per_row:
        raise ValueError(f"expected {rows * per_row} beats for {rows} rows of {n}, "
                         f"got {len(beats)}")
    out = np.array([unpack_fields(b, 16, lanes) for b in beats], dtype=np.uint16)
    return out.reshape(rows, per_row * lanes)[:, :n]


from trilut.models.fp16 import *  # noqa: E402,F401,F403  (re-exported: one numerics namespace)
from trilut.models.fp16 import __all__ as _fp16_all  # noqa: E402

__all__ += ["tlmm_matmul", "pack_rows", "tlmm_weight_beats", "tlmm_act_beats",
            "tlmm_result_beats", "tlmm_unpack_results", *_fp16_all]


# --------------------------------------------------------------------------------------------
# The level-2 chains (DESIGN.md section 3): the blocks' bit-exact models and the host's
# references are these functions, written once.


def rmsnorm_partials(lanes: int) -> int:
    """The sum-of-squares order of the hardware's RMSNorm: two fp32 partial sums per lane
    (``hdl.elementwise.rmsnorm.RmsNorm``), added by a pairwise tree."""
    return 2 * lanes


def fp16_linear(x, values, weight_scale: float) -> np.ndarray:
    """fp16 codes ``x[M, K]`` -> int8 per-row quantization -> exact ternary sums with
    ``values[N, K]`` -> dequantization by ``weight_scale`` -> fp16 codes ``[M, N]``."""
    codes, absmax = fp16_quantize_int8(x)
    acc = ternary_matmul(codes, values)
    scale = fp16_dequant_scale(absmax, weight_scale)
    return fp16_dequantize(acc, np.asarray(scale).reshape(-1, 1))


def fp16_bitlinear(x, norm_weight, values, weight_scale: float, *, eps: float,
                   lanes: int) -> np.ndarray:
    """RMSNorm (the hardware's order for ``lanes``) -> :func:`fp16_linear`."""
    normed = fp16_rmsnorm(x, norm_weight, eps, partials=rmsnorm_partials(lanes))
    return fp16_linear(normed, values, weight_scale)


def fp16_ffn(h, norm_weight, sub_norm_weight, gate_values, up_values, down_values,
             scales: tuple[float, float, float], *, activation: str, eps: float,
             lanes: int) -> np.ndarray:
    """``h + down(sub_norm(act(gate(norm(h))) * up(norm(h))))`` on fp16 codes, the gate and
    up projections sharing one quantization of ``norm(h)``, as ``hdl.ffn_block`` does."""
    if activation not in ("relu2", "silu"):
        raise ValueError(f"activation must be 'relu2' or 'silu', not {activation!r}")
    h = np.asarray(h, dtype=np.uint16)
    gate_scale, up_scale, down_scale = scales
    normed = fp16_rmsnorm(h, norm_weight, eps, partials=rmsnorm_partials(lanes))
    gate = fp16_linear(normed, gate_values, gate_scale)
    up = fp16_linear(normed, up_values, up_scale)
    act = fp16_relu2(gate) if activation == "relu2" else fp16_silu(gate)
    mixed = fp16_gate_mul(act, up)
    down = fp16_bitlinear(mixed, sub_norm_weight, down_values, down_scale, eps=eps, lanes=lanes)
    return fp16_residual_add(h, down)


__all__ += ["rmsnorm_partials", "fp16_linear", "fp16_bitlinear", "fp16_ffn"]


def fp16_attention(h, norm_weight, sub_norm_weight, q_values, k_values, v_values, o_values,
                   scales: tuple[float, float, float, float], cos, sin, k_cache, v_cache, *,
                   start: int, phase: str, heads: int, kv_heads: int, head_dim: int,
                   eps: float, lanes: int, attn_lanes: int) -> np.ndarray:
    """The attention half of a decoder layer on fp16 codes ``h[T, hidden]`` at positions
    ``start .. start+T-1``, as the hardware computes it::

        x = norm(h);  q, k, v = q/k/v_proj(x)       (one quantization of x shared)
        q, k = rope(q), rope(k)                    (pair-consecutive rows: the image's order)
        k_cache[:, start:start+T], v_cache[...] = k, v
        a = online (prefill) or two-pass (decode) attention over positions 0 .. start+i
        return h + o_proj(sub_norm(a))

    ``q/k_values`` are in the weight image's row order (``host.weight_image.
    stored_row_order``); ``cos``/``sin`` are fp16 codes ``[T, head_dim/2]`` for the T
    positions; ``k_cache``/``v_cache`` are fp16 codes ``[kv_heads, S, head_dim]``, written in
    place. ``phase`` is ``"prefill"`` (any T, the prefill unit's online softmax) or
    ``"decode"`` (T = 1, the decode unit's two-pass softmax).
    """
    from trilut.models import attention as at
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase must be 'prefill' or 'decode', not {phase!r}")
    h = np.asarray(h, dtype=np.uint16)
    t_len = h.shape[0]
    if phase == "decode" and t_len != 1:
        raise ValueError(f"a decode step takes one token, not {t_len}")
    if start < 0 or start + t_len > k_cache.shape[1]:
        raise ValueError(f"positions {start}..{start + t_len - 1} do not fit the KV cache of "
                         f"{k_cache.shape[1]} positions")
    o_scale = scales[3]
    q, k, v = fp16_qkv(h, norm_weight, q_values, k_values, v_values, scales[:3], eps=eps,
                       lanes=lanes)

    def split(x, n):                                     # [T, n*d] -> [n, T, d]
        return x.reshape(t_len, n, head_dim).transpose(1, 0, 2)

    q = at.fp16_rope(split(q, heads), cos, sin)
    k = at.fp16_rope(split(k, kv_heads), cos, sin)
    v = split(v, kv_heads)
    k_cache[:, start:start + t_len] = k
    v_cache[:, start:start + t_len] = v
    if phase == "prefill":
        out = at.online_attention(q, k_cache, v_cache, start=start, lanes=attn_lanes)
    else:
        out = at.two_pass_attention(q, k_cache, v_cache, position=start, lanes=attn_lanes)
    attended = out.transpose(1, 0, 2).reshape(t_len, heads * head_dim)
    o = fp16_bitlinear(attended, sub_norm_weight, o_values, o_scale, eps=eps, lanes=lanes)
    return fp16_residual_add(h, o)


__all__ += ["fp16_attention"]


def fp16_qkv(h, norm_weight, q_values, k_values, v_values, scales: tuple[float, float, float],
             *, eps: float, lanes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``x = norm(h); q, k, v = q/k/v_proj(x)`` on fp16 codes ``h[T, hidden]``, the three
    projections sharing one int8 quantization of ``x``, as ``hdl.decoder.qkv_block`` does.
    ``q/k_values`` in the weight image's row order (RoPE pair order); returns fp16 codes."""
    h = np.asarray(h, dtype=np.uint16)
    normed = fp16_rmsnorm(h, norm_weight, eps, partials=rmsnorm_partials(lanes))
    codes, absmax = fp16_quantize_int8(normed)

    def project(values, scale):
        acc = ternary_matmul(codes, values)
        return fp16_dequantize(acc, np.asarray(fp16_dequant_scale(absmax, scale)).reshape(-1, 1))

    return tuple(project(v, s) for v, s in zip((q_values, k_values, v_values), scales,
                                                strict=True))


__all__ += ["fp16_qkv"]
