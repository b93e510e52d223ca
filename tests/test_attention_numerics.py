"""Level-2 attention numerics (models/attention.py): each approximation against float, the
defined summation orders against a naive loop, and both softmax orders against float
attention for MHA, GQA and MQA head layouts."""

import math

import numpy as np
import pytest

from trilut.models import attention as at
from trilut.models.fp16 import FP16, FP32

pytestmark = pytest.mark.fast


def _fp16(rng, shape, scale=1.0):
    return FP16.from_float(rng.normal(0.0, scale, shape))


def test_exp2_is_within_its_error_bound_and_exact_where_it_must_be():
    x = FP32.round(-np.linspace(0.0, 16.0, 200_001))
    y, ref = at.exp2_neg(x), 2.0 ** x
    normal = ref >= 2 ** -14 * (1 + 2 ** -10)
    # Argument quantised to 2**-10 (<= ln2 * 2**-11 relative) plus the 11-bit table's half
    # ulp (<= 2**-11 relative at 0.5): 8.3e-4.
    bound = math.log(2) * 2 ** -11 + 2 ** -11
    worst = np.max(np.abs(y[normal] - ref[normal]) / ref[normal])
    assert worst <= bound
    assert worst > bound / 2          # the bound is not loose by much: it is the real error
    # Results are fp16 numbers; 2**0 is exactly 1; below 2**-14 they flush to zero.
    assert np.array_equal(FP16.round(y), y)
    assert at.exp2_neg(0.0) == 1.0 and at.exp2_neg(-1.0) == 0.5
    assert at.exp2_neg(-14.0) == 2 ** -14 and at.exp2_neg(-14.5) == 0.0
    assert at.exp2_neg(-1e30) == 0.0
    with pytest.raises(ValueError, match="x <= 0"):
        at.exp2_neg(0.5)


def test_reciprocal_error_is_below_an_fp16_ulp():
    v = FP32.round(np.exp(np.linspace(0.0, 12.0, 100_001)))
    err = np.max(np.abs(at.recip_fp32(v) * v - 1.0))
    assert err < 2 ** -15.5
    assert at.recip_fp32(4.0) * 4.0 == pytest.approx(1.0, abs=2 ** -16)
    with pytest.raises(ValueError, match="positive"):
        at.recip_fp32(0.0)


def test_rope_in_the_pair_consecutive_layout_is_rotate_half():
    rng = np.random.default_rng(1)
    d, theta, positions = 64, 10000.0, np.arange(0, 300, 7)
    x = _fp16(rng, (len(positions), d), 2.0)
    perm = at.rope_permutation(d)
    assert sorted(perm) == list(range(d))
    cos, sin = at.rope_tables(positions, d, theta)
    y = np.empty_like(x)
    y[:, perm] = at.fp16_rope(x[:, perm], cos, sin)      # back to the rotate_half layout
    inv = theta ** (-np.arange(0, d, 2) / d)
    ang = np.concatenate([positions[:, None] * inv] * 2, axis=1)
    xf = FP16.decode(x)
    half = np.concatenate([-xf[:, d // 2:], xf[:, :d // 2]], axis=1)
    ref = xf * np.cos(ang) + half * np.sin(ang)
    # Three roundings of fp16 (two products, one sum) and the tables' own.
    mag = np.abs(xf) + np.abs(half)
    assert np.all(np.abs(FP16.decode(y) - ref) <= 3 * 2 ** -11 * mag + 2 ** -24)
    # Position 0 is the identity, bit for bit.
    c0, s0 = at.rope_tables([0], d, theta)
    assert np.array_equal(at.fp16_rope(x[:1], c0, s0), x[:1])


def test_the_permutation_keeps_every_dot_product():
    rng = np.random.default_rng(2)
    q, k = rng.normal(size=(5, 64)), rng.normal(size=(7, 64))
    perm = at.rope_permutation(64)
    # The same products summed in another order: equal up to float64 rounding.
    assert np.allclose(q[:, perm] @ k[:, perm].T, q @ k.T, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="even"):
        at.rope_permutation(63)


@pytest.mark.parametrize("lanes", [1, 4, 16, 64])
def test_dot_product_order_is_the_documented_one(lanes):
    rng = np.random.default_rng(lanes)
    q, k = FP16.decode(_fp16(rng, (64,), 3.0)), FP16.decode(_fp16(rng, (64,), 3.0))

    def tree(values):
        while len(values) > 1:
            values = [float(FP32.round(values[i] + values[i + 1]))
                      for i in range(0, len(values), 2)]
        return values[0]

    beats = [tree([q[b + i] * k[b + i] for i in range(lanes)]) for b in range(0, 64, lanes)]
    acc = beats[0]
    for beat in beats[1:]:
        acc = float(FP32.round(acc + beat))
    assert at.fp32_dot(q, k, lanes) == acc
    with pytest.raises(ValueError, match="power of two"):
        at.fp32_dot(q, k, 3)


def _float_attention(q, k, v, start):
    heads, t_len, d = q.shape
    group = heads // k.shape[0]
    qf = FP16.decode(q)
    kf, vf = (FP16.decode(a).repeat(group, axis=0) for a in (k, v))
    s = qf @ kf.transpose(0, 2, 1) / math.sqrt(d)
    future = np.arange(k.shape[1])[None, :] > (start + np.arange(t_len))[:, None]
    s = np.where(future, -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ vf


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1)])   # MHA, GQA, MQA
def test_both_softmax_orders_match_float_attention(heads, kv_heads):
    rng = np.random.default_rng(heads * 10 + kv_heads)
    t_len, d = 29, 64
    q, k, v = _fp16(rng, (heads, t_len, d)), _fp16(rng, (kv_heads, t_len, d)), \
        _fp16(rng, (kv_heads, t_len, d))
    ref = _float_attention(q, k, v, 0)
    online = at.online_attention(q, k, v, start=0, lanes=16)
    decode = np.stack([at.two_pass_attention(q[:, i:i + 1], k, v, position=i, lanes=16)[:, 0]
                       for i in range(t_len)], axis=1)
    for out in (online, decode):
        assert np.max(np.abs(FP16.decode(out) - ref)) < 2e-3
    # The first query sees only key 0: its output is v_0 exactly.
    assert np.array_equal(online[:, 0], np.repeat(v, heads // kv_heads, axis=0)[:, 0])


def test_a_prefill_in_chunks_equals_one_prefill():
    rng = np.random.default_rng(7)
    q, k, v = _fp16(rng, (4, 40, 64)), _fp16(rng, (2, 40, 64)), _fp16(rng, (2, 40, 64))
    whole = at.online_attention(q, k, v, start=0, lanes=16)
    tail = at.online_attention(q[:, 25:], k, v, start=25, lanes=16)
    assert np.array_equal(tail, whole[:, 25:])


def test_bad_shapes_are_refused():
    rng = np.random.default_rng(0)
    q, k = _fp16(rng, (4, 8, 64)), _fp16(rng, (3, 8, 64))
    with pytest.raises(ValueError, match="do not split into 3 KV heads"):
        at.online_attention(q, k, k, start=0, lanes=16)
    k = _fp16(rng, (2, 8, 64))
    with pytest.raises(ValueError, match="the cache holds 8"):
        at.online_attention(q, k, k, start=1, lanes=16)
    with pytest.raises(ValueError, match="outside the cache"):
        at.two_pass_attention(q[:, :1], k, k, position=8, lanes=16)
    with pytest.raises(ValueError, match="one query"):
        at.two_pass_attention(q[:, :2], k, k, position=3, lanes=16)
