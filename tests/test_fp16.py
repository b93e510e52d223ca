"""The element-wise fp16 format: numpy models against independent references, the Amaranth
units against the models (amaranth.sim and one Verilator run), and the fused ops' bounds.

The independent reference rounds by search, not by arithmetic: every exact result is placed
among a sorted list of all numbers with an 11-bit significand (any exponent), the nearer
neighbour wins and a tie goes to the even significand; then the flush and saturation rules
apply. numpy's float16 (IEEE, correctly rounded: float32 arithmetic then one rounding is
innocuous for 24 >= 2*11 + 2) checks the normal range once more.

Tiers: every test is ``fast`` except the one Verilator run (``rtl``); the file holds both,
so each test carries its mark rather than a module-wide ``pytestmark``.
"""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from amaranth.hdl import Module, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from trilut.hdl.elementwise.fp16 import Fp16Add, Fp16Mul, IntToFp16
from trilut.models import fp16 as fp
from trilut.models import numerics as nm

MAX16 = 65504.0
MIN16 = 2.0 ** -14


# --------------------------------------------------------------------------------------------
# An independent fp16 rounding: nearest by search.

def _candidates():
    """Every 11-bit-significand number from 2**-40 to 2**20 and zero, sorted, with the
    parity of its significand."""
    sig = np.arange(1024, 2048, dtype=np.float64)
    values = [0.0]
    parity = [0]
    for e in range(-50, 11):
        values.extend(np.ldexp(sig, e))
        parity.extend((sig.astype(np.int64) & 1).tolist())
    return np.array(values), np.array(parity)


_CAND, _PARITY = _candidates()


def reference_round16(exact: np.ndarray) -> np.ndarray:
    """float64 (exact results) -> fp16 values: nearest by search, ties to even, then flush
    below 2**-14 (sign kept) and saturate above 65504."""
    exact = np.asarray(exact, dtype=np.float64)
    mag = np.abs(exact)
    hi = np.clip(np.searchsorted(_CAND, mag, side="left"), 1, len(_CAND) - 1)
    lo = hi - 1
    exact_hit = _CAND[hi] == mag
    d_lo, d_hi = mag - _CAND[lo], _CAND[hi] - mag
    pick_hi = exact_hit | (d_hi < d_lo) | ((d_hi == d_lo) & (_PARITY[hi] == 0))
    r = np.where(pick_hi, _CAND[hi], _CAND[lo])
    r = np.where(r < MIN16, 0.0, np.where(r > MAX16, MAX16, r))
    return np.copysign(r, exact)


def reference_decode16(codes) -> np.ndarray:
    """fp16 codes -> values via numpy's float16, then the FTZ / exponent-31 rules."""
    c = np.asarray(codes, dtype=np.uint16)
    exp = (c >> 10) & 31
    mant = (c & 1023).astype(np.float64)
    normal = np.abs(c.view(np.float16).astype(np.float64))
    mag = np.where(exp == 0, 0.0, np.where(exp == 31, (1 + mant / 1024) * 2.0 ** 16, normal))
    return np.where(c >> 15, -mag, mag)


def _all_codes():
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def _pairs(rng, per_code=48):
    """Every code against ``per_code`` random partners (uniform codes, and close ones that
    cancel or tie)."""
    a = np.repeat(_all_codes(), per_code)
    uniform = rng.integers(0, 1 << 16, a.size)
    near = a ^ rng.integers(0, 1 << 12, a.size)          # same sign/close exponent, or negated
    near = np.where(rng.random(a.size) < 0.5, near, near ^ 0x8000)
    b = np.where(rng.random(a.size) < 0.5, uniform, near).astype(np.uint16)
    return a, b


# --------------------------------------------------------------------------------------------
# Models against the references.

@pytest.mark.fast
def test_decode_and_from_float_round_trip_every_code():
    codes = _all_codes()
    values = fp.fp16_to_float(codes)
    np.testing.assert_array_equal(values, reference_decode16(codes))
    finite = ((codes >> 10) & 31) != 31
    normal = finite & (((codes >> 10) & 31) != 0)
    np.testing.assert_array_equal(fp.fp16_from_float(values[normal]), codes[normal])
    # Subnormal codes read as zeros of their sign, exponent 31 saturates.
    sub = ((codes >> 10) & 31) == 0
    np.testing.assert_array_equal(fp.fp16_from_float(values[sub]), codes[sub] & 0x8000)
    np.testing.assert_array_equal(fp.fp16_from_float(values[~finite]),
                                  (codes[~finite] & 0x8000) | 0x7BFF)


@pytest.mark.fast
def test_from_float_matches_the_search_reference():
    rng = np.random.default_rng(1)
    x = np.concatenate([
        rng.standard_normal(200_000) * np.exp2(rng.uniform(-30, 20, 200_000)),
        # Midpoints of neighbouring fp16 numbers, and a hair either side of them.
        (lambda v: np.concatenate([v, np.nextafter(v, 0), np.nextafter(v, np.inf)]))(
            (_CAND[1:-1] + _CAND[2:]) / 2),
    ])
    np.testing.assert_array_equal(fp.fp16_to_float(fp.fp16_from_float(x)),
                                  reference_round16(x))


@pytest.mark.parametrize("op, exact, numpy_op", [
    (fp.fp16_add, np.add, np.add), (fp.fp16_mul, np.multiply, np.multiply)])
@pytest.mark.fast
def test_add_mul_every_code_against_the_references(op, exact, numpy_op):
    a, b = _pairs(np.random.default_rng(2))
    got = op(a, b)
    # float64 is exact for one fp16 add or multiply (see models/fp16.py), so the search
    # reference sees the exact result.
    expected = reference_round16(exact(reference_decode16(a), reference_decode16(b)))
    np.testing.assert_array_equal(fp.fp16_to_float(got), expected)
    # Signs of zeros: IEEE's for exact zeros, the exact result's for flushed ones.
    zero = expected == 0
    np.testing.assert_array_equal(got[zero] >> 15, np.signbit(expected[zero]).astype(np.uint16))
    # numpy float16 where the result and operands are normal.
    ea, eb = (a >> 10) & 31, (b >> 10) & 31
    with np.errstate(all="ignore"):
        ref16 = numpy_op(a.view(np.float16), b.view(np.float16))
        ex = exact(a.view(np.float16).astype(np.float64), b.view(np.float16).astype(np.float64))
    normal = ((ea > 0) & (ea < 31) & (eb > 0) & (eb < 31) & (np.abs(ex) >= MIN16)
              & (np.abs(ex) < 65520) & (ex != 0))
    assert normal.sum() > 1_000_000
    np.testing.assert_array_equal(got[normal], ref16.view(np.uint16)[normal])


@pytest.mark.fast
def test_int_to_fp16_against_the_reference():
    rng = np.random.default_rng(3)
    n = np.concatenate([np.arange(-70_000, 70_001), rng.integers(-(1 << 21), 1 << 21, 100_000),
                        [-(1 << 21), (1 << 21) - 1, 65519, 65520, -65520, 2049, 2051, 4097]])
    np.testing.assert_array_equal(fp.fp16_to_float(fp.int_to_fp16(n)),
                                  reference_round16(n.astype(np.float64)))


EDGE_CASES = [
    # (op, a, b, expected) as codes
    (fp.fp16_mul, 0x7BFF, 0x4000, 0x7BFF),      # 65504 * 2 saturates
    (fp.fp16_mul, 0xFBFF, 0x4000, 0xFBFF),
    (fp.fp16_add, 0x7BFF, 0x7BFF, 0x7BFF),
    (fp.fp16_add, 0x7BFF, 0x4B00, 0x7BFF),      # 65504 + 14 -> 65518 < 65520: rounds down
    (fp.fp16_add, 0x7BFF, 0x4C00, 0x7BFF),      # 65504 + 16 = 65520: tie to 65536, saturated
    (fp.fp16_mul, 0x0400, 0x3800, 0x0000),      # 2**-14 * 0.5 flushes
    (fp.fp16_mul, 0x8400, 0x3800, 0x8000),      # ... keeping the sign
    (fp.fp16_mul, 0x0401, 0x3BFF, 0x0400),      # (1+2**-10)(1-2**-11) 2**-14 rounds up to normal
    (fp.fp16_add, 0x0001, 0x0000, 0x0000),      # subnormal input reads as zero
    (fp.fp16_add, 0x8001, 0x8000, 0x8000),      # (-0) + (-0) = -0
    (fp.fp16_add, 0x3C00, 0xBC00, 0x0000),      # x + (-x) = +0
    (fp.fp16_add, 0x0401, 0x8400, 0x0000),      # 2**-24: exact but tiny, flushed, sign +
    (fp.fp16_add, 0x8401, 0x0400, 0x8000),      # ... sign -
    (fp.fp16_add, 0x3C00, 0x1000, 0x3C00),      # 1 + 2**-11: tie, to even (1)
    (fp.fp16_add, 0x3C01, 0x1000, 0x3C02),      # (1 + 2**-10) + 2**-11: tie, to even
    (fp.fp16_add, 0x3C00, 0x1001, 0x3C01),      # just above the tie
    (fp.fp16_mul, 0x0000, 0x8000, 0x8000),      # +0 * -0 = -0
    (fp.fp16_mul, 0x7C00, 0x3C00, 0x7BFF),      # exponent 31 reads as a finite binade
]


@pytest.mark.parametrize("op, a, b, expected", EDGE_CASES)
@pytest.mark.fast
def test_edge_cases(op, a, b, expected):
    assert int(op(np.uint16(a), np.uint16(b))) == expected


@pytest.mark.fast
def test_from_float_boundaries():
    cases = {
        65519.99: 0x7BFF, 65520.0: 0x7BFF, 1e10: 0x7BFF, -1e10: 0xFBFF,
        MIN16 * (1 - 2.0 ** -12): 0x0400,     # tie between 2**-14 - 2**-25 and 2**-14: even
        MIN16 * (1 - 2.0 ** -11): 0x0000,     # representable below 2**-14: flushed
        -MIN16 * (1 - 2.0 ** -11): 0x8000,
        1 + 2.0 ** -11: 0x3C00, 1 + 3 * 2.0 ** -11: 0x3C02, -0.0: 0x8000,
    }
    for x, code in cases.items():
        assert int(fp.fp16_from_float(x)) == code, x
    with pytest.raises(ValueError, match="NaN or Inf"):
        fp.fp16_from_float(np.inf)


@pytest.mark.fast
def test_fp32_rounding_matches_numpy_float32_in_the_normal_range():
    rng = np.random.default_rng(4)
    x = rng.standard_normal(200_000) * np.exp2(rng.uniform(-120, 120, 200_000))
    x = x[np.abs(x) >= 2.0 ** -126]          # numpy keeps subnormals; below, we flush
    np.testing.assert_array_equal(fp.FP32.round(x), x.astype(np.float32).astype(np.float64))
    assert fp.FP32.round(2.0 ** -127) == 0 and fp.FP32.round(1e39) == fp.FP32.max_value


# --------------------------------------------------------------------------------------------
# The fused ops.

def _generic_sum_of_squares(x, partials=1):
    sums = []
    for j in range(partials):
        acc = np.zeros(x.shape[:-1])
        for i in range(j, x.shape[-1], partials):
            acc = fp.FP32.round(acc + fp.FP32.round(x[..., i] * x[..., i]))
        sums.append(acc)
    while len(sums) > 1:
        sums = [fp.FP32.round(sums[i] + sums[i + 1]) if i + 1 < len(sums) else sums[i]
                for i in range(0, len(sums), 2)]
    return sums[0]


@pytest.mark.parametrize("partials", [1, 3, 16])
@pytest.mark.fast
def test_sum_of_squares_fast_path_is_the_fixed_order_fp32_sum(partials):
    rng = np.random.default_rng(5)
    x = fp.FP16.round(rng.standard_normal((8, 300)) * np.exp2(rng.integers(-10, 12, (8, 1))))
    np.testing.assert_array_equal(fp.FP16_ARITH.sum_of_squares(x, partials),
                                  _generic_sum_of_squares(x, partials))
    big = fp.FloatFormat("e8m10", 8, 11)   # fp16 precision, fp32 range: reaches saturation
    y = big.round(np.full((1, 4), 1e19))
    assert fp.ElementwiseArithmetic(big).sum_of_squares(y)[0] == fp.FP32.max_value


@pytest.mark.fast
def test_rsqrt_accuracy_and_exact_powers_of_four():
    rng = np.random.default_rng(6)
    v = fp.FP32.round(np.exp2(rng.uniform(-60, 60, 100_000)))
    rel = np.abs(fp.rsqrt_fp32(v) * np.sqrt(v) - 1)
    assert rel.max() < 2 ** -16.4
    table = fp.rsqrt_table()
    assert table.min() > 1 << 17 and table.max() < 1 << 18    # 18-bit entries
    r = fp.rsqrt_fp32(np.array([1.0, 4.0, 0.25, 2.0 ** -40]))
    np.testing.assert_allclose(r, [1.0, 0.5, 2.0, 2.0 ** 20], rtol=2 ** -16)


@pytest.mark.fast
def test_quantize_int8_agrees_with_the_golden_quantizer():
    rng = np.random.default_rng(7)
    x = fp.fp16_from_float(rng.standard_normal((64, 256)) * 3)
    codes, absmax = fp.fp16_quantize_int8(x)
    xf = torch.from_numpy(fp.fp16_to_float(x).astype(np.float32))
    golden, scale = nm.int8_quantize(xf)
    diff = codes.astype(int) - golden.numpy().astype(int)
    assert np.abs(diff).max() <= 1 and np.count_nonzero(diff) <= 4
    np.testing.assert_array_equal(fp.fp16_to_float(absmax)[:, 0],
                                  xf.abs().amax(-1).numpy().astype(np.float64))
    assert np.all(np.abs(codes).max(-1) == 127)
    zero_codes, zero_absmax = fp.fp16_quantize_int8(np.zeros((1, 8), np.uint16))
    assert not zero_codes.any() and int(zero_absmax[0, 0]) == 0


def _round_fraction(exact: Fraction, precision: int) -> Fraction:
    """Round a positive rational to ``precision`` significant bits, half to even, exactly."""
    e = exact.numerator.bit_length() - exact.denominator.bit_length()
    while exact >= Fraction(2) ** (e + 1):
        e += 1
    while exact < Fraction(2) ** e:
        e -= 1
    q = exact / Fraction(2) ** (e - precision + 1)          # in [2**(p-1), 2**p)
    n = q.numerator // q.denominator
    rest = q - n
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and n % 2):
        n += 1
    return n * Fraction(2) ** (e - precision + 1)


@pytest.mark.fast
def test_dequant_scale_is_correctly_rounded():
    rng = np.random.default_rng(8)
    absmax = fp.fp16_from_float(np.exp2(rng.uniform(-8, 12, 2000)))
    w = fp.FP32.round(np.exp2(rng.uniform(-12, 4, 2000)))
    got = fp.fp32_to_float(fp.fp16_dequant_scale(absmax, w))
    for a, ws, g in zip(fp.fp16_to_float(absmax), w, got):
        assert Fraction(g) == _round_fraction(Fraction(a) * Fraction(ws) / 127, 24)


@pytest.mark.fast
def test_dequantize_rounds_the_exact_product_once():
    acc = np.array([0, 1, -1, 2 ** 21 - 1, -(2 ** 21), 12345, -777])
    scale = fp.fp32_from_float(np.array([1.2345e-3]))
    got = fp.fp16_to_float(fp.fp16_dequantize(acc, scale))
    exact = acc * fp.fp32_to_float(scale)
    np.testing.assert_array_equal(got, reference_round16(exact))


@pytest.mark.fast
def test_rmsnorm_close_to_the_golden_float32_norm():
    from trilut.models.bitnet import RMSNorm

    rng = np.random.default_rng(9)
    x = fp.fp16_from_float(rng.standard_normal((16, 640)) * np.exp2(rng.integers(-6, 8, (16, 1))))
    w = fp.fp16_from_float(1 + 0.02 * rng.standard_normal(640))
    got = fp.fp16_to_float(fp.fp16_rmsnorm(x, w, 1e-5))
    norm = RMSNorm(640, 1e-5)
    norm.weight.copy_(torch.from_numpy(fp.fp16_to_float(w).astype(np.float32)))
    ref = norm(torch.from_numpy(fp.fp16_to_float(x).astype(np.float32))).numpy()
    # Two fp16 roundings (2**-11 each) and the rsqrt (2**-16.6); results below 2**-14 flush.
    np.testing.assert_allclose(got, ref, rtol=2 ** -9.9, atol=MIN16)


@pytest.mark.fast
def test_activations_against_float64():
    x = np.unique(fp.fp16_to_float(_all_codes()))
    x = x[np.abs(x) <= 16]
    codes = fp.fp16_from_float(x)
    relu2 = fp.fp16_to_float(fp.fp16_relu2(codes))
    np.testing.assert_array_equal(relu2, reference_round16(np.maximum(x, 0) ** 2))
    silu = fp.fp16_to_float(fp.fp16_silu(codes))
    ref = x / (1 + np.exp(-x))
    assert np.abs(silu - ref).max() < 0.0065
    big = np.abs(ref) >= 2 ** -6
    ulp = np.ldexp(1.0, np.frexp(np.abs(ref[big]))[1] - 11)
    assert (np.abs(silu - ref)[big] / ulp).max() < 4
    gate = fp.fp16_gate_mul(codes, codes[::-1])
    np.testing.assert_array_equal(gate, fp.fp16_mul(codes, codes[::-1]))
    np.testing.assert_array_equal(fp.fp16_residual_add(codes, codes[::-1]),
                                  fp.fp16_add(codes, codes[::-1]))


@pytest.mark.fast
def test_error_report_stays_within_the_stated_bounds():
    """The bounds docs/elementwise.md states for the tiny checkpoint (level 2 vs level 1)."""
    from trilut.models.fp16_error import error_report, format_report

    report = error_report(formats=("fp16",), tokens=16)
    ops = report["formats"]["fp16"]["ops"]
    assert ops["FFN branch (vs FeedForward)"]["cosine"] > 0.9999
    assert ops["FFN branch (vs FeedForward)"]["rel_rms"] < 0.02
    assert ops["FFN block + residual"]["rel_rms"] < 0.015
    for op in ("store residual", "dequantize", "relu2", "residual_add"):
        assert ops[op]["max_rel"] <= 2 ** -11, op            # one rounding: half an ulp
    assert report["formats"]["fp16"]["range"]["saturated"] == 0
    assert report["rsqrt"]["log2_max_rel"] < -16.4
    assert "FFN branch" in format_report(report)


# --------------------------------------------------------------------------------------------
# Amaranth units under amaranth.sim.

EDGE_CODES = np.array([
    0x0000, 0x8000, 0x0001, 0x03FF, 0x83FF, 0x0400, 0x8400, 0x0401, 0x07FF, 0x3800, 0x3BFF,
    0x3C00, 0xBC00, 0x3C01, 0x3FFF, 0x4000, 0x1000, 0x1001, 0x5BFF, 0x7800, 0x7BFE, 0x7BFF,
    0xFBFF, 0x7C00, 0xFC00, 0x7FFF, 0x0C00, 0x2000,
], dtype=np.uint16)


def _operands(seed, n_random):
    rng = np.random.default_rng(seed)
    ea, eb = np.meshgrid(EDGE_CODES, EDGE_CODES)
    a, b = _pairs(rng, per_code=1)
    pick = rng.choice(a.size, n_random, replace=False)
    return (np.concatenate([ea.ravel(), a[pick]]).astype(np.uint16),
            np.concatenate([eb.ravel(), b[pick]]).astype(np.uint16))


def _simulate_comb(dut, inputs: dict, output: str) -> np.ndarray:
    got = []

    async def testbench(ctx):
        names = list(inputs)
        for values in zip(*inputs.values()):
            for name, value in zip(names, values):
                ctx.set(getattr(dut, name), int(value))
            got.append(ctx.get(getattr(dut, output)))

    sim = Simulator(dut)
    sim.add_testbench(testbench)
    sim.run()
    return np.array(got, dtype=np.int64)


@pytest.mark.parametrize("unit", [Fp16Mul, Fp16Add])
@pytest.mark.fast
def test_unit_matches_model_in_amaranth_sim(unit):
    a, b = _operands(seed=10, n_random=2500)
    dut = unit()
    got = _simulate_comb(dut, {"a": a, "b": b}, "y")
    expected = dut.model(a, b).astype(np.int64)
    bad = np.nonzero(got != expected)[0]
    assert not bad.size, [f"{a[i]:#06x} {b[i]:#06x}: {got[i]:#06x} != {expected[i]:#06x}"
                          for i in bad[:5]]


@pytest.mark.parametrize("width", [8, 22])
@pytest.mark.fast
def test_int_to_fp16_matches_model_in_amaranth_sim(width):
    rng = np.random.default_rng(width)
    lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
    edges = [lo, hi, 0, 1, -1, 2047, 2048, 2049, 2051, -2051, 4097, 65519, 65520, -65520]
    values = np.array([v for v in edges if lo <= v <= hi]
                      + rng.integers(lo, hi + 1, 1200).tolist())
    dut = IntToFp16(width)
    got = _simulate_comb(dut, {"value": values}, "y")
    np.testing.assert_array_equal(got, dut.model(values).astype(np.int64))


# --------------------------------------------------------------------------------------------
# One Verilator run: many lanes per step, many steps.

LANES = 16
ACC_WIDTH = 22


class Fp16Lanes(wiring.Component):
    """``LANES`` copies of each unit side by side behind one register stage, as a stream:
    ``operands`` (``a``, ``b``, ``value``: every lane's operands in one beat) in, ``results``
    (``sum``, ``product``, ``converted``) out, one beat a cycle, latency 1, backpressure from
    the output (what a lane unit's pipeline stage around these units does)."""

    latency = 1

    def __init__(self, lanes: int = LANES, acc_width: int = ACC_WIDTH):
        self.lanes, self.acc_width = lanes, acc_width
        wide = unsigned(16 * lanes)
        super().__init__({
            "operands": In(stream.Signature(data.StructLayout({
                "a": wide, "b": wide, "value": unsigned(acc_width * lanes)}))),
            "results": Out(stream.Signature(data.StructLayout({
                "sum": wide, "product": wide, "converted": wide}))),
        })

    def elaborate(self, platform):
        m = Module()
        x, y = self.operands.payload, self.results.payload
        load = ~self.results.valid | self.results.ready
        m.d.comb += self.operands.ready.eq(load)
        with m.If(load):
            m.d.sync += self.results.valid.eq(self.operands.valid)
        for i in range(self.lanes):
            add, mul, conv = Fp16Add(), Fp16Mul(), IntToFp16(self.acc_width)
            m.submodules[f"add{i}"], m.submodules[f"mul{i}"] = add, mul
            m.submodules[f"conv{i}"] = conv
            lane = slice(16 * i, 16 * i + 16)
            m.d.comb += [
                add.a.eq(x.a[lane]), add.b.eq(x.b[lane]),
                mul.a.eq(x.a[lane]), mul.b.eq(x.b[lane]),
                conv.value.eq(x.value[self.acc_width * i:self.acc_width * (i + 1)]),
            ]
            with m.If(load):
                m.d.sync += [y.sum[lane].eq(add.y), y.product[lane].eq(mul.y),
                             y.converted[lane].eq(conv.y)]
        return m


@pytest.mark.rtl
def test_units_bit_exact_on_verilator(tmp_path):
    """The generic testbench: every step's operands a beat; bit-exact results, one a cycle
    (cycles exactly steps + latency without stalls), and the same under random stalls."""
    from trilut.sim.transport import run_stream_on
    from trilut.transport import StreamPhase, StreamRun

    steps = 8192
    rng = np.random.default_rng(11)
    a, b = _pairs(rng, per_code=4)
    pick = rng.choice(a.size, steps * LANES - EDGE_CODES.size ** 2, replace=False)
    ea, eb = np.meshgrid(EDGE_CODES, EDGE_CODES)
    a = np.concatenate([ea.ravel(), a[pick]]).astype(np.uint16).reshape(steps, LANES)
    b = np.concatenate([eb.ravel(), b[pick]]).astype(np.uint16).reshape(steps, LANES)
    lo = -(1 << (ACC_WIDTH - 1))
    value = rng.integers(lo, -lo, (steps, LANES))
    value[0, :4] = [lo, -lo - 1, 0, 65520]
    # Magnitudes spread over every binade, not just the top few.
    value >>= rng.integers(0, ACC_WIDTH, (steps, LANES))
    value_bits = value & ((1 << ACC_WIDTH) - 1)

    wide = 16 * LANES
    operands = [pa | pb << wide | pv << 2 * wide for pa, pb, pv in zip(
        nm.pack_rows(a, 16), nm.pack_rows(b, 16), nm.pack_rows(value_bits, ACC_WIDTH))]
    results = [s | p << wide | c << 2 * wide for s, p, c in zip(
        nm.pack_rows(fp.fp16_add(a, b), 16), nm.pack_rows(fp.fp16_mul(a, b), 16),
        nm.pack_rows(fp.int_to_fp16(value), 16))]
    dut = Fp16Lanes()
    few = slice(0, 2000)
    run = StreamRun([
        StreamPhase(name="no-stall", inputs={"operands": operands},
                    expected={"results": results}, expected_cycles=steps + dut.latency),
        StreamPhase(name="stalls", inputs={"operands": operands[few]},
                    expected={"results": results[few]}, stall=0.3, seed=5),
    ])
    (free, stalled) = run_stream_on(dut, run, name="fp16_lanes", run_dir=tmp_path)
    assert free.cycles == steps + dut.latency and len(stalled.outputs["results"]) == 2000
    assert math.prod(a.shape) == steps * LANES
