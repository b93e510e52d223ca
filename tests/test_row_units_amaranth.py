"""Fast tier: the row units (RMSNorm, activation quantizer) in Amaranth's own simulator.

Small configurations, a few rows each, random valid/ready stalls on every stream, bit for bit
against ``models.fp16``; plus the fp32 adder and the quantizer's reciprocal ROM against the
models. The cycle-accurate Verilator runs (test_row_units_verilator.py) are the main check.
"""

import random

import numpy as np
import pytest
from amaranth.hdl import Elaboratable, Module
from amaranth.lib import wiring
from amaranth.sim import Simulator

from trilut.config import EngineConfig
from trilut.hdl.elementwise.act_quant import ActQuantizer, ActQuantJob, quant_reciprocal_table
from trilut.hdl.elementwise.fp32_add import Fp32AddNonNegative
from trilut.hdl.elementwise.rmsnorm import RmsNorm, RmsNormJob
from trilut.models.numerics import lane_beats, unpack_lane_beats
from trilut.hdl.linear.tlmm_engine import TlmmEngine
from trilut.models import fp16 as fp
from trilut.models import numerics as nm

from fp16_rows import activation_rows

pytestmark = pytest.mark.fast


def _raw(payload):
    return payload.as_value() if hasattr(payload, "as_value") else payload


def run_streams(dut, sources, sinks, shape_inputs, *, seed, p_valid=1.0, p_ready=1.0,
                max_cycles=20000):
    """Drive ``sources`` (port name -> payload ints) into ``dut`` and collect ``sinks`` (port
    name -> beat count), with random idle cycles (``p_valid``) and backpressure (``p_ready``).
    Returns ``(received, cycles)``: cycles from the first source transfer to the last sink
    transfer, inclusive."""
    queues = {name: list(beats) for name, beats in sources.items()}
    got = {name: [] for name in sinks}
    first = []
    last = []

    async def testbench(ctx):
        for port, value in shape_inputs.items():
            ctx.set(getattr(dut, port), value)
        rng = random.Random(seed)
        offered = {name: False for name in queues}
        for cycle in range(max_cycles):
            if all(len(got[name]) >= count for name, count in sinks.items()):
                break
            for name, queue in queues.items():
                port = getattr(dut, name)
                offered[name] = bool(queue) and (offered[name] or rng.random() < p_valid)
                ctx.set(port.valid, offered[name])
                if queue:
                    ctx.set(_raw(port.payload), queue[0])
            ready = {name: rng.random() < p_ready for name in sinks}
            for name in sinks:
                ctx.set(getattr(dut, name).ready, ready[name])
            watched = []
            for name in queues:
                watched.append(getattr(dut, name).ready)
            for name in sinks:
                port = getattr(dut, name)
                watched += [port.valid, _raw(port.payload)]
            values = await ctx.tick().sample(*watched)
            values = values[len(values) - len(watched):]
            for i, name in enumerate(queues):
                if offered[name] and values[i]:
                    queues[name].pop(0)
                    offered[name] = False
                    if not first:
                        first.append(cycle)
            for j, name in enumerate(sinks):
                valid, payload = values[len(queues) + 2 * j:len(queues) + 2 * j + 2]
                if ready[name] and valid:
                    got[name].append(payload)
                    last[:] = [cycle]
        assert not any(queues.values()), "the unit did not take every input beat"

    sim = Simulator(dut)
    sim.add_clock(4e-9)
    sim.add_testbench(testbench)
    sim.run()
    return got, last[0] - first[0] + 1


def _rms_case(dut, rows, weights, *, seed, stall):
    rows_n, n = rows.shape
    got, cycles = run_streams(
        dut, {"x": lane_beats(rows, dut.lanes), "weight": lane_beats(weights, dut.lanes)},
        {"y": rows_n * -(-n // dut.lanes)}, {"n": n}, seed=seed,
        p_valid=1 - stall, p_ready=1 - stall)
    return unpack_lane_beats(got["y"], rows_n, n, dut.lanes), cycles


@pytest.mark.parametrize("lanes", [3, 4])
def test_rmsnorm_bit_exact_under_stalls(lanes):
    dut = RmsNorm(lanes=lanes, max_n=40, eps=1e-5)
    rng = np.random.default_rng(lanes)
    for n, stall in ((37, 0.3), (lanes, 0.5), (1, 0.2)):
        rows = activation_rows(rng, 4, n)
        weights = fp.fp16_from_float(rng.normal(1.0, 0.2, (4, n)))
        got, _ = _rms_case(dut, rows, weights, seed=n, stall=stall)
        np.testing.assert_array_equal(got, dut.model(rows, weights), err_msg=f"n={n}")


def test_rmsnorm_cycles_without_stalls():
    dut = RmsNorm(lanes=4, max_n=64, eps=1e-6)
    rng = np.random.default_rng(5)
    for n, count in ((61, 3), (8, 4), (3, 1)):
        rows = activation_rows(rng, count, n)
        weights = fp.fp16_from_float(rng.normal(1.0, 0.2, (count, n)))
        got, cycles = _rms_case(dut, rows, weights, seed=0, stall=0.0)
        np.testing.assert_array_equal(got, dut.model(rows, weights))
        assert cycles == dut.expected_cycles(RmsNormJob(n, count)), (n, count)


QUANT_CONFIGS = {
    # G*T = 6 > L = 4, gcd 2; G*T = 6 < L = 8, gcd 2; G*T = 9 > L = 4, gcd 1.
    "L4-G3T2": (4, EngineConfig(group_size=3, tables_per_step=2, columns_per_cycle=2,
                                accumulator_depth=2, max_k=252)),
    "L8-G3T2": (8, EngineConfig(group_size=3, tables_per_step=2, columns_per_cycle=2,
                                accumulator_depth=2, max_k=252)),
    "L4-G3T3": (4, EngineConfig(group_size=3, tables_per_step=3, columns_per_cycle=2,
                                accumulator_depth=2, max_k=252)),
}


def _quant_case(dut, rows, n_out, *, seed, stall):
    rows_n, n = rows.shape
    beats, absmax = dut.model(rows, n_out)
    got, cycles = run_streams(
        dut, {"x": lane_beats(rows, dut.lanes)},
        {"acts": len(beats), "absmax": rows_n},
        {"n": n, "tiles": dut.cfg.output_tiles(n_out)}, seed=seed, p_valid=1 - stall,
        p_ready=1 - stall)
    return got, beats, absmax, cycles


@pytest.mark.parametrize("name", QUANT_CONFIGS)
def test_quantizer_bit_exact_under_stalls(name):
    lanes, cfg = QUANT_CONFIGS[name]
    dut = ActQuantizer(cfg, lanes=lanes, max_n=40)
    rng = np.random.default_rng(lanes + cfg.block_k)
    C, D = cfg.columns_per_cycle, cfg.accumulator_depth
    for n, n_out, stall in ((37, 2 * C * D + 1, 0.3), (cfg.block_k, C, 0.5), (1, 1, 0.2)):
        rows = activation_rows(rng, 3, n)
        got, beats, absmax, _ = _quant_case(dut, rows, n_out, seed=n, stall=stall)
        assert got["acts"] == beats, f"n={n}"
        assert got["absmax"] == absmax.tolist()


@pytest.mark.parametrize("name", QUANT_CONFIGS)
def test_quantizer_cycles_without_stalls(name):
    lanes, cfg = QUANT_CONFIGS[name]
    dut = ActQuantizer(cfg, lanes=lanes, max_n=64)
    rng = np.random.default_rng(7)
    C, D = cfg.columns_per_cycle, cfg.accumulator_depth
    for n, n_out, count in ((61, C * D * 2, 3), (5, C, 3), (lanes * 3, 1, 1)):
        rows = activation_rows(rng, count, n)
        got, beats, _, cycles = _quant_case(dut, rows, n_out, seed=0, stall=0.0)
        assert got["acts"] == beats
        assert cycles == dut.expected_cycles(ActQuantJob(n, count, dut.cfg.output_tiles(n_out))), (n, count)


def test_fp32_adder_against_the_model():
    dut = Fp32AddNonNegative()
    rng = np.random.default_rng(3)
    a = fp.fp32_from_float(rng.exponential(1.0, 1500) * np.exp2(rng.integers(-40, 40, 1500)))
    b = np.concatenate([
        fp.fp32_from_float(rng.exponential(1.0, 500) * np.exp2(rng.integers(-40, 40, 500))),
        a[500:1000] + rng.integers(-3, 4, 500).astype(np.uint32),    # near ties and equal
        rng.choice(np.array([0, 1, 0x7F7FFFFF, 0x7F000000, 0x00800000], np.uint32), 500)])
    expected = dut.model(a, b)
    got = []

    async def testbench(ctx):
        for x, y in zip(a.tolist(), b.tolist()):
            ctx.set(dut.a, x)
            ctx.set(dut.b, y)
            await ctx.tick()
            got.append(ctx.get(dut.y))

    sim = Simulator(dut)
    sim.add_clock(4e-9)
    sim.add_testbench(testbench)
    sim.run()
    np.testing.assert_array_equal(np.array(got, np.uint32), expected)


def test_reciprocal_rom_gives_the_model_scale_for_every_absmax():
    """s = ROM[mantissa] * 2**-E equals round32(127 / A) for every positive fp16 A."""
    table = quant_reciprocal_table()
    codes = np.arange(1 << 10, 0x7C00, dtype=np.int64)            # every normal magnitude
    a = fp.fp16_to_float(codes.astype(np.uint16))
    rom = table[codes & 0x3FF]
    scale_exp = (rom >> 23) - ((codes >> 10) - 15)
    scale = fp.fp32_to_float(((scale_exp << 23) | (rom & 0x7FFFFF)).astype(np.uint32))
    np.testing.assert_array_equal(scale, fp.FP32.round(nm.ACT_MAX / a))


def test_rmsnorm_with_zero_eps_on_a_zero_row():
    """eps = 0 and an all-zero row: v = 0 and rsqrt gives the fp32 maximum; every output is a
    signed zero (x's sign times w's)."""
    dut = RmsNorm(lanes=4, max_n=16, eps=0.0)
    rng = np.random.default_rng(11)
    rows = np.concatenate([np.zeros((1, 10), np.uint16) | np.uint16(0x8000) * (
        rng.random((1, 10)) < 0.5), activation_rows(rng, 1, 10)])
    weights = fp.fp16_from_float(rng.normal(0.0, 1.0, (2, 10)))
    got, _ = _rms_case(dut, rows, weights, seed=1, stall=0.3)
    np.testing.assert_array_equal(got, dut.model(rows, weights))


class _QuantizedMatmul(Elaboratable):
    """ActQuantizer.acts wired straight into TlmmEngine.acts (the integration's order)."""

    def __init__(self, cfg, lanes, max_n):
        self.quant = ActQuantizer(cfg, lanes=lanes, max_n=max_n)
        self.engine = TlmmEngine(cfg)
        self.x, self.absmax = self.quant.x, self.quant.absmax
        self.n, self.tiles = self.quant.n, self.quant.tiles
        self.weights, self.results = self.engine.weights, self.engine.results
        self.k_blocks, self.n_groups = self.engine.k_blocks, self.engine.n_groups

    def elaborate(self, platform):
        m = Module()
        m.submodules.quant = self.quant
        m.submodules.engine = self.engine
        wiring.connect(m, self.quant.acts, self.engine.acts)
        return m


def test_quantizer_feeds_the_tlmm_engine():
    """fp16 rows -> ActQuantizer -> TlmmEngine equals the ternary matmul of the model's codes,
    with several output tiles (the quantizer re-sends each row once per tile)."""
    cfg = EngineConfig(group_size=3, tables_per_step=2, columns_per_cycle=2,
                       accumulator_depth=2, max_k=252)
    top = _QuantizedMatmul(cfg, lanes=4, max_n=40)
    rng = np.random.default_rng(21)
    rows, k, n_out = 3, 23, 9                      # K pads to 24, N to 3 tiles of 4 columns
    x = activation_rows(rng, rows, k)
    w = rng.integers(-1, 2, (n_out, k))
    codes, absmax = fp.fp16_quantize_int8(x)
    T, C, D = cfg.tables_per_step, cfg.columns_per_cycle, cfg.accumulator_depth
    weight_beats = nm.tlmm_weight_beats(w, cfg.code, T, C, D) * rows
    got, _ = run_streams(
        top, {"x": lane_beats(x, 4), "weights": weight_beats},
        {"results": rows * cfg.padded_n(n_out) // C, "absmax": rows},
        {"n": k, "tiles": top.quant.cfg.output_tiles(n_out),
         "k_blocks": cfg.padded_k(k) // cfg.block_k, "n_groups": cfg.padded_n(n_out) // C},
        seed=4, p_valid=0.7, p_ready=0.7)
    results = nm.tlmm_unpack_results(got["results"], rows, n_out, C, cfg.acc_width)
    np.testing.assert_array_equal(results, nm.ternary_matmul(codes, w))
    assert got["absmax"] == absmax[:, 0].tolist()
