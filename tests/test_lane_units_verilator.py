# amaranth: UnusedElaboratable=no
"""The element-wise lane units (``hdl/elementwise/{dequant,activation,residual}.py``) against
their models, bit for bit.

Cycle-accurate tier: each unit is built once with Verilator (4 lanes, cached by the hash of
its Verilog) and runs all its cases as the phases of one run of the generic testbench
(``sim/stream_testbench.py``): realistic values, every edge of the fp16 contract (zeros of
both signs, subnormals that read as zero, the smallest normal, 65504 and the 65520
saturation tie, exponent-31 codes), every gate code exhaustively for the activations (the
SiLU table's range ends included), accumulators at +-2**(acc_width-1), scales that flush or
saturate, with random valid/ready stalls on every stream; nothing may follow the last beat.
Stall-free cases also check the latency, the throughput and the cycles exactly.

Fast tier (amaranth.sim, a few seconds): a couple of hundred beats per unit with stalls, the
connection to the TLMM engine's ``results``, and parameter checks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import pytest
from amaranth.hdl import Fragment, Module, Value
from amaranth.lib import wiring
from amaranth.sim import Simulator

from trilut.config import EngineConfig
from trilut.hdl.elementwise.activation import GatedActivation
from trilut.hdl.elementwise.dequant import DequantJob, DequantScale, Dequantizer
from trilut.hdl.elementwise.lanes import lane_signature
from trilut.hdl.elementwise.residual import ResidualAdd
from trilut.hdl.linear.tlmm_engine import TlmmEngine
from trilut.models import fp16 as fp
from trilut.sim.transport import run_stream_on
from trilut.transport import PhaseResult, StreamPhase, StreamRun

pytestmark = pytest.mark.rtl

LANES = 4
#: The kv260 engine's accumulators (22 bits at max_k = 8640) with 4 columns a beat.
ENGINE = EngineConfig(columns_per_cycle=LANES)

#: fp16 codes at the edges of the contract and of the SiLU table.
EDGE_CODES = [
    0x0000, 0x8000,                     # zeros
    0x0001, 0x03FF, 0x83FF,             # subnormals: read as zero of their sign
    0x0400, 0x8400, 0x0401,             # smallest normal
    0x1C00, 0x1BFF, 0x9C00,             # 2**-8: relu2's square crosses the flush threshold
    0x2000, 0x1FFF, 0xA000,             # 2**-7
    0x2BFF, 0x2C00, 0x2C01, 0xABFF, 0xAC00, 0xAC01,      # |x| around 2**-4: SiLU table start
    0x2FFF, 0x3000, 0xB000,             # binade boundary inside the table
    0x3800, 0x3BFF, 0x3C00, 0xBC00, 0x3C01,              # 1/2, 1
    0x4BFF, 0x4C00, 0x4C01, 0xCBFF, 0xCC00, 0xCC01,      # |x| around 16: SiLU table end
    0xC900, 0xC980, 0xCA00,             # x around -10 (sigmoid far below 2**-14)
    0x5BFF, 0x5C00,                     # 255.9 / 256: relu2 saturates above
    0x7800, 0x7BFE, 0x7BFF, 0xFBFF,     # near and at 65504
    0x7C00, 0xFC00, 0x7FFF, 0xFFFF,     # exponent 31: a finite binade, never produced
]


def _pack(values, width: int) -> int:
    """Lane values (ints, two's complement for negatives) -> one beat, lane 0 lowest."""
    mask = (1 << width) - 1
    beat = 0
    for i, v in enumerate(values):
        beat |= (int(v) & mask) << (i * width)
    return beat


def _beats(rows: np.ndarray, width: int) -> list[int]:
    return [_pack(r, width) for r in np.asarray(rows).reshape(-1, LANES)]


def _unpack(beats: list[int], width: int = 16) -> np.ndarray:
    mask = (1 << width) - 1
    return np.array([[(b >> (i * width)) & mask for i in range(LANES)] for b in beats],
                    dtype=np.int64).reshape(-1, LANES)


def _fp16(values) -> np.ndarray:
    return fp.fp16_from_float(np.asarray(values, dtype=np.float64))


def _fp32(value: float) -> int:
    return int(fp.fp32_from_float(value))


def _realistic_fp16(rng, n, scale=1.0) -> np.ndarray:
    return _fp16(rng.normal(0.0, scale, n))


def _crossed(codes) -> tuple[np.ndarray, np.ndarray]:
    """Every ordered pair of ``codes``, padded to whole beats."""
    a, b = np.meshgrid(np.array(codes, np.uint16), np.array(codes, np.uint16))
    a, b = a.ravel(), b.ravel()
    pad = (-a.size) % LANES
    return (np.concatenate([a, a[:pad]]), np.concatenate([b, b[:pad]]))


# --------------------------------------------------------------------------------------------
# Cases, each one phase of the generic testbench: held inputs, each input stream's beats, the
# expected output beats, a stall probability and a seed, and the stall-free cycles.


@dataclass(frozen=True)
class LaneCase:
    name: str
    streams: dict[str, list[int]]
    expected: list[int]
    stall: float = 0.0
    seed: int = 0
    ports: dict[str, int] = field(default_factory=dict)
    #: First input beat taken .. last output beat, inclusive, when nothing stalls.
    cycles: int | None = None


def _case(name, streams: dict, expected: list[int], *, stall=0.0, seed=0, ports=None,
          cycles=None) -> LaneCase:
    return LaneCase(name, {s: [int(b) for b in beats] for s, beats in streams.items()},
                    [int(b) for b in expected], stall, seed, ports or {},
                    cycles if stall == 0.0 else None)


def _binary_cases(dut, a_name: str, b_name: str, seed: int, exhaustive_a: bool):
    """Cases for a unit with two lane streams (``GatedActivation``, ``ResidualAdd``)."""
    rng = np.random.default_rng(seed)

    def case(name, a, b, **kw):
        a, b = np.asarray(a, np.uint16), np.asarray(b, np.uint16)
        # One beat a cycle in, each out ``latency`` edges after it.
        return _case(name, {a_name: _beats(a, 16), b_name: _beats(b, 16)},
                     _beats(dut.model(a, b), 16), cycles=a.size // LANES + dut.latency, **kw)

    cases = []
    # Stall-free first: latency and one beat per cycle.
    n = 64 * LANES
    cases.append(case("realistic-no-stall", _realistic_fp16(rng, n), _realistic_fp16(rng, n)))
    ea, eb = _crossed(EDGE_CODES)
    cases.append(case("edges-crossed-stall-0.6", ea, eb, stall=0.6, seed=seed + 1))
    if exhaustive_a:
        codes = rng.permutation(np.arange(1 << 16, dtype=np.uint16))
        # Every gate code times 1.0: the activation itself, bit for bit.
        cases.append(case("every-gate-code-times-one-stall-0.2", codes,
                          np.full(codes.size, 0x3C00, np.uint16), stall=0.2, seed=seed + 2))
        # Every gate code against realistic up values and edge codes.
        partner = _realistic_fp16(rng, codes.size, scale=2.0)
        partner[::7] = rng.choice(np.array(EDGE_CODES, np.uint16), partner[::7].size)
        cases.append(case("every-gate-code-stall-0.3", rng.permutation(codes), partner,
                          stall=0.3, seed=seed + 3))
    else:
        n = 4096 * LANES
        a = rng.integers(0, 1 << 16, n).astype(np.uint16)
        b = rng.integers(0, 1 << 16, n).astype(np.uint16)
        # Close magnitudes (cancellation, rounding ties), of either sign.
        close = rng.random(n) < 0.5
        near = (a[close] & 0x7FFF).astype(np.int64) + rng.integers(-3, 4, close.sum())
        b[close] = near.clip(0, 0x7FFF) | rng.integers(0, 2, close.sum()) << 15
        cases.append(case("random-and-close-stall-0.3", a, b, stall=0.3, seed=seed + 2))
        n = 512 * LANES
        cases.append(case("realistic-stall-0.5", _realistic_fp16(rng, n, 4.0),
                          _realistic_fp16(rng, n, 0.1), stall=0.5, seed=seed + 3))
    return cases


def _dequantizer_cases(dut: Dequantizer):
    rng = np.random.default_rng(7)
    aw = dut.acc_width
    lo, hi = -(1 << (aw - 1)), (1 << (aw - 1)) - 1

    def case(name, acc, absmax, w_code, **kw):
        acc = np.asarray(acc, np.int64)
        absmax = np.asarray(absmax, np.uint16)
        rows, groups = acc.shape[0], acc.shape[1] // LANES
        return _case(name, {"acc": _beats(acc, aw), "absmax": absmax},
                     _beats(dut.model(acc, absmax, w_code), 16),
                     ports={"weight_scale": w_code, "n_groups": groups},
                     cycles=dut.expected_cycles(DequantJob(rows, groups)), **kw)

    def spread_acc(rows, groups):
        """Random accumulators with magnitudes spread over every binade, and the extremes."""
        acc = rng.integers(lo, hi + 1, (rows, groups * LANES)) >> rng.integers(
            0, aw, (rows, groups * LANES))
        flat = acc.reshape(-1)
        extremes = [lo, hi, 0, 1, -1, lo + 1, 2047, 2048, 2049, -2051, 65519, 65520, -65521]
        extremes = extremes[:flat.size]
        flat[rng.choice(flat.size, len(extremes), replace=False)] = extremes
        return acc

    w_real = _fp32(0.016)
    return [
        # The FFN's shape: 24 groups a row, realistic accumulators; no stalls (exact cycles).
        case("realistic-no-stall", rng.normal(0, 3000, (20, 24 * LANES)).astype(np.int64),
             _fp16(rng.uniform(0.5, 8.0, 20)), w_real),
        case("spread-stall-0.3", spread_acc(40, 5), _fp16(rng.uniform(0.01, 100.0, 40)),
             w_real, stall=0.3, seed=21),
        # Rows shorter than the scale path's 17 cycles: one row per 17 cycles (exact cycles).
        case("short-rows-no-stall", spread_acc(10, 3), _fp16(rng.uniform(0.01, 100.0, 10)),
             w_real),
        # One group a row: every row waits for its scale.
        case("short-rows-stall-0.2", spread_acc(60, 1), _fp16(rng.uniform(0.01, 100.0, 60)),
             _fp32(0.05), stall=0.2, seed=22),
        # S = 127 * 1.0 / 127 = 1 exactly: integers round to 11 bits (ties to even) and
        # saturate from 65520 up.
        case("scale-one-ties-saturation-stall-0.6",
             np.array([[2047, 2048, 2049, 2050], [2051, 2053, -2049, -2051],
                       [4097, 4099, 4101, 4103], [65504, 65519, 65520, -65520],
                       [hi, lo, 0, -1], [lo + 1, hi - 1, 1, 3]]).reshape(3, 2 * LANES),
             _fp16([127.0, 127.0, 127.0]), _fp32(1.0), stall=0.6, seed=23),
        # S = 2**-20: results around the smallest normal 2**-14 (63 flushes, 64 does not).
        case("subnormal-boundary-stall-0.4",
             np.array([[63, 64, 65, -63], [-64, 127, 128, 0]]).reshape(1, 2 * LANES),
             _fp16([1.0]), _fp32(127 * 2.0 ** -20), stall=0.4, seed=24),
        # S = 2**-26: 4095 * 2**-26 rounds up to 2**-14 and survives (tininess after rounding).
        case("tininess-after-rounding",
             np.array([[4095, 4094, 4093, -4095], [2047, 2048, 4096, 8191]]).reshape(1, 8),
             _fp16([1.0]), _fp32(127 * 2.0 ** -26)),
        # S saturates to the fp32 maximum; S flushes to zero; S = -0 (a zero absmax and a
        # negative weight scale).
        case("scale-saturates", spread_acc(2, 2), _fp16([65504.0, 1.0]), _fp32(3.0e38),
             stall=0.3, seed=25),
        case("scale-flushes", spread_acc(2, 2), _fp16([2.0 ** -14, 1.0]), _fp32(2.0 ** -120),
             stall=0.3, seed=26),
        case("negative-zero-scale", spread_acc(2, 1), np.array([0x0000, 0x0001], np.uint16),
             _fp32(-0.02)),
    ]


def _scale_cases(dut: DequantScale):
    """The scalar path, bit for bit on its fp32 output, one weight scale per case."""
    rng = np.random.default_rng(9)
    codes = np.arange(1 << 16, dtype=np.int64)

    def rounding_classes(w_code):
        """absmax codes whose ``A * w / 127`` is an exact tie, or a tie broken only by the
        division's remainder (kept bit even: rounds up only if the remainder is seen)."""
        ma = (codes & 0x3FF) | 0x400
        mw = (w_code & 0x7FFFFF) | 0x800000
        q, r = divmod(ma * mw, 127)
        lead = np.where(q >> 28 & 1, 28, np.where(q >> 27 & 1, 27, 26))
        guard = (q >> (lead - 24)) & 1
        below = q & ((1 << (lead - 24)) - 1)
        kept_even = ((q >> (lead - 23)) & 1) == 0
        normal = (codes >> 10 & 31) != 0
        half = normal & (guard == 1) & (below == 0)
        return codes[half & (r == 0)], codes[half & (r != 0) & kept_even]

    def case(name, w_code, extra=(), **kw):
        ties, remainder_only = rounding_classes(w_code)
        absmax = np.concatenate([
            [0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x3C00, 0x57F0, 0x7BFF, 0xFBFF, 0x7C00,
             0xFFFF], extra,
            rng.permutation(ties)[:30], rng.permutation(remainder_only)[:30],
            rng.integers(0, 1 << 16, 120)]).astype(np.uint16)
        # One absmax every ``interval`` cycles, each scale out ``latency + 1`` edges after.
        return _case(name, {"absmax": absmax}, dut.model(absmax, w_code),
                     ports={"weight_scale": w_code},
                     cycles=(absmax.size - 1) * dut.interval + dut.latency + 2, **kw)

    return [
        case("w-0.016-no-stall", _fp32(0.016)),
        case("w-1", _fp32(1.0), stall=0.3, seed=1),
        # w's significand is 127 * 66,443: A * w / 127 = ma * 66,443 exactly, with thousands
        # of exact ties among the absmax codes.
        case("w-tie-rich", 0x3F80_0000 | (127 * 66443 - (1 << 23)), stall=0.3, seed=2),
        # S within half an fp32 ulp below 2**-126 for A = 0x3BFB: rounds up to the smallest
        # normal and is kept (tininess after rounding); its neighbours flush.
        case("w-flush-boundary", 0x03FE9F23, extra=np.arange(0x3BF0, 0x3C08), stall=0.3,
             seed=3),
        case("w-saturation-boundary", _fp32(1.0e37), stall=0.3, seed=4),
        case("w-negative", _fp32(-0.02), stall=0.3, seed=5),
        case("w-zero", 0x0000_0000, stall=0.3, seed=6),
        case("w-negative-zero", 0x8000_0000, stall=0.3, seed=7),
        case("w-subnormal", 0x0001_2345, stall=0.3, seed=8),
        # Exponent 255 reads as a finite binade, which rounds to the fp32 maximum.
        case("w-exponent-255", 0x7F81_2345, stall=0.3, seed=9),
    ]


def _run(dut, name: str, output: str, cases: list[LaneCase], tmp_path,
         lane_width: int | None = 16) -> list[PhaseResult]:
    """All cases as the phases of one run; the testbench checks every output beat bit for
    bit, the silence after the last one and the stall-free cycles."""
    run = StreamRun(phases=[StreamPhase(
        name=c.name, inputs=c.streams, expected={output: c.expected}, scalars=c.ports,
        stall=c.stall, seed=c.seed, expected_cycles=c.cycles) for c in cases])
    seen = run_stream_on(dut, run, name=name, run_dir=tmp_path)
    for case, result in zip(cases, seen, strict=True):
        got = result.outputs[output]
        if lane_width:
            np.testing.assert_array_equal(_unpack(got, lane_width),
                                          _unpack(case.expected, lane_width), err_msg=case.name)
        assert got == case.expected, case.name
        if case.cycles is not None:
            assert result.cycles == case.cycles, case.name
    return seen


@pytest.mark.parametrize("activation", ["relu2", "silu"])
def test_gated_activation_bit_exact_on_verilator(activation, tmp_path):
    dut = GatedActivation(lanes=LANES, activation=activation)
    cases = _binary_cases(dut, "gate", "up", seed=3, exhaustive_a=True)
    seen = _run(dut, f"gated_{activation}", "y", cases, tmp_path)
    _check_latency(seen[0], ["gate", "up"], dut.latency)


def test_residual_add_bit_exact_on_verilator(tmp_path):
    dut = ResidualAdd(lanes=LANES)
    cases = _binary_cases(dut, "residual", "update", seed=5, exhaustive_a=False)
    seen = _run(dut, "residual_add", "y", cases, tmp_path)
    _check_latency(seen[0], ["residual", "update"], dut.latency)


def _check_latency(seen: PhaseResult, inputs: list[str], latency: int) -> None:
    """Stall-free: one beat per cycle in, each out exactly ``latency`` edges later."""
    ins = [np.array(seen.handshakes[name]) for name in inputs]
    out = np.array(seen.handshakes["y"])
    for cycles in ins:
        np.testing.assert_array_equal(cycles, ins[0])
    assert np.all(np.diff(ins[0]) == 1), "inputs not taken one beat per cycle"
    np.testing.assert_array_equal(out - ins[0], latency)
    assert seen.cycles == len(ins[0]) + latency


def test_dequantizer_bit_exact_on_verilator(tmp_path):
    dut = Dequantizer(ENGINE)
    assert dut.acc_width == 22
    cases = _dequantizer_cases(dut)
    seen = _run(dut, "dequantizer", "y", cases, tmp_path)
    # Stall-free, 24 groups a row: the scale of the next row is ready in time, so the rows
    # stream at one beat per cycle and the whole run takes exactly expected_cycles.
    first = seen[0]
    rows, groups = 20, 24
    acc_in, out = np.array(first.handshakes["acc"]), np.array(first.handshakes["y"])
    assert np.all(np.diff(acc_in) == 1)
    np.testing.assert_array_equal(out - acc_in, dut.latency)
    absmax_in = first.handshakes["absmax"]
    assert absmax_in[0] == 0                # the absmax is taken first: cycles count from it
    assert acc_in[0] - absmax_in[0] == dut.scale_latency
    assert first.cycles == out[-1] - absmax_in[0] + 1 == dut.expected_cycles(DequantJob(rows, groups))
    short = next(r for r in seen if r.name == "short-rows-no-stall")
    assert short.cycles == dut.expected_cycles(DequantJob(10, 3))
    # Every stall-free case, short rows and one-row cases too, takes exactly expected_cycles.
    assert sum(c.cycles is not None for c in cases) == 4


def test_dequant_scale_bit_exact_on_verilator(tmp_path):
    dut = DequantScale()
    seen = _run(dut, "dequant_scale", "scale", _scale_cases(dut), tmp_path, lane_width=None)
    # Stall-free: one row every `interval` cycles, each scale out `latency + 1` edges after.
    absmax_in = np.array(seen[0].handshakes["absmax"])
    out = np.array(seen[0].handshakes["scale"])
    assert np.all(np.diff(absmax_in) == dut.interval)
    np.testing.assert_array_equal(out - absmax_in, dut.latency + 1)


# --------------------------------------------------------------------------------------------
# Fast tier: amaranth.sim.


def _simulate(dut, inputs: list, output, n_out: int, *, ports=(), stall=0.3, seed=0):
    """Drive ``inputs`` ([(stream, beats)]) with idle cycles and ``output`` with
    backpressure, both with probability ``stall``; return the output beats."""
    sim = Simulator(dut)
    sim.add_clock(4e-9)
    got = []

    def source(stream, beats, rng):
        async def run(ctx):
            for port, value in ports:
                ctx.set(port, value)
            for beat in beats:
                while rng.random() < stall:
                    await ctx.tick()
                ctx.set(Value.cast(stream.payload), beat)
                ctx.set(stream.valid, 1)
                await ctx.tick().until(stream.ready)
                ctx.set(stream.valid, 0)
        return run

    for i, (stream, beats) in enumerate(inputs):
        sim.add_testbench(source(stream, beats, random.Random(seed + i)))

    async def sink(ctx):
        rng = random.Random(seed + 99)
        payload = Value.cast(output.payload)
        for _ in range(50 * n_out + 500):   # a deadlock fails the test, not hangs it
            if len(got) == n_out:
                break
            ready = rng.random() >= stall
            ctx.set(output.ready, ready)
            *_, valid, beat = await ctx.tick().sample(output.valid, payload)
            if ready and valid:
                got.append(beat)
        assert len(got) == n_out, f"timed out with {len(got)} of {n_out} beats out"
        for _ in range(10):                 # nothing more comes out
            ctx.set(output.ready, 1)
            *_, valid = await ctx.tick().sample(output.valid)
            assert not valid

    sim.add_testbench(sink)
    sim.run()
    return got


@pytest.mark.parametrize("unit", ["relu2", "silu", "residual"])
def test_lane_units_in_amaranth_sim(unit):
    rng = np.random.default_rng(1)
    dut = (ResidualAdd(lanes=LANES) if unit == "residual"
           else GatedActivation(lanes=LANES, activation=unit))
    a_port, b_port = (dut.residual, dut.update) if unit == "residual" else (dut.gate, dut.up)
    n = 200 + (-len(EDGE_CODES)) % LANES
    a = np.concatenate([np.array(EDGE_CODES, np.uint16), _realistic_fp16(rng, n, 4.0)])
    b = rng.permutation(np.concatenate([np.array(EDGE_CODES, np.uint16),
                                        _realistic_fp16(rng, n)]))
    got = _simulate(dut, [(a_port, _beats(a, 16)), (b_port, _beats(b, 16))], dut.y,
                    a.size // LANES)
    np.testing.assert_array_equal(_unpack(got), dut.model(a, b).reshape(-1, LANES))


def test_dequantizer_in_amaranth_sim():
    rng = np.random.default_rng(2)
    dut = Dequantizer(ENGINE)
    aw = dut.acc_width
    rows, groups = 5, 3
    acc = rng.integers(-(1 << (aw - 1)), 1 << (aw - 1), (rows, groups * LANES))
    acc >>= rng.integers(0, aw, acc.shape)
    acc[0, :2] = [-(1 << (aw - 1)), (1 << (aw - 1)) - 1]
    absmax = _fp16(rng.uniform(0.01, 10.0, rows))
    w = _fp32(0.016)
    got = _simulate(dut, [(dut.acc, _beats(acc, aw)), (dut.absmax, [int(x) for x in absmax])],
                    dut.y, rows * groups, ports=[(dut.weight_scale, w), (dut.n_groups, groups)])
    np.testing.assert_array_equal(_unpack(got), dut.model(acc, absmax, w).reshape(-1, LANES))


def test_dequantizer_connects_to_the_engine_results():
    cfg = EngineConfig(group_size=3, tables_per_step=2, columns_per_cycle=LANES,
                       accumulator_depth=4, max_k=252)
    m = Module()
    m.submodules.engine = engine = TlmmEngine(cfg)
    m.submodules.dequantizer = dequantizer = Dequantizer(cfg)
    wiring.connect(m, engine.results, dequantizer.acc)
    Fragment.get(m, None)
    assert dequantizer.y.signature == lane_signature(LANES)


def test_parameters_are_checked():
    with pytest.raises(ValueError, match="'gelu'"):
        GatedActivation(lanes=4, activation="gelu")
    with pytest.raises(ValueError, match="lanes must be an integer from 1 to 256, not 0"):
        ResidualAdd(lanes=0)
    with pytest.raises(TypeError, match="EngineConfig"):
        Dequantizer(4)
