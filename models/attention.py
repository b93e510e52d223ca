"""Attention in hardware numerics (level 2), bit for bit: RoPE, scores, exp2, softmax, PV.

The attention units (prefill and decode) compute exactly this; docs/attention.md gives the
reasons for each choice and the measured error against the float model. Number formats:

* **Q, K, V, the output**: fp16 codes (``np.uint16``), trilut's fp16 rules (``models/fp16.py``:
  RNE, flush to zero, saturation). The KV cache holds K (after RoPE) and V in fp16.
* **RoPE** in the *pair-consecutive* layout: the weight image stores each head's Q/K
  projection rows permuted (:func:`rope_permutation`) so that the rotation pairs of
  ``rotate_half`` (element ``i`` with ``i + d/2``) sit side by side (``2i``, ``2i+1``). Dot
  products of Q with K are unchanged by permuting both the same way, so the permutation is
  lossless. ``y0 = round(round(x0 c) - round(x1 s))``, ``y1 = round(round(x1 c) +
  round(x0 s))``: two fp16 multiplies and one fp16 add per output, the ``trilut.hdl``
  fp16 units. ``c``, ``s`` are fp16 codes from a table (:func:`rope_tables`).
* **Scores** in the log2 domain, fp32: each ``q_i k_i`` product is exact in fp32 (11 x 11
  significand bits); the ``d`` products are added in a fixed order, ``lanes`` per cycle
  (pairwise tree over the lanes of a beat, then the beats in order, each add rounded to
  fp32), and the sum is multiplied once by ``C = round32(log2(e) / sqrt(d))``:
  ``t = round32(dot * C)``. Then ``softmax`` is ``2**(t_j - max t)`` normalised.
* **exp2** of ``x <= 0`` (:func:`exp2_neg`): ``X = rne(-x * 2**10)``, ``n = X >> 10``,
  ``k = X & 1023``; ``2**x ~ T[k] * 2**(-11 - n)`` with ``T[k] = round(2**11 * 2**(-k/1024))``
  (an 11-bit table, 1024 entries), flushed to zero below 2**-14: an fp16 number. No
  multiplier.
* **Sums and accumulators** ``l`` and ``o`` are fp32; ``p * v`` is exact in fp32.
* **Normalisation**: ``out = round16(o * recip_fp32(l))``, the reciprocal from a 128-entry
  table and one Newton step (:func:`recip_fp32`, like ``rsqrt_fp32``).

Two orders of the same softmax, one per unit:

* :func:`online_attention` (prefill, flash-attention style with a key block of 1): per query,
  keys in ascending position; a running max ``m``, sum ``l`` and accumulator ``o``, rescaled
  by ``c = 2**(m_old - m_new)`` when a larger score arrives.
* :func:`two_pass_attention` (decode): all scores of the one query kept, ``m`` their max,
  then ``l`` and ``o`` summed in ascending position without rescaling.
"""

from __future__ import annotations

import math

import numpy as np

from trilut.models.fp16 import FP16, FP32, fp16_add, fp16_mul

__all__ = [
    "EXP2_FRACTION_BITS", "exp2_table", "exp2_neg", "RECIP_INDEX_BITS",
    "RECIP_FRACTION_BITS", "recip_table", "recip_fp32", "score_scale",
    "rope_permutation", "rope_tables", "fp16_rope", "fp32_dot", "scores",
    "online_attention", "two_pass_attention", "kv_head_of", "rope_table_beats",
]

#: Fraction bits of exp2's fixed-point argument (its table has 2**10 entries).
EXP2_FRACTION_BITS = 10
#: Significand bits of the exp2 table's entries (fp16's precision).
_EXP2_BITS = FP16.precision


def exp2_table() -> np.ndarray:
    """``T[k] = round(2**11 * 2**(-k / 1024))`` (int64, 1024..2048; ``T[0] = 2048``).
    ``math.pow``/``round`` are correctly rounded here (every entry is far from a tie), so
    the table is the same on every machine."""
    n = 1 << EXP2_FRACTION_BITS
    return np.array([round(math.ldexp(2.0 ** (-k / n), _EXP2_BITS)) for k in range(n)],
                    dtype=np.int64)


_EXP2_TABLE = exp2_table()


def exp2_neg(x) -> np.ndarray:
    """``2**x`` for fp32 values ``x <= 0`` (float64 arrays), the hardware's way; an fp16
    number (float64), ``+0`` when it falls below 2**-14."""
    x = np.asarray(x, dtype=np.float64)
    if np.any(x > 0):
        raise ValueError("exp2_neg needs x <= 0 (scores minus their running maximum)")
    fixed = np.rint(-x * (1 << EXP2_FRACTION_BITS))         # exact scaling, RNE to integer
    # Beyond 2**-25 every result flushes; clamp before the integer conversion.
    fixed = np.minimum(fixed, 40 << EXP2_FRACTION_BITS).astype(np.int64)
    n = fixed >> EXP2_FRACTION_BITS
    k = fixed & ((1 << EXP2_FRACTION_BITS) - 1)
    value = np.ldexp(_EXP2_TABLE[k].astype(np.float64), -_EXP2_BITS - n)
    return np.where(value < FP16.min_normal, 0.0, value)


#: The reciprocal's table: the top 7 mantissa bits of ``l`` (128 entries) of 18 fraction bits.
RECIP_INDEX_BITS = 7
RECIP_FRACTION_BITS = 18


def recip_table() -> np.ndarray:
    """``Y0[k]``: ``1/m`` on ``m in [1 + k/128, 1 + (k+1)/128)`` as ``round(2**18 * 2 /
    (m0 + m1))``, the constant with the smallest worst relative error on the segment."""
    n = 1 << RECIP_INDEX_BITS
    return np.array([round(math.ldexp(2.0 / ((1 + k / n) + (1 + (k + 1) / n)),
                                      RECIP_FRACTION_BITS)) for k in range(n)], dtype=np.int64)


_RECIP_TABLE = recip_table()


def recip_fp32(v) -> np.ndarray:
    """``1 / v`` for fp32 values ``v > 0`` (float64 arrays), the hardware's way.

    With ``v = 1.f * 2**E`` (fp32 bits), ``M = 2**23 + f``, in integers::

        Y0 = table[f >> 16]                       # 18 fraction bits, ~ 1/m (+-2**-8)
        T  = (M * Y0) >> 23                       # m * y0                 (floor)
        Y1 = (Y0 * ((2 << 18) - T)) >> 18         # y0 * (2 - m y0), Newton (floor)
        r  = Y1 * 2**(-18 - E)                    # exact in fp32: Y1 has <= 19 bits

    The worst relative error is about 2**-16 (docs/attention.md), below an fp16 ulp.
    """
    v = np.asarray(v, dtype=np.float64)
    if np.any(v <= 0):
        raise ValueError("recip_fp32 needs positive values")
    codes = FP32.encode(FP32.round(v)).astype(np.int64)
    e = (codes >> 23) - FP32.bias
    f = codes & ((1 << 23) - 1)
    m_fixed = (1 << 23) + f
    q = RECIP_FRACTION_BITS
    y0 = _RECIP_TABLE[f >> (23 - RECIP_INDEX_BITS)]
    t = (m_fixed * y0) >> 23
    y1 = (y0 * ((2 << q) - t)) >> q
    return FP32.round(np.ldexp(y1.astype(np.float64), -q - e))


def score_scale(head_dim: int) -> float:
    """``C = round32(log2(e) / sqrt(head_dim))``: dot products times ``C`` are log2-domain
    scores, so the softmax needs only :func:`exp2_neg`."""
    return float(FP32.round(math.log2(math.e) / math.sqrt(head_dim)))


# --- RoPE ---------------------------------------------------------------------------------------

def rope_permutation(head_dim: int) -> np.ndarray:
    """The order of one head's Q/K projection rows in the weight image: row ``2i`` is
    ``rotate_half``'s element ``i``, row ``2i + 1`` its partner ``i + head_dim/2``
    (``permuted = original[perm]``)."""
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number for RoPE, not {head_dim!r}")
    half = head_dim // 2
    return np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)


def rope_tables(positions, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """fp16 codes ``cos, sin`` of shape ``[len(positions), head_dim/2]``: the angle of pair
    ``i`` at position ``p`` is ``p * theta**(-2i/d)``, in float64, rounded once to fp16."""
    rope_permutation(head_dim)                                  # checks head_dim
    if not theta > 1:
        raise ValueError(f"rope theta must be above 1, not {theta!r}")
    positions = np.asarray(positions, dtype=np.float64)
    if np.any(positions < 0) or np.any(positions != np.floor(positions)):
        raise ValueError("positions must be non-negative integers")
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angle = positions[:, None] * inv_freq[None, :]
    return FP16.from_float(np.cos(angle)), FP16.from_float(np.sin(angle))


def fp16_rope(x, cos, sin) -> np.ndarray:
    """RoPE on fp16 codes ``x[..., T, d]`` in the pair-consecutive layout, ``cos``/``sin``
    codes ``[T, d/2]`` (one row per position of ``x``'s ``T`` axis)."""
    x = np.asarray(x, dtype=np.uint16)
    a, b = x[..., 0::2], x[..., 1::2]
    cos, sin = np.asarray(cos, dtype=np.uint16), np.asarray(sin, dtype=np.uint16)
    if cos.shape != a.shape[-2:] or sin.shape != a.shape[-2:]:
        raise ValueError(f"cos/sin must be [T, d/2] = {a.shape[-2:]}, not {cos.shape} / "
                         f"{sin.shape}")
    neg = np.uint16(0x8000)
    y0 = fp16_add(fp16_mul(a, cos), fp16_mul(b, sin) ^ neg)
    y1 = fp16_add(fp16_mul(b, cos), fp16_mul(a, sin))
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = y0, y1
    return out


# --- scores --------------------------------------------------------------------------------------

def _check_lanes(lanes) -> None:
    if isinstance(lanes, bool) or not isinstance(lanes, int) or lanes < 1 or lanes & (lanes - 1):
        raise ValueError(f"attention lanes must be a power of two, not {lanes!r}")


def fp32_dot(q, k, lanes: int) -> np.ndarray:
    """``sum_i q_i k_i`` over the last axis of fp16 values (float64, broadcasting), in fp32:
    the products (exact) of each beat of ``lanes`` elements added pairwise (``(0+1)+(2+3)``,
    ...), then the beats in order (``acc = round32(acc + beat)`` from the first beat).
    The last beat is padded with zero products."""
    _check_lanes(lanes)
    prod = np.asarray(q, dtype=np.float64) * np.asarray(k, dtype=np.float64)
    d = prod.shape[-1]
    pad = (-d) % lanes
    if pad:
        prod = np.concatenate([prod, np.zeros((*prod.shape[:-1], pad))], axis=-1)
    level = prod.reshape(*prod.shape[:-1], -1, lanes)
    while level.shape[-1] > 1:
        level = FP32.round(level[..., 0::2] + level[..., 1::2])
    beats = level[..., 0]
    acc = beats[..., 0]
    for j in range(1, beats.shape[-1]):
        acc = FP32.round(acc + beats[..., j])
    return acc


def scores(q, k, lanes: int) -> np.ndarray:
    """Log2-domain scores ``t = round32(fp32_dot(q, k) * C)`` of fp16 values."""
    return FP32.round(fp32_dot(q, k, lanes) * score_scale(np.shape(q)[-1]))


def kv_head_of(head: int, heads: int, kv_heads: int) -> int:
    """The KV head a query head reads (grouped-query attention: consecutive groups)."""
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"{heads} query heads do not split into {kv_heads} KV head groups")
    return head // (heads // kv_heads)


# --- softmax x V ----------------------------------------------------------------------------------

def _finish(o, l) -> np.ndarray:
    return FP16.from_float(o * recip_fp32(l)[..., None])


def _check_qkv(q, k, v, heads_axis_ok=True):
    q, k, v = (np.asarray(a, dtype=np.uint16) for a in (q, k, v))
    if q.ndim != 3 or k.ndim != 3 or v.shape != k.shape:
        raise ValueError(f"q must be [H, T, d] and k, v [H_kv, S, d], not {q.shape}, "
                         f"{k.shape}, {v.shape}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} and {k.shape[-1]}")
    if q.shape[0] % k.shape[0]:
        raise ValueError(f"{q.shape[0]} query heads do not split into {k.shape[0]} KV heads")
    return q, k, v


def online_attention(q, k, v, *, start: int, lanes: int) -> np.ndarray:
    """Prefill attention: fp16 codes ``q[H, T, d]`` at positions ``start .. start+T-1``
    against ``k, v[H_kv, S, d]`` (positions ``0 .. S-1``, ``S >= start + T``), causal;
    query ``i`` sees keys ``0 .. start + i``. Returns fp16 codes ``[H, T, d]``.

    Per query, keys in ascending position, from ``m = t_0``, ``l = 1``, ``o = v_0``::

        if t_j > m:  c = exp2(round32(m - t_j)); m = t_j; p = 1
        else:        c = 1;                     p = exp2(round32(t_j - m))
        l = round32(round32(l * c) + p)
        o = round32(round32(o * c) + p * v_j)          # per element; p * v_j exact
    """
    q, k, v = _check_qkv(q, k, v)
    heads, t_len, d = q.shape
    if start < 0 or start + t_len > k.shape[1]:
        raise ValueError(f"queries at {start}..{start + t_len - 1} need keys up to "
                         f"{start + t_len - 1}; the cache holds {k.shape[1]}")
    group = heads // k.shape[0]
    qv = FP16.decode(q)                                          # [H, T, d]
    kv_k = FP16.decode(k).repeat(group, axis=0)                  # [H, S, d]
    kv_v = FP16.decode(v).repeat(group, axis=0)
    positions = start + np.arange(t_len)                         # [T]
    m = scores(qv, kv_k[:, :1, :], lanes)                        # key 0: [H, T]
    l = np.ones((heads, t_len))
    o = np.broadcast_to(kv_v[:, :1, :], (heads, t_len, d)).copy()
    for j in range(1, start + t_len):
        active = positions >= j                                  # [T]
        if not active.any():
            continue
        t = scores(qv[:, active], kv_k[:, j:j + 1], lanes)      # [H, A]
        mj, lj, oj = m[:, active], l[:, active], o[:, active]
        new = t > mj
        c = np.where(new, exp2_neg(FP32.round(np.where(new, mj - t, 0.0))), 1.0)
        p = np.where(new, 1.0, exp2_neg(FP32.round(np.where(new, 0.0, t - mj))))
        m[:, active] = np.maximum(mj, t)
        l[:, active] = FP32.round(FP32.round(lj * c) + p)
        o[:, active] = FP32.round(FP32.round(oj * c[..., None])
                                  + p[..., None] * kv_v[:, j:j + 1, :])
    return _finish(o, l)


def two_pass_attention(q, k, v, *, position: int, lanes: int) -> np.ndarray:
    """Decode attention: fp16 codes ``q[H, 1, d]`` at ``position`` against keys and values
    ``0 .. position`` of ``k, v[H_kv, S, d]``. All scores kept, ``m = max t_j``, then in
    ascending position from ``l = o = +0``::

        p_j = exp2(round32(t_j - m));  l = round32(l + p_j);  o = round32(o + p_j * v_j)
    """
    q, k, v = _check_qkv(q, k, v)
    heads, t_len, d = q.shape
    if t_len != 1:
        raise ValueError(f"decode attention takes one query, not {t_len}")
    if not 0 <= position < k.shape[1]:
        raise ValueError(f"position {position} is outside the cache of {k.shape[1]}")
    group = heads // k.shape[0]
    qv = FP16.decode(q)                                          # [H, 1, d]
    kv_k = FP16.decode(k[:, :position + 1]).repeat(group, axis=0)
    kv_v = FP16.decode(v[:, :position + 1]).repeat(group, axis=0)
    t = scores(qv, kv_k, lanes)                                  # [H, S]
    m = t.max(axis=1, keepdims=True)
    p = exp2_neg(FP32.round(t - m))                              # [H, S]
    l = np.zeros((heads, 1))
    o = np.zeros((heads, 1, d))
    for j in range(position + 1):
        l = FP32.round(l + p[:, j:j + 1])
        o = FP32.round(o + p[:, j:j + 1, None] * kv_v[:, j:j + 1, :])
    return _finish(o, l)


# --- the RoPE unit's table stream ---------------------------------------------------------------

def rope_table_beats(cos, sin, lanes: int) -> list[int]:
    """The table stream of the RoPE unit (``trilut.hdl.attention.rope.Rope``): fp16 codes
    ``cos, sin[T, d/2]`` (:func:`rope_tables`) -> per position ``d / lanes`` beats of
    ``lanes`` fp16 codes (lane 0 lowest), pair ``i`` in lanes ``2i`` (cos) and ``2i + 1``
    (sin) of beat ``2i // lanes``: the lanes of the ``x`` beat it rotates."""
    if (isinstance(lanes, bool) or not isinstance(lanes, int) or lanes < 2
            or lanes & (lanes - 1)):
        raise ValueError(f"RoPE lanes must be an even power of two, not {lanes!r}")
    cos, sin = np.asarray(cos), np.asarray(sin)
    if cos.ndim != 2 or sin.shape != cos.shape:
        raise ValueError(f"cos and sin must be [T, d/2] codes of one shape, not {cos.shape} "
                         f"and {sin.shape}")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.size and (table.min() < 0 or table.max() > 0xFFFF
                           or np.any(table != np.floor(table))):
            raise ValueError(f"{name} must hold fp16 codes (integers 0 .. 0xFFFF)")
    d = 2 * cos.shape[1]
    if d % lanes:
        raise ValueError(f"head_dim {d} (2 x {cos.shape[1]} pairs) is not a multiple of "
                         f"lanes {lanes}")
    interleaved = np.empty((cos.shape[0], d), dtype="<u2")
    interleaved[:, 0::2], interleaved[:, 1::2] = cos, sin
    return [int.from_bytes(beat.tobytes(), "little") for beat in interleaved.reshape(-1, lanes)]


# --- the attention units' stream orders (host packers; the units' contract) ----------------------

def prefill_batches(*, start: int, tokens: int, kv_heads: int, n_pe: int,
                    plain: bool) -> list[tuple[int, int, int, int]]:
    """The prefill unit's batches, in its order, as ``(kv_head, first, queries, keys)``: per
    KV head, the last ``n_pe`` tokens first; a batch's queries are tokens ``first, first - 1,
    ..., first - queries + 1`` (descending position; the last batch of a head is partial when
    ``n_pe`` does not divide ``tokens``), and it streams keys ``0 .. keys - 1``: up to its
    largest query's position ``start + first`` (causal skipping), or every key when
    ``plain``."""
    out = []
    for h in range(kv_heads):
        for b in range(-(-tokens // n_pe)):
            first = tokens - 1 - b * n_pe
            queries = min(n_pe, first + 1)
            keys = start + tokens if plain else start + first + 1
            out.append((h, first, queries, keys))
    return out


def prefill_streams(q, k, v, *, start: int, n_pe: int, lanes: int, plain: bool,
                    out=None) -> dict[str, list[int]]:
    """The prefill unit's streams for one chunk: fp16 codes ``q[H, T, d]``, ``k, v[H_kv, S,
    d]`` (and the expected ``out[H, T, d]``) -> lane beats of ``q``, ``kv`` (and ``out``): per
    batch (:func:`prefill_batches`), ``q`` per query (descending position) per query head of
    the KV head's group; ``kv`` per key, ``k_j``'s beats then ``v_j``'s."""
    from trilut.models.numerics import lane_beats
    q, k, v = (np.asarray(a, dtype=np.uint16) for a in (q, k, v))
    heads, tokens, _ = q.shape
    group = heads // k.shape[0]
    qs, kvs, outs = [], [], []
    for h, first, queries, keys in prefill_batches(start=start, tokens=tokens,
                                                   kv_heads=k.shape[0], n_pe=n_pe, plain=plain):
        for i in range(queries):
            for g in range(group):
                qs.append(q[h * group + g, first - i])
                if out is not None:
                    outs.append(out[h * group + g, first - i])
        for j in range(keys):
            kvs += [k[h, j], v[h, j]]
    streams = {"q": lane_beats(np.array(qs), lanes), "kv": lane_beats(np.array(kvs), lanes)}
    if out is not None:
        streams["out"] = lane_beats(np.array(outs), lanes)
    return streams


def decode_streams(q, k, v, *, position: int, lanes: int, out=None) -> dict[str, list[int]]:
    """The decode unit's streams for one step: ``q[H, 1, d]`` head-major; ``k`` and ``v`` per
    KV head, positions ``0 .. position`` (one incrementing range of the KV cache each); and
    the expected ``out[H, 1, d]``."""
    from trilut.models.numerics import lane_beats
    d = np.shape(q)[-1]
    streams = {"q": lane_beats(np.asarray(q).reshape(-1, d), lanes),
               "k": lane_beats(np.asarray(k)[:, :position + 1].reshape(-1, d), lanes),
               "v": lane_beats(np.asarray(v)[:, :position + 1].reshape(-1, d), lanes)}
    if out is not None:
        streams["out"] = lane_beats(np.asarray(out).reshape(-1, d), lanes)
    return streams


__all__ += ["prefill_batches", "prefill_streams", "decode_streams"]
