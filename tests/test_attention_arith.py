# amaranth: UnusedElaboratable=no
"""The attention units' arithmetic (``hdl/attention/{fp32,exp2,recip,dot}.py``) against the
numerics of ``models/attention.py`` and ``models/fp16.py``, bit for bit.

Fast tier (amaranth.sim, seconds): every block free-running over hand-picked edge cases (zeros
of both signs, subnormals that read as zero, cancellation to zero, results that flush, the
fp32 maximum and its saturating tie, RNE ties, exponent-255 codes) crossed with each other,
plus random codes (uniform, near each other so that they cancel, realistic magnitudes);
``Exp2Neg`` exhaustively over every fixed-point input that does not flush and every tie
between two of them; ``Recip32`` over every table segment (its ends and random mantissas)
and every power of two. Then every block once more inside a stream stage with random
valid/ready stalls, which drives the per-stage enables as an attention unit will.

Cycle-accurate tier (``rtl``): the six blocks side by side in one design, each behind its
own stream stage, built once with Verilator and run through the generic testbench: one
phase per block without stalls (latency and throughput exact) and one with stalls.

Synthesis tier (``synth``): yosys's estimate of each block, the figures of
docs/attention_arith.md.
"""

import math

import numpy as np
import pytest
from amaranth.hdl import Cat, Module
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from trilut.hdl.attention.dot import Fp32DotTree
from trilut.hdl.attention.exp2 import Exp2Neg, exp2_rom
from trilut.hdl.attention.fp32 import Fp16ToFp32Product, Fp32Add, Fp32Mul
from trilut.hdl.attention.recip import NEWTON_CORRECTION_BITS, Recip32
from trilut.hdl.elementwise.lanes import Pipeline
from trilut.models import attention as att
from trilut.models import fp16 as fp

FP32, FP16 = fp.FP32, fp.FP16
MAX32 = FP32.max_code                                   # 0x7F7FFFFF
SIGN32 = 0x8000_0000


def f32(values) -> np.ndarray:
    """float64 values -> fp32 codes, rounded once."""
    return FP32.from_float(np.asarray(values, dtype=np.float64))


# --------------------------------------------------------------------------------------------
# Operands.

#: fp32 codes at the edges of the contract.
FP32_EDGES = np.array([
    0x0000_0000, 0x8000_0000,                           # zeros
    0x0000_0001, 0x007F_FFFF, 0x807F_FFFF,              # subnormals: read as zero
    0x0080_0000, 0x8080_0000, 0x0080_0001, 0x0100_0000,  # smallest normals
    0x3F80_0000, 0xBF80_0000, 0x3F80_0001, 0xBF80_0001, 0x3F7F_FFFF,   # 1 and neighbours
    0x3FFF_FFFF, 0x4000_0000, 0xC000_0000,              # 2
    0x3380_0000, 0x3380_0001, 0x3400_0000, 0x3300_0000,  # 2**-24, 2**-23, 2**-25: RNE ties
    0x4B80_0000, 0xCB7F_FFFF,                            # 2**24, -(2**24 - 1)
    0x7F7F_FFFF, 0xFF7F_FFFF, 0x7F7F_FFFE, 0x7F00_0000, 0x7300_0000, 0x7280_0000,  # near max
    0x1F80_0000, 0x2000_0000, 0xA000_0000,              # 2**-64, 2**-63: products flush
    0x7F80_0000, 0xFF80_0000, 0x7FFF_FFFF,              # exponent 255: a finite binade
    0x4120_0000, 0xC160_0000,                            # 10, -14
], dtype=np.uint32)

#: fp16 codes at the edges of the contract.
FP16_EDGES = np.array([
    0x0000, 0x8000, 0x0001, 0x03FF, 0x83FF, 0x0400, 0x8400, 0x0401, 0x3C00, 0xBC00, 0x3C01,
    0x3BFF, 0x3FFF, 0x4000, 0x7BFF, 0xFBFF, 0x7BFE, 0x7C00, 0xFC00, 0x7FFF, 0xFFFF, 0x1000,
], dtype=np.uint16)


def _crossed(codes) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.meshgrid(codes, codes)
    return a.ravel(), b.ravel()


def _fp32_pairs(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Edge codes crossed, then ``n`` random pairs: uniform codes; codes a few mantissa bits
    (or an exponent step) from each other, either sign, which cancel to zero, to one bit, or
    to a flushed result; realistic magnitudes (the scores' and the softmax's)."""
    ea, eb = _crossed(FP32_EDGES)
    quarter = n // 4
    ua = rng.integers(0, 1 << 32, quarter, dtype=np.uint64).astype(np.uint32)
    ub = rng.integers(0, 1 << 32, quarter, dtype=np.uint64).astype(np.uint32)
    na = rng.integers(0, 1 << 32, 2 * quarter, dtype=np.uint64).astype(np.uint32)
    nb = na ^ rng.integers(0, 1 << 12, 2 * quarter).astype(np.uint32)
    nb ^= (rng.random(2 * quarter) < 0.7).astype(np.uint32) << 31
    nb[:quarter // 2] += rng.integers(-3, 4, quarter // 2).astype(np.uint32) << 23
    ra = f32(rng.standard_normal(n - 3 * quarter) * np.exp2(rng.integers(-20, 20, n - 3 * quarter)))
    rb = f32(rng.standard_normal(n - 3 * quarter) * np.exp2(rng.integers(-20, 20, n - 3 * quarter)))
    a = np.concatenate([ea, ua, na, ra]).astype(np.uint32)
    b = np.concatenate([eb, ub, nb, rb]).astype(np.uint32)
    return a, b


def _fp16_pairs(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Edge codes crossed, every fp16 code once against a random one, and ``n`` realistic
    pairs (q, k and p, v magnitudes)."""
    ea, eb = _crossed(FP16_EDGES)
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    partner = rng.integers(0, 1 << 16, every.size).astype(np.uint16)
    ra = FP16.from_float(rng.standard_normal(n) * 4)
    rb = FP16.from_float(rng.standard_normal(n))
    return (np.concatenate([ea, every, ra]).astype(np.uint16),
            np.concatenate([eb, partner, rb]).astype(np.uint16))


def exp2_inputs(rng) -> np.ndarray:
    """fp32 codes of ``x <= 0``: every fixed-point input ``-X/1024`` up to ``X = 2**14 + 2``
    (past the flush threshold at 14 and the clamp at 16), every tie ``-(X + 1/2)/1024``
    between them and a hair either side of it, 0 and -0, subnormals, the edges of the exponent
    range and random magnitudes over every binade."""
    fixed = np.arange((1 << 14) + 3, dtype=np.float64)
    ties = (np.arange(1 << 14, dtype=np.float64) + 0.5) / 1024
    near = np.concatenate([np.nextafter(ties.astype(np.float32), np.float32(0)),
                           np.nextafter(ties.astype(np.float32), np.float32(np.inf))])
    values = np.concatenate([fixed / 1024, ties, near.astype(np.float64),
                             [14.0, 14.0 + 2.0 ** -11, 14.0 + 2.0 ** -10, 13.0 + 1023 / 1024,
                              15.0, 16.0, 16.0 - 2.0 ** -20, 2.0 ** -11, 2.0 ** -12,
                              2.0 ** -11 * (1 + 2.0 ** -23), 1e30, FP32.max_value],
                             np.exp2(rng.uniform(-130, 8, 4000))])
    codes = f32(-values) | np.uint32(SIGN32)            # -0 for the zeros
    extra = np.array([0x0000_0000, 0x8000_0001, 0x807F_FFFF, 0xFF80_0000, 0xFFFF_FFFF],
                     dtype=np.uint32)
    return np.concatenate([codes, extra]).astype(np.uint32)


def recip_inputs(rng) -> np.ndarray:
    """fp32 codes of ``v > 0``: every table segment's first and last mantissa, its middle and
    16 random mantissas in it, at random exponents; every power of two; the neighbours of 1
    and 2; the softmax's range (1 .. a few thousand)."""
    segments = np.arange(1 << att.RECIP_INDEX_BITS, dtype=np.int64) << 16
    mant = np.concatenate([segments, segments + 0xFFFF, segments + 0x8000,
                           (segments[:, None] + rng.integers(0, 1 << 16, (128, 16))).ravel()])
    exps = rng.integers(1, 255, mant.size)
    powers = np.arange(1, 255, dtype=np.int64) << 23
    near = np.array([0x3F80_0000, 0x3F80_0001, 0x3F7F_FFFF, 0x4000_0000, 0x3FFF_FFFF,
                     0x3FFF_FFFE, 0x4000_0001, 0x0080_0000, 0x7F7F_FFFF, 0x7E80_0000,
                     0x7E7F_FFFF, 0x7E00_0000, 0x7DFF_FFFF], dtype=np.int64)
    softmax = f32(rng.uniform(1, 4096, 2000)).astype(np.int64)
    return np.concatenate([(exps << 23) | mant, powers, near, softmax]).astype(np.uint32)


# --------------------------------------------------------------------------------------------
# Simulation: free-running, and inside a stream stage with stalls.

def _set(ctx, port, value):
    ctx.set(port, [int(v) for v in value] if np.ndim(value) else int(value))


def simulate(dut, inputs: dict) -> np.ndarray:
    """One operand set a cycle, every enable high; ``y`` of each, ``latency`` edges later."""
    n = len(next(iter(inputs.values())))
    latency = dut.latency
    got = []

    async def testbench(ctx):
        for i in range(n + latency - 1):
            if i < n:
                for name, values in inputs.items():
                    _set(ctx, getattr(dut, name), values[i])
            await ctx.tick()
            if i >= latency - 1:
                got.append(ctx.get(dut.y))

    sim = Simulator(dut)
    sim.add_clock(4e-9)
    sim.add_testbench(testbench)
    sim.run()
    return np.array(got, dtype=np.int64)


def _operand_members(block) -> dict:
    return {name: member for name, member in block.signature.members.items()
            if member.flow == In and name != "en"}


class StreamStage(wiring.Component):
    """``block`` as one stream stage, the way an attention unit drives it: ``operands`` in
    (every input port of the block, a ``StructLayout`` in port order), ``result`` out (its
    ``y``); ``lanes.Pipeline`` of ``block.latency`` stages drives ``en`` (``Cat(*take)``)."""

    def __init__(self, block):
        self.block = block
        self.operands_signature = stream.Signature(data.StructLayout(
            {name: member.shape for name, member in _operand_members(block).items()}))
        self.result_signature = stream.Signature(block.y.shape())
        super().__init__({"operands": In(self.operands_signature),
                          "result": Out(self.result_signature)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.block = block = self.block
        pipe = Pipeline(m, block.latency, in_valid=self.operands.valid,
                        out_ready=self.result.ready, name="stage")
        m.d.comb += [self.operands.ready.eq(pipe.in_ready), block.en.eq(Cat(*pipe.take)),
                     self.result.valid.eq(pipe.out_valid), self.result.payload.eq(block.y)]
        for name in _operand_members(block):
            m.d.comb += getattr(block, name).eq(getattr(self.operands.payload, name))
        return m


def pack_operands(block, inputs: dict) -> list[int]:
    """The ``operands`` beats of ``StreamStage(block)``: each port's codes (lanes packed
    lane 0 lowest) at its field's offset."""
    members = _operand_members(block)
    n = len(next(iter(inputs.values())))
    beats = [0] * n
    offset = 0
    for name, member in members.items():
        width = data.Layout.cast(member.shape).size if isinstance(member.shape, data.Layout) \
            else member.shape.width
        values = np.asarray(inputs[name]).astype(np.int64)
        lane_width = width // (values.shape[1] if values.ndim == 2 else 1)
        for i in range(n):
            word = 0
            for j, v in enumerate(np.atleast_1d(values[i])):
                word |= int(v) << (j * lane_width)
            beats[i] |= word << offset
        offset += width
    return beats


def simulate_stalled(block, inputs: dict, *, seed: int, stall: float = 0.4) -> np.ndarray:
    """``inputs`` through ``StreamStage(block)`` with random idle input and backpressure."""
    dut = StreamStage(block)
    beats = pack_operands(block, inputs)
    rng = np.random.default_rng(seed)
    got = []

    async def source(ctx):
        for beat in beats:
            while rng.random() < stall:
                ctx.set(dut.operands.valid, 0)
                await ctx.tick()
            ctx.set(dut.operands.payload.as_value(), beat)
            ctx.set(dut.operands.valid, 1)
            await ctx.tick().until(dut.operands.ready)
        ctx.set(dut.operands.valid, 0)

    async def sink(ctx):
        sink_rng = np.random.default_rng(seed + 1)
        while len(got) < len(beats):
            ready = sink_rng.random() >= stall
            ctx.set(dut.result.ready, ready)
            _, _, valid, payload = await ctx.tick().sample(dut.result.valid, dut.result.payload)
            if ready and valid:
                got.append(payload)

    sim = Simulator(dut)
    sim.add_clock(4e-9)
    sim.add_testbench(source)
    sim.add_testbench(sink)
    sim.run()
    return np.array(got, dtype=np.int64)


def assert_codes_equal(got, expected, inputs: dict, width: int = 8):
    expected = np.asarray(expected).astype(np.int64)
    bad = np.nonzero(got != expected)[0]
    assert not bad.size, [
        " ".join(f"{name}={np.asarray(v)[i]!s}" for name, v in inputs.items())
        + f": {got[i]:#0{width + 2}x} != {expected[i]:#0{width + 2}x}" for i in bad[:5]]


# --------------------------------------------------------------------------------------------
# The models' rules on hand-picked cases (codes), then the blocks against the models.

EDGE_CASES = [
    # (op, a, b, expected) as codes
    ("add", 0x0000_0000, 0x8000_0000, 0x0000_0000),    # (+0) + (-0) = +0
    ("add", 0x8000_0000, 0x8000_0000, 0x8000_0000),    # (-0) + (-0) = -0
    ("add", 0x8000_0001, 0x8000_0000, 0x8000_0000),    # a subnormal reads as -0
    ("add", 0x3F80_0000, 0xBF80_0000, 0x0000_0000),    # x - x = +0
    ("add", 0xBF80_0000, 0x3F80_0000, 0x0000_0000),
    ("add", 0x0080_0001, 0x8080_0000, 0x0000_0000),    # 2**-149: exact, flushed, sign +
    ("add", 0x8080_0001, 0x0080_0000, 0x8000_0000),    # ... sign -
    ("add", 0x0100_0000, 0x8080_0001, 0x0000_0000),    # 2**-126 - 2**-149: exact, flushed
    ("add", 0x3F80_0000, 0x3380_0000, 0x3F80_0000),    # 1 + 2**-24: tie, to even (1)
    ("add", 0x3F80_0001, 0x3380_0000, 0x3F80_0002),    # (1 + 2**-23) + 2**-24: tie, to even
    ("add", 0x3F80_0000, 0x3380_0001, 0x3F80_0001),    # just above the tie
    ("add", 0x3F80_0000, 0xB300_0000, 0x3F80_0000),    # 1 - 2**-25: tie, to even (1)
    ("add", 0x3F80_0000, 0xB380_0000, 0x3F7F_FFFF),    # 1 - 2**-24: exact
    ("add", 0x7F7F_FFFF, 0x7F7F_FFFF, 0x7F7F_FFFF),    # saturates
    ("add", 0xFF7F_FFFF, 0xFF7F_FFFF, 0xFF7F_FFFF),
    ("add", 0x7F7F_FFFF, 0x7300_0000, 0x7F7F_FFFF),    # max + 2**103: tie to 2**128, saturated
    ("add", 0x7F7F_FFFF, 0x7280_0000, 0x7F7F_FFFF),    # max + 2**102: rounds down
    ("add", 0x7F7F_FFFF, 0xFF7F_FFFE, 0x7380_0000),    # max - (max - ulp) = 2**104
    ("add", 0x4B80_0000, 0xBF80_0000, 0x4B7F_FFFF),    # 2**24 - 1: one cancelled bit
    ("mul", 0x0000_0000, 0x8000_0000, 0x8000_0000),    # +0 * -0 = -0
    ("mul", 0x8000_0001, 0x3F80_0000, 0x8000_0000),    # a subnormal reads as -0
    ("mul", 0x2000_0000, 0x2000_0000, 0x0080_0000),    # 2**-63 squared: 2**-126, kept
    ("mul", 0x1F80_0000, 0x2000_0000, 0x0000_0000),    # 2**-64 * 2**-63 = 2**-127: flushed
    ("mul", 0x9F80_0000, 0x2000_0000, 0x8000_0000),    # ... sign kept
    ("mul", 0x3F7F_FFFE, 0x0080_0001, 0x0080_0000),    # 2**-126 (1 - 2**-46): rounds up, kept
    ("mul", 0x7F7F_FFFF, 0x4000_0000, 0x7F7F_FFFF),    # max * 2 saturates
    ("mul", 0xFF7F_FFFF, 0x4000_0000, 0xFF7F_FFFF),
    ("mul", 0x3F80_0001, 0x3F80_0001, 0x3F80_0002),    # (1 + u)**2 = 1 + 2u + u**2 -> 1 + 2u
    ("mul", 0x3FC0_0000, 0x3F80_0001, 0x3FC0_0002),    # 1.5 + 1.5 u: tie, to even
    ("mul", 0x7F80_0000, 0x3F80_0000, 0x7F7F_FFFF),    # exponent 255 reads as 2**128: saturates
]


@pytest.mark.parametrize("op, a, b, expected", EDGE_CASES)
@pytest.mark.fast
def test_fp32_edge_cases_of_the_models(op, a, b, expected):
    block = Fp32Add() if op == "add" else Fp32Mul()
    assert int(block.model(np.uint32(a), np.uint32(b))) == expected


@pytest.mark.fast
def test_fp32_models_match_numpy_float32_in_the_normal_range():
    """numpy's float32 add and multiply are IEEE (RNE); where operands and results are normal
    and finite they are the models' results."""
    rng = np.random.default_rng(1)
    a, b = _fp32_pairs(rng, 40_000)
    fa, fb = a.view(np.float32), b.view(np.float32)
    for block, op in ((Fp32Add(), np.add), (Fp32Mul(), np.multiply)):
        with np.errstate(all="ignore"):            # exponent-255 codes are Inf/NaN here
            ref = op(fa, fb)
            exact = op(fa.astype(np.float64), fb.astype(np.float64))
        normal = (np.all([((c >> 23) & 255 > 0) & ((c >> 23) & 255 < 255) for c in (a, b)],
                         axis=0) & (np.abs(exact) >= 2.0 ** -126) & np.isfinite(ref)
                  & (np.abs(ref) <= FP32.max_value) & (exact != 0))
        assert normal.sum() > 20_000
        np.testing.assert_array_equal(block.model(a, b)[normal], ref.view(np.uint32)[normal])


@pytest.mark.parametrize("unit", [Fp32Add, Fp32Mul])
@pytest.mark.fast
def test_fp32_unit_matches_model(unit):
    a, b = _fp32_pairs(np.random.default_rng(2), 20_000)
    dut = unit()
    got = simulate(dut, {"a": a, "b": b})
    assert_codes_equal(got, dut.model(a, b), {"a": a, "b": b})


@pytest.mark.fast
def test_fp32_edge_cases_on_the_units():
    for unit, op in ((Fp32Add, "add"), (Fp32Mul, "mul")):
        cases = [c for c in EDGE_CASES if c[0] == op]
        a = np.array([c[1] for c in cases], dtype=np.uint32)
        b = np.array([c[2] for c in cases], dtype=np.uint32)
        expected = [c[3] for c in cases]
        np.testing.assert_array_equal(simulate(unit(), {"a": a, "b": b}), expected)
        np.testing.assert_array_equal(simulate(unit(), {"a": b, "b": a}), expected)   # commute


@pytest.mark.fast
def test_fp16_product_matches_model_and_is_exact():
    a, b = _fp16_pairs(np.random.default_rng(3), 5000)
    dut = Fp16ToFp32Product()
    got = simulate(dut, {"a": a, "b": b})
    assert_codes_equal(got, dut.model(a, b), {"a": a, "b": b})
    # Exact: the fp32 value is the float64 product; signs of zeros are the XOR.
    exact = FP16.decode(a) * FP16.decode(b)
    np.testing.assert_array_equal(FP32.decode(got), exact)
    np.testing.assert_array_equal(got >> 31, np.signbit(exact).astype(np.int64))
    assert int(dut.model(np.uint16(0x7FFF), np.uint16(0xFFFF))) == int(f32(-(2047 * 2.0 ** 6) ** 2))


@pytest.mark.fast
def test_exp2_rom_holds_the_table():
    words = exp2_rom()
    assert len(words) == 1024 and max(words) == 1024 and words[0] == 1024
    assert all(0 < w < 1024 for w in words[1:])             # mantissas; bit 10 only at k = 0
    np.testing.assert_array_equal(np.array(words) + 1024, att.exp2_table())


@pytest.mark.fast
def test_exp2_matches_model_exhaustively():
    x = exp2_inputs(np.random.default_rng(4))
    dut = Exp2Neg()
    got = simulate(dut, {"x": x})
    assert_codes_equal(got, dut.model(x), {"x": x}, width=4)
    assert x.size > 60_000


@pytest.mark.fast
def test_exp2_edges():
    dut = Exp2Neg()
    x = f32([0.0, -0.0, -1.0, -0.5, -14.0, -14.0 - 2.0 ** -11, -14.0 - 2.0 ** -10, -13.0,
             -13.0 - 2.0 ** -10, -13.0 - 2.0 ** -11, -2.0 ** -11, -2.0 ** -11 * (1 + 2.0 ** -23),
             -40.0, -1e30, -FP32.max_value])
    x = np.concatenate([x, np.array([0x8000_0001, 0xFF80_0000], dtype=np.uint32)])
    expected = [0x3C00, 0x3C00, 0x3800, int(FP16.from_float(2 ** -0.5)),
                0x0400,           # 2**-14: the smallest normal, kept
                0x0400,           # 14 + 2**-11 is a tie between X = 14336 and 14337: even
                0x0000,           # X = 14337: T[1] 2**-25 < 2**-14, flushed
                0x0800,           # 2**-13
                0x07FF,           # X = 13313 (n = 13, k = 1): 2047 * 2**-24, still normal
                0x0800,           # tie at 13 + 2**-11: to even, X = 13312
                0x3C00,           # 2**-11 * 1024 = 1/2: tie, to even (X = 0)
                0x3BFF,           # just above: X = 1, T[1] / 2048
                0, 0, 0, 0x3C00, 0]
    np.testing.assert_array_equal(simulate(dut, {"x": x}), expected)
    np.testing.assert_array_equal(dut.model(x[:-2]), expected[:-2])


@pytest.mark.fast
def test_exp2_ignores_the_sign_bit():
    """A positive x never reaches Exp2Neg; if one did, it would give exp2_neg(-x)."""
    x = exp2_inputs(np.random.default_rng(5))[::7]
    dut = Exp2Neg()
    np.testing.assert_array_equal(simulate(dut, {"x": x & np.uint32(0x7FFF_FFFF)}),
                                  dut.model(x).astype(np.int64))
    with pytest.raises(ValueError, match="x <= 0"):
        dut.model(f32(1.0))


@pytest.mark.fast
def test_recip_newton_correction_fits_its_width_for_every_mantissa():
    """``E = 2**18 - T`` over all 2**23 mantissas: the 12-bit signed correction of Recip32,
    and ``Y1`` in [2**16, 2**18) (the one-place normalisation)."""
    f = np.arange(1 << 23, dtype=np.int64)
    m_fixed = (1 << 23) + f
    y0 = att.recip_table()[f >> 16]
    t = (m_fixed * y0) >> 23
    e = (1 << 18) - t
    assert np.abs(e).max() < 1 << (NEWTON_CORRECTION_BITS - 1)
    y1 = (y0 * ((2 << 18) - t)) >> 18
    assert y1.min() >= 1 << 16 and y1.max() < 1 << 18
    np.testing.assert_array_equal(y1, y0 + ((y0 * e) >> 18))     # the split form


@pytest.mark.fast
def test_recip_matches_model_over_every_segment():
    v = recip_inputs(np.random.default_rng(6))
    dut = Recip32()
    got = simulate(dut, {"v": v})
    assert_codes_equal(got, dut.model(v), {"v": v})
    assert v.size > 4000


@pytest.mark.fast
def test_recip_edges():
    dut = Recip32()
    v = np.array([0x3F80_0000, 0x4000_0000, 0x3F00_0000, 0x3FFF_FFFF, 0x7E00_0000, 0x7E80_0000,
                  0x0080_0000, 0xBF80_0000, 0x0000_0000, 0x0000_0001], dtype=np.uint32)
    got = simulate(dut, {"v": v})
    r = FP32.decode(got[:7])
    exact = 1 / FP32.decode(v[:7])
    # Powers of two: Y1 = 262140 for m = 1, so 1/2**e is 2**-e (1 - 2**-16); near 2 ~ 1/2.
    np.testing.assert_allclose(r[[0, 1, 2, 6]], exact[[0, 1, 2, 6]], rtol=2 ** -15.9)
    assert abs(r[3] * FP32.decode(v[3]) - 1) < 2 ** -15
    # 1/2**125 = 262140 * 2**-143: still normal; 1/2**126 = 262140 * 2**-144 < 2**-126: flushed.
    assert got[4] == int(f32(262140 * 2.0 ** -143)) and got[4] != 0
    assert got[5] == 0
    np.testing.assert_array_equal(got[:7], dut.model(v[:7]))
    assert got[7] == got[0]                                         # the sign bit is not read
    assert got[8] == MAX32 and got[9] == MAX32                      # 0 / subnormal: the max
    with pytest.raises(ValueError, match="positive"):
        dut.model(v[8:9])


@pytest.mark.parametrize("lanes", [1, 2, 4, 8])
@pytest.mark.fast
def test_dot_tree_matches_fp32_dot_on_one_beat(lanes):
    rng = np.random.default_rng(7 + lanes)
    n = 3000
    a = FP16.from_float(rng.standard_normal((n, lanes)) * np.exp2(rng.integers(-8, 8, (n, 1))))
    b = FP16.from_float(rng.standard_normal((n, lanes)))
    # Edges: zeros of both signs, cancelling pairs, exponent-31 and subnormal codes.
    e = rng.choice(FP16_EDGES, (400, lanes))
    cancel = a[:400].copy()
    if lanes > 1:
        cancel[:, 1::2] = cancel[:, 0::2] ^ 0x8000
    a = np.concatenate([a, e, cancel]).astype(np.uint16)
    b = np.concatenate([b, rng.choice(FP16_EDGES, (400, lanes)),
                        np.repeat(b[:400, :1], lanes, axis=1)]).astype(np.uint16)
    dut = Fp32DotTree(lanes=lanes)
    assert dut.latency == 2 + 5 * int(math.log2(lanes))
    got = simulate(dut, {"a": a, "b": b})
    assert_codes_equal(got, dut.model(a, b), {})
    if lanes > 1:
        assert np.count_nonzero(got[-400:] == 0) > 300        # the cancelling rows: +0


@pytest.mark.fast
def test_dot_tree_beats_accumulated_in_order_are_fp32_dot():
    """The attention unit's use: ``acc = round32(acc + y)`` over a row's beats is ``fp32_dot``
    (the tree's model composes with ``Fp32Add``'s into the scores' numerics)."""
    rng = np.random.default_rng(9)
    lanes, d = 4, 24
    q = FP16.from_float(rng.standard_normal((50, d)))
    k = FP16.from_float(rng.standard_normal((50, d)))
    tree, add = Fp32DotTree(lanes=lanes), Fp32Add()
    beats = tree.model(q.reshape(50, -1, lanes), k.reshape(50, -1, lanes))   # [50, d/lanes]
    acc = beats[:, 0]
    for j in range(1, beats.shape[1]):
        acc = add.model(acc, beats[:, j])
    np.testing.assert_array_equal(
        acc, FP32.encode(att.fp32_dot(FP16.decode(q), FP16.decode(k), lanes)))


@pytest.mark.parametrize("lanes", [0, 3, 6, 512, True, 2.0])
@pytest.mark.fast
def test_dot_tree_refuses_bad_lanes(lanes):
    with pytest.raises(ValueError, match=f"lanes must be a power of two .* not {lanes!r}"):
        Fp32DotTree(lanes=lanes)


def _stall_cases():
    rng = np.random.default_rng(10)
    a32, b32 = _fp32_pairs(rng, 600)
    a16, b16 = _fp16_pairs(rng, 0)
    pick = rng.choice(a16.size, 1200, replace=False)
    q = FP16.from_float(rng.standard_normal((600, 4)))
    k = FP16.from_float(rng.standard_normal((600, 4)))
    x = exp2_inputs(rng)[rng.choice(40_000, 1200, replace=False)]
    v = recip_inputs(rng)[:1200]
    return [
        ("fp32_add", Fp32Add, {"a": a32[-1200:], "b": b32[-1200:]}),
        ("fp32_mul", Fp32Mul, {"a": a32[-1200:], "b": b32[-1200:]}),
        ("fp16_product", Fp16ToFp32Product, {"a": a16[pick], "b": b16[pick]}),
        ("exp2_neg", Exp2Neg, {"x": x}),
        ("recip32", Recip32, {"v": v}),
        ("dot_tree4", lambda: Fp32DotTree(lanes=4), {"a": q, "b": k}),
    ]


@pytest.mark.parametrize("name, make, inputs", _stall_cases(),
                         ids=[case[0] for case in _stall_cases()])
@pytest.mark.fast
def test_units_under_stalls_drive_their_enables_per_stage(name, make, inputs):
    block = make()
    got = simulate_stalled(block, inputs, seed=len(name))
    assert_codes_equal(got, block.model(*inputs.values()), {})


# --------------------------------------------------------------------------------------------
# Cycle-accurate: the six blocks side by side, one Verilator build, the generic testbench.

class ArithBench(wiring.Component):
    """Each block of ``blocks`` (name -> block) in its ``StreamStage``, on streams
    ``<name>_operands`` and ``<name>_result``."""

    def __init__(self, blocks: dict):
        self.stages = {name: StreamStage(block) for name, block in blocks.items()}
        members = {}
        for name, stage in self.stages.items():
            members[f"{name}_operands"] = In(stage.operands_signature)
            members[f"{name}_result"] = Out(stage.result_signature)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        for name, stage in self.stages.items():
            m.submodules[name] = stage
            wiring.connect(m, wiring.flipped(getattr(self, f"{name}_operands")), stage.operands)
            wiring.connect(m, stage.result, wiring.flipped(getattr(self, f"{name}_result")))
        return m


def _rtl_cases():
    """name -> (block, inputs): the fast tier's operand sets, larger."""
    rng = np.random.default_rng(20)
    a32, b32 = _fp32_pairs(rng, 30_000)
    a16, b16 = _fp16_pairs(rng, 10_000)
    lanes = 4
    scale = np.exp2(rng.integers(-8, 8, (8000, 1)))
    q = FP16.from_float(rng.standard_normal((8000, lanes)) * scale)
    k = np.concatenate([FP16.from_float(rng.standard_normal((7000, lanes))),
                        rng.choice(FP16_EDGES, (1000, lanes))]).astype(np.uint16)
    return {
        "fp32_add": (Fp32Add(), {"a": a32, "b": b32}),
        "fp32_mul": (Fp32Mul(), {"a": a32, "b": b32}),
        "fp16_product": (Fp16ToFp32Product(), {"a": a16, "b": b16}),
        "exp2_neg": (Exp2Neg(), {"x": exp2_inputs(rng)}),
        "recip32": (Recip32(), {"v": recip_inputs(rng)}),
        "dot_tree4": (Fp32DotTree(lanes=lanes), {"a": q, "b": k}),
    }


@pytest.mark.rtl
def test_blocks_bit_exact_on_verilator_with_and_without_stalls(tmp_path):
    from trilut.sim.transport import run_stream_on
    from trilut.transport import StreamPhase, StreamRun

    cases = _rtl_cases()
    phases = []
    for seed, (name, (block, inputs)) in enumerate(cases.items()):
        beats = pack_operands(block, inputs)
        expected = [int(c) for c in block.model(*inputs.values())]
        # Without stalls: one beat a cycle, each out ``latency`` edges after it went in.
        phases.append(StreamPhase(name=f"{name}-no-stall", inputs={f"{name}_operands": beats},
                                  expected={f"{name}_result": expected},
                                  expected_cycles=len(beats) + block.latency))
        few = slice(0, 3000)
        phases.append(StreamPhase(name=f"{name}-stalls", inputs={f"{name}_operands": beats[few]},
                                  expected={f"{name}_result": expected[few]}, stall=0.3,
                                  seed=seed))
    bench = ArithBench({name: block for name, (block, _) in cases.items()})
    results = run_stream_on(bench, StreamRun(phases=phases), name="attention_arith",
                            run_dir=tmp_path)
    for result in results[::2]:
        name = result.name.removesuffix("-no-stall")
        latency = cases[name][0].latency
        # The first beat in at cycle 0 leaves at ``latency``; then one a cycle.
        out = result.handshakes[f"{name}_result"]
        assert out[:3] == [latency, latency + 1, latency + 2], result.name
    assert sum(len(p.inputs[next(iter(p.inputs))]) for p in phases) > 200_000


# --------------------------------------------------------------------------------------------
# Resources (yosys synth_xilinx, cached): the figures of docs/attention_arith.md.

#: name -> (block factory, DSP48E2s, BRAM36s, at most this many LUTs and flip-flops).
RESOURCE_BOUNDS = {
    "fp32_add": (Fp32Add, 0, 0, 550, 230),
    "fp32_mul": (Fp32Mul, 2, 0, 150, 200),
    "fp16_product": (Fp16ToFp32Product, 1, 0, 50, 70),
    "exp2_neg": (Exp2Neg, 0, 0.5, 100, 45),
    "recip32": (Recip32, 2, 0, 150, 290),
    "dot_tree4": (lambda: Fp32DotTree(lanes=4), 4, 0, 1750, 920),
}


@pytest.mark.synth
@pytest.mark.parametrize("name", list(RESOURCE_BOUNDS))
def test_resources(name):
    from trilut.hdl.resources import estimate

    make, dsp, bram, luts, ffs = RESOURCE_BOUNDS[name]
    report = estimate(make(), name=name)
    total = report.total
    print(name, total)
    assert (total["dsp"], total["bram36"], total["uram"]) == (dsp, bram, 0)
    assert total["lut"] <= luts and total["ff"] <= ffs


# --------------------------------------------------------------------------------------------
# Fp32Mul with an fp16 result (the decode unit's ``round16(o * (1/l))``), fast tier.

#: (a, b, fp16 code of the product rounded once): ties, double-rounding traps, flush, saturation.
FP16_OUTPUT_CASES = [
    (0x3F80_0800, 0x3F80_0800, 0x3C01),   # (1 + 2**-12)**2 = 1 + 2**-11 + 2**-24: above the tie
    (0x3F80_1000, 0x3F80_0000, 0x3C00),   # 1 + 2**-11 exactly: the tie, to even (1)
    (0x3F80_3000, 0x3F80_0000, 0x3C02),   # 1 + 3 * 2**-11: the tie, to even (1 + 2**-9)
    (0x3F80_1000, 0x3F80_0001, 0x3C01),   # just above the tie
    (0x3880_0000, 0x3F80_0000, 0x0400),   # 2**-14, the smallest normal
    (0x387F_F000, 0x3F80_0000, 0x0400),   # 2**-14 (1 - 2**-12): rounds up to it, kept
    (0x387F_E000, 0x3F80_0000, 0x0000),   # 2**-14 (1 - 2**-11): exactly representable below
    (0xB87F_E000, 0x3F80_0000, 0x8000),   # ... flushed to a zero of its sign
    (0x477F_E000, 0x3F80_0000, 0x7BFF),   # 65504
    (0x477F_EFFF, 0x3F80_0000, 0x7BFF),   # just below the saturating tie 65520
    (0x477F_F000, 0x3F80_0000, 0x7BFF),   # 65520: rounds to 65536, saturated
    (0xC780_0000, 0x4000_0000, 0xFBFF),   # -131072: saturated
    (0x0000_0000, 0xBF80_0000, 0x8000),   # +0 * -1 = -0
    (0x0000_0001, 0x3F80_0000, 0x0000),   # a subnormal reads as zero
    (0x7F7F_FFFF, 0x0080_0000, 0x4400),   # max * 2**-126 = 4 (1 - 2**-24): rounds to 4
]


@pytest.mark.fast
def test_fp32_mul_fp16_output_model_rounds_once():
    block = Fp32Mul(output=FP16)
    for a, b, want in FP16_OUTPUT_CASES:
        assert int(block.model(np.uint32(a), np.uint32(b))) == want, (hex(a), hex(b))
    # Rounding to fp32 first would give the tie, then 1: not the one rounding.
    twice = FP16.from_float(FP32.round(FP32.decode(np.uint32(0x3F80_0800)) ** 2))
    assert int(twice) == 0x3C00
    assert Fp32Mul().y.shape().width == 32 and block.y.shape().width == 16


@pytest.mark.fast
def test_fp32_mul_fp16_output_unit_matches_model():
    rng = np.random.default_rng(7)
    a, b = _fp32_pairs(rng, 12_000)
    # The softmax's operands: o (sums of p v) times 1/l, and products near fp16's edges.
    o = f32(rng.standard_normal(4000) * np.exp2(rng.integers(-30, 20, 4000)))
    r = f32(np.exp2(-rng.uniform(0, 12, 4000)))
    cases = np.array(FP16_OUTPUT_CASES, dtype=np.uint32)
    a = np.concatenate([a, o, cases[:, 0], cases[:, 1]]).astype(np.uint32)
    b = np.concatenate([b, r, cases[:, 1], cases[:, 0]]).astype(np.uint32)
    dut = Fp32Mul(output=FP16)
    got = simulate(dut, {"a": a, "b": b})
    assert_codes_equal(got, dut.model(a, b), {"a": a, "b": b}, width=4)
    stalled = simulate_stalled(Fp32Mul(output=FP16), {"a": a[:1200], "b": b[:1200]}, seed=3)
    assert_codes_equal(stalled, dut.model(a[:1200], b[:1200]), {}, width=4)


@pytest.mark.parametrize("output", [fp.FloatFormat("fp8", exponent_bits=4, precision=4), 16])
@pytest.mark.fast
def test_fp32_mul_refuses_other_output_formats(output):
    with pytest.raises(ValueError, match="output must be models.fp16.FP32 or FP16"):
        Fp32Mul(output=output)
