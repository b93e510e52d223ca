# amaranth: UnusedElaboratable=no
"""The RoPE unit (``hdl/attention/rope.py``) against ``models.attention.fp16_rope``, bit for bit.

Cycle-accurate tier (``rtl``): each hardware configuration (16 lanes x head_dim 64, the kv260
point; 4 x 32; 4 x 64) is built once with Verilator and runs all its cases as the phases of
one run of the generic testbench: 1, 2 and 5 heads a position (``heads`` changes between
phases), tables from ``rope_tables`` at positions 0..300 (and one of raw codes), realistic
values and the edges of the fp16 contract (zeros of both signs, subnormals, the smallest
normal, +-65504, products that flush and sums that saturate, exponent-31 codes); random
valid/ready stalls of 0.3 on every stream under several seeds, a table stream starved apart
from the others, and stall-free phases that must take exactly ``expected_cycles``, one beat a
cycle, the table taken once per position. Nothing may follow the last beat.

Fast tier (``fast``): the parameter checks, the table packer's round trip, and a few hundred
beats through amaranth.sim with stalls (one-beat heads included). Resources (``synth``): the
kv260 point through yosys.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from amaranth.hdl import Value
from amaranth.sim import Simulator

from trilut.hdl.attention.rope import Rope, RopeJob
from trilut.hdl.resources import estimate, format_table
from trilut.models import attention as at
from trilut.models import fp16 as fp
from trilut.models.numerics import lane_beats, unpack_lane_beats
from trilut.sim.transport import run_stream_on
from trilut.transport import PhaseResult, StreamPhase, StreamRun

THETA = 10_000.0

#: fp16 codes at the edges of the contract, for x.
EDGE_CODES = np.array([
    0x0000, 0x8000,                     # zeros
    0x0001, 0x03FF, 0x83FF,             # subnormals: read as zero of their sign
    0x0400, 0x8400, 0x0401, 0x0800,     # around the smallest normal: products flush
    0x3C00, 0xBC00, 0x3BFF,             # +-1
    0x7800, 0xF800, 0x7A00,             # 32768, 49152: a c + a s saturates
    0x7BFF, 0xFBFF, 0x7BFE,             # +-65504
    0x7C00, 0xFC00, 0x7FFF, 0xFFFF,     # exponent 31: a finite binade, never produced
], dtype=np.uint16)


def _x_codes(rng, positions: int, heads: int, head_dim: int, *, kind: str) -> np.ndarray:
    shape = (positions, heads, head_dim)
    if kind == "raw":
        return rng.integers(0, 1 << 16, shape).astype(np.uint16)
    x = fp.fp16_from_float(rng.normal(0.0, 1.0, shape)
                           * rng.choice([0.01, 1.0, 30.0, 3000.0], (positions, heads, 1)))
    if kind == "edges":
        edge = rng.random(shape) < 0.5
        x[edge] = rng.choice(EDGE_CODES, edge.sum())
        # Whole pairs at the extremes: a c - b s and b c + a s both saturate for a = -b.
        pairs = x.reshape(positions, heads, head_dim // 2, 2)
        pairs[:, :, ::5] = [0x7BFF, 0xFBFF]
        pairs[:, :, 1::7] = [0x0400, 0x0400]
    return x


def _positions(rng, count: int) -> np.ndarray:
    picks = rng.choice(np.arange(1, 300), count, replace=False)
    picks[0], picks[-1] = (0, 300) if count > 1 else (picks[0], picks[-1])
    return picks


def _phase(dut: Rope, name: str, rng, *, positions: int, heads: int, kind: str = "realistic",
           raw_table: bool = False, stall: float = 0.0, seed: int = 0,
           stream_stalls=None) -> tuple[StreamPhase, dict]:
    d, lanes = dut.head_dim, dut.lanes
    pos = _positions(rng, positions)
    cos, sin = at.rope_tables(pos, d, THETA)
    if raw_table:
        cos, sin = (rng.integers(0, 1 << 16, cos.shape).astype(np.uint16) for _ in range(2))
    x = _x_codes(rng, positions, heads, d, kind=kind)
    y = dut.model(x, cos, sin)
    job = RopeJob(positions, heads)
    stalled = bool(stall or any((stream_stalls or {}).values()))
    phase = StreamPhase(
        name=name, scalars={"heads": heads}, stall=stall, seed=seed,
        stream_stalls=stream_stalls or {},
        inputs={"x": lane_beats(x.reshape(-1, d), lanes),
                "table": at.rope_table_beats(cos, sin, lanes)},
        expected={"y": lane_beats(y.reshape(-1, d), lanes)},
        expected_cycles=None if stalled else dut.expected_cycles(job))
    return phase, {"job": job, "x": x, "y": y}


def _cases(dut: Rope, seed: int):
    rng = np.random.default_rng(seed)
    cases = []

    def add(name, **kw):
        cases.append(_phase(dut, name, rng, **kw))

    # Stall-free: exact cycles, one beat a cycle, the table once per position.
    add("no-stall-h1", positions=7, heads=1)
    add("no-stall-h5", positions=4, heads=5, kind="edges")
    add("no-stall-h2", positions=5, heads=2)
    for k, s in enumerate((11, 12, 13)):
        for heads in (1, 2, 5):
            add(f"stall-0.3-h{heads}-seed{s}", positions=30 // heads, heads=heads, stall=0.3,
                seed=s, kind=("realistic", "edges", "raw")[k])
    # The table arrives late and rarely: every first head waits for it, later heads do not.
    add("table-starved-h5", positions=8, heads=5, kind="edges", seed=21,
        stream_stalls={"table": 0.8})
    add("output-stalled-h2", positions=12, heads=2, seed=22, stream_stalls={"y": 0.7})
    add("raw-table-h5-stall-0.3", positions=12, heads=5, kind="raw", raw_table=True,
        stall=0.3, seed=23)
    add("edges-h1-stall-0.3", positions=40, heads=1, kind="edges", stall=0.3, seed=24)
    add("no-stall-after-stalls-h5", positions=3, heads=5)
    return cases


def _check_stall_free(dut: Rope, result: PhaseResult, job: RopeJob) -> None:
    B, H = dut.beats_per_head, job.heads
    n = job.positions * H * B
    x_in = np.array(result.handshakes["x"])
    table_in = np.array(result.handshakes["table"])
    y_out = np.array(result.handshakes["y"])
    np.testing.assert_array_equal(x_in, np.arange(n), err_msg=f"{result.name}: x")
    # Table beat j of position p moves with x beat j of the position's first head.
    first = (np.arange(job.positions)[:, None] * H * B + np.arange(B)[None, :]).reshape(-1)
    np.testing.assert_array_equal(table_in, first, err_msg=f"{result.name}: table")
    np.testing.assert_array_equal(y_out, x_in + dut.latency, err_msg=f"{result.name}: y")
    assert result.cycles == dut.expected_cycles(job) == n + dut.latency


@pytest.mark.rtl
@pytest.mark.parametrize("lanes, head_dim", [(16, 64), (4, 32), (4, 64)])
def test_rope_bit_exact_on_verilator(lanes, head_dim, tmp_path):
    dut = Rope(lanes=lanes, head_dim=head_dim, max_heads=5)
    cases = _cases(dut, seed=lanes * 1000 + head_dim)
    run = StreamRun(phases=[phase for phase, _ in cases])
    seen = run_stream_on(dut, run, name=f"rope_{lanes}x{head_dim}", run_dir=tmp_path)
    stall_free = 0
    for (phase, info), result in zip(cases, seen, strict=True):
        got = unpack_lane_beats(result.outputs["y"], info["y"].size // head_dim, head_dim,
                                lanes)
        np.testing.assert_array_equal(got, info["y"].reshape(-1, head_dim),
                                      err_msg=phase.name)
        if phase.expected_cycles is not None:
            _check_stall_free(dut, result, info["job"])
            stall_free += 1
    assert stall_free == 4


# --------------------------------------------------------------------------------------------
# Fast tier.


def _simulate(dut: Rope, x_beats, table_beats, heads: int, n_out: int, *, stall=0.3, seed=0):
    """``x`` and ``table`` driven with idle cycles, ``y`` with backpressure (probability
    ``stall`` each); the output beats. A deadlock fails, nothing may follow the last beat,
    and every input beat must have been taken. The sources run in the background: the sink
    ends the simulation, so an input the unit never takes fails the test, not hangs it."""
    sim = Simulator(dut)
    sim.add_clock(4e-9)
    got = []
    taken = {"x": 0, "table": 0}

    def source(name, stream, beats, rng):
        async def run(ctx):
            ctx.set(dut.heads, heads)
            for beat in beats:
                while rng.random() < stall:
                    await ctx.tick()
                ctx.set(Value.cast(stream.payload), beat)
                ctx.set(stream.valid, 1)
                await ctx.tick().until(stream.ready)
                ctx.set(stream.valid, 0)
                taken[name] += 1
        return run

    sim.add_testbench(source("x", dut.x, x_beats, random.Random(seed)), background=True)
    sim.add_testbench(source("table", dut.table, table_beats, random.Random(seed + 1)),
                      background=True)

    async def sink(ctx):
        rng = random.Random(seed + 99)
        payload = Value.cast(dut.y.payload)
        for _ in range(50 * n_out + 500):
            if len(got) == n_out:
                break
            ready = rng.random() >= stall
            ctx.set(dut.y.ready, ready)
            *_, valid, beat = await ctx.tick().sample(dut.y.valid, payload)
            if ready and valid:
                got.append(beat)
        assert len(got) == n_out, f"timed out with {len(got)} of {n_out} beats out"
        for _ in range(10):
            ctx.set(dut.y.ready, 1)
            *_, valid = await ctx.tick().sample(dut.y.valid)
            assert not valid

    sim.add_testbench(sink)
    sim.run()
    assert taken == {"x": len(x_beats), "table": len(table_beats)}, f"inputs taken: {taken}"
    return got


@pytest.mark.fast
@pytest.mark.parametrize("lanes, head_dim, heads", [(2, 2, 3), (4, 8, 1), (4, 16, 3)])
def test_rope_in_amaranth_sim(lanes, head_dim, heads):
    rng = np.random.default_rng(lanes + head_dim + heads)
    dut = Rope(lanes=lanes, head_dim=head_dim, max_heads=3)
    positions = 9
    cos, sin = at.rope_tables(_positions(rng, positions), head_dim, THETA)
    x = _x_codes(rng, positions, heads, head_dim, kind="edges")
    y = dut.model(x, cos, sin)
    got = _simulate(dut, lane_beats(x.reshape(-1, head_dim), lanes),
                    at.rope_table_beats(cos, sin, lanes), heads, y.size // lanes)
    np.testing.assert_array_equal(unpack_lane_beats(got, positions * heads, head_dim, lanes),
                                  y.reshape(-1, head_dim))


@pytest.mark.fast
def test_model_is_fp16_rope_per_head():
    rng = np.random.default_rng(3)
    dut = Rope(lanes=4, head_dim=8, max_heads=4)
    cos, sin = at.rope_tables([0, 5, 300], 8, THETA)
    x = _x_codes(rng, 3, 4, 8, kind="raw")
    y = dut.model(x, cos, sin)
    for h in range(4):
        np.testing.assert_array_equal(y[:, h], at.fp16_rope(x[:, h], cos, sin))
    # Position 0: cos = 1, sin = 0, so RoPE is the identity up to flushed subnormals.
    assert cos[0].tolist() == [0x3C00] * 4 and sin[0].tolist() == [0] * 4


@pytest.mark.fast
def test_table_beats_round_trip():
    rng = np.random.default_rng(4)
    for d, lanes in [(64, 16), (32, 4), (8, 8), (2, 2)]:
        cos, sin = at.rope_tables(rng.integers(0, 301, 7), d, THETA)
        beats = at.rope_table_beats(cos, sin, lanes)
        assert len(beats) == 7 * d // lanes
        codes = unpack_lane_beats(beats, 7, d, lanes)
        np.testing.assert_array_equal(codes[:, 0::2], cos)
        np.testing.assert_array_equal(codes[:, 1::2], sin)
    # Lane 0 of the first beat is cos_0, lane 1 sin_0, lane 2 cos_1 (lane 0 lowest).
    beat = at.rope_table_beats(np.array([[0x1111, 0x3333]]), np.array([[0x2222, 0x4444]]), 4)
    assert beat == [0x4444_3333_2222_1111]


@pytest.mark.fast
def test_bad_parameters_are_refused():
    for lanes in (3, 6, 1, 0, True, 2.0):
        with pytest.raises(ValueError, match="lanes must be"):
            Rope(lanes=lanes, head_dim=64, max_heads=4)
    with pytest.raises(ValueError, match=r"head_dim must be a multiple of lanes = 16 .*, not 40"):
        Rope(lanes=16, head_dim=40, max_heads=4)
    with pytest.raises(ValueError, match="head_dim must be a positive integer, not 0"):
        Rope(lanes=2, head_dim=0, max_heads=4)
    with pytest.raises(ValueError, match="max_heads must be a positive integer, not 0"):
        Rope(lanes=4, head_dim=8, max_heads=0)

    dut = Rope(lanes=4, head_dim=8, max_heads=4)
    cos, sin = at.rope_tables([1, 2], 8, THETA)
    for heads in (0, 5):
        with pytest.raises(ValueError, match=f"heads must be an integer from 1 to "
                                             f"max_heads = 4, not {heads}"):
            dut.model(np.zeros((2, heads, 8), np.uint16), cos, sin)
    with pytest.raises(ValueError, match=r"x must be \[positions, heads, 8\] codes"):
        dut.model(np.zeros((2, 8), np.uint16), cos, sin)
    with pytest.raises(ValueError, match="cos/sin must be"):
        dut.model(np.zeros((3, 1, 8), np.uint16), cos, sin)

    with pytest.raises(ValueError, match="heads must be a positive integer, not 0"):
        RopeJob(positions=3, heads=0)
    with pytest.raises(ValueError, match="positions must be a positive integer, not -1"):
        RopeJob(positions=-1, heads=1)
    with pytest.raises(ValueError, match="max_heads = 4, not 5"):
        dut.expected_cycles(RopeJob(positions=1, heads=5))
    with pytest.raises(TypeError, match="RopeJob"):
        dut.expected_cycles((1, 2))
    assert dut.expected_cycles(RopeJob(positions=3, heads=4)) == 3 * 4 * 2 + 2

    with pytest.raises(ValueError, match="RoPE lanes must be an even power of two, not 6"):
        at.rope_table_beats(cos, sin, 6)
    with pytest.raises(ValueError, match="head_dim 8 .* is not a multiple of lanes 16"):
        at.rope_table_beats(cos, sin, 16)
    with pytest.raises(ValueError, match="one shape"):
        at.rope_table_beats(cos, sin[:1], 4)
    with pytest.raises(ValueError, match="fp16 codes"):
        at.rope_table_beats(np.full(cos.shape, -1), sin, 4)


@pytest.mark.fast
def test_memory_blocks_are_none():
    assert Rope(lanes=16, head_dim=64, max_heads=32).memory_blocks() == {"bram36": 0, "uram": 0}


# --------------------------------------------------------------------------------------------
# Resources.


@pytest.mark.synth
def test_rope_resources_at_the_kv260_point(cache):
    dut = Rope(lanes=16, head_dim=64, max_heads=32)
    report = estimate(dut, name="rope")
    print()
    print(format_table(report))
    total = report.total
    # Two multiplies per lane (four per pair), one DSP48E2 each; the table buffer in LUTs.
    assert total["dsp"] == 2 * dut.lanes
    assert total["bram36"] == 0 == dut.memory_blocks()["bram36"]
    assert total["uram"] == 0 == dut.memory_blocks()["uram"]
