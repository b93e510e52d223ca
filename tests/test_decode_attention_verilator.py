# amaranth: UnusedElaboratable=no
"""The decode attention unit (``hdl/attention/decode.py``) and its score path (``score.py``)
against ``models.attention``, bit for bit.

Cycle-accurate tier (``rtl``): two hardware configurations (head_dim 64 at 16 lanes, head_dim
32 at 4 lanes), each built once with Verilator and run through the generic testbench: MHA,
GQA and MQA layouts and a group of 5 (as in 20 / 4), positions 0, 1, a few in the middle and
``max_context - 1``, random fp16 q/k/v with rows scaled up (scores far apart: exp2 flushes)
and down (near-zero scores), a few edge codes; stall-free phases with the exact
``expected_cycles``, phases under random stalls on every stream and on one stream at a time;
nothing may follow the last beat.

Fast tier: ``ScorePath`` in amaranth.sim with its enable dropping and gaps between rows; the
whole unit in amaranth.sim on a small configuration under stalls; the parameter and job
refusals.

Synthesis tier: yosys's estimate for head_dim 64, 16 lanes, 2048 positions, groups of 4.
"""

import numpy as np
import pytest
from amaranth.sim import Simulator

from trilut.hdl.attention.decode import DecodeAttention, DecodeJob
from trilut.hdl.attention.score import ScorePath
from trilut.models import fp16 as fp

FP16 = fp.FP16

#: name -> (unit parameters, [(heads, kv_heads)], positions).
CONFIGS = {
    "d64-l16": (dict(head_dim=64, lanes=16, max_context=24, max_heads=10, max_group=5),
                [(4, 4), (4, 2), (4, 1), (10, 2)], [0, 1, 5, 13, 23]),
    "d32-l4": (dict(head_dim=32, lanes=4, max_context=16, max_heads=8, max_group=4),
               [(4, 4), (4, 2), (4, 1), (8, 2)], [0, 1, 6, 15]),
}

#: fp16 codes sprinkled into q, k and v: zeros, subnormals (read as zero), the smallest
#: normal, one, large values.
EDGE_CODES = np.array([0x0000, 0x8000, 0x0001, 0x83FF, 0x0400, 0x3C00, 0xBC00, 0x5BFF,
                       0xDBFF, 0x7BFF, 0xFBFF], dtype=np.uint16)


def random_step(rng, unit: DecodeAttention, heads: int, kv_heads: int, *, edges: bool = True):
    """q ``[H, 1, d]``, k, v ``[H_kv, max_context, d]`` fp16 codes: normal values, some query
    heads scaled up (their scores spread over tens of binades: most p flush to zero) or down
    (scores near zero: p near 1), a few keys and values large or tiny, and edge codes."""
    d, S = unit.head_dim, unit.max_context
    q_scale = np.exp2(rng.choice([-8.0, -2.0, 0.0, 1.0, 3.0, 5.0], (heads, 1, 1)))
    q = FP16.from_float(rng.standard_normal((heads, 1, d)) * q_scale)
    k_scale = np.exp2(rng.choice([-6.0, 0.0, 0.0, 0.0, 2.0], (kv_heads, S, 1)))
    k = FP16.from_float(rng.standard_normal((kv_heads, S, d)) * k_scale)
    v_scale = np.exp2(rng.choice([-12.0, 0.0, 0.0, 4.0, 8.0], (kv_heads, S, 1)))
    v = FP16.from_float(rng.standard_normal((kv_heads, S, d)) * v_scale)
    if edges:
        for a in (q, k, v):
            where = rng.random(a.shape) < 0.02
            a[where] = rng.choice(EDGE_CODES, int(where.sum()))
    return q, k, v


def _phase(unit, name, q, k, v, job: DecodeJob, **kw):
    from trilut.transport import StreamPhase

    return StreamPhase(
        name=name, inputs=unit.input_beats(q, k, v, job.position),
        expected={"out": unit.output_beats(unit.model(q, k, v, job.position))},
        scalars={"position": job.position, "heads": job.heads, "kv_heads": job.kv_heads},
        **kw)


@pytest.mark.rtl
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_decode_attention_bit_exact_on_verilator(config, tmp_path):
    from trilut.sim.transport import run_stream_on
    from trilut.transport import StreamRun

    params, layouts, positions = CONFIGS[config]
    unit = DecodeAttention(**params)
    rng = np.random.default_rng(sum(map(ord, config)))
    phases, cycles = [], {}
    seed = 0
    for heads, kv_heads in layouts:
        for position in positions:
            job = DecodeJob(position=position, heads=heads, kv_heads=kv_heads)
            q, k, v = random_step(rng, unit, heads, kv_heads)
            label = f"{heads}x{kv_heads}-pos{position}"
            cycles[label] = unit.expected_cycles(job)
            phases.append(_phase(unit, label, q, k, v, job, expected_cycles=cycles[label],
                                 settle_cycles=12 if position == positions[-1] else 0))
        # Under stalls: every stream, then one stream at a time, at a middle and the last
        # position.
        stalls = [({}, 0.3), ({"k": 0.6}, 0.0), ({"v": 0.6}, 0.0), ({"out": 0.7}, 0.0),
                  ({"q": 0.8, "out": 0.2}, 0.0)]
        for i, (own, stall) in enumerate(stalls):
            seed += 1
            position = positions[-1] if i % 2 else positions[len(positions) // 2]
            job = DecodeJob(position=position, heads=heads, kv_heads=kv_heads)
            q, k, v = random_step(rng, unit, heads, kv_heads)
            phases.append(_phase(unit, f"{heads}x{kv_heads}-pos{position}-stalls{i}", q, k, v,
                                 job, stall=stall, stream_stalls=own, seed=seed,
                                 settle_cycles=8))
    results = run_stream_on(unit, StreamRun(phases=phases, quiet_cycles=100),
                            name=f"decode_attention_{config.replace('-', '_')}",
                            run_dir=tmp_path)
    for result in results:
        if result.name in cycles:
            print(f"{config} {result.name}: {result.cycles} cycles")
            assert result.cycles == cycles[result.name], result.name


# --------------------------------------------------------------------------------------------
# Fast tier.

def _beats(row, lanes):
    return [[int(c) for c in row[i:i + lanes]] for i in range(0, len(row), lanes)]


@pytest.mark.fast
@pytest.mark.parametrize("lanes, head_dim", [(4, 32), (16, 64), (4, 4), (8, 64)])
def test_score_path_matches_scores_with_enable_and_row_gaps(lanes, head_dim):
    """Rows with gaps between them and cycles with ``en`` low inside them: every row's score
    and tag, in order, equal to ``models.attention.scores``."""
    rng = np.random.default_rng(lanes + head_dim)
    rows = 30
    dut = ScorePath(lanes=lanes, head_dim=head_dim, tag_width=8)
    q = FP16.from_float(rng.standard_normal((rows, head_dim))
                        * np.exp2(rng.integers(-6, 6, (rows, 1))))
    k = FP16.from_float(rng.standard_normal((rows, head_dim)))
    k[rng.random(k.shape) < 0.03] = 0x8000
    idle = [0x7BFF] * lanes                      # garbage on the operands when not valid
    schedule = []
    for r in range(rows):
        while rng.random() < 0.3:
            schedule.append((1, 0, idle, idle, 0))
        for qb, kb in zip(_beats(q[r], lanes), _beats(k[r], lanes)):
            while rng.random() < 0.3:
                schedule.append((0, 1, idle, idle, 0))          # disabled: nothing taken
            schedule.append((1, 1, qb, kb, r))
    schedule += [(1, 0, idle, idle, 0)] * (dut.latency + 2)
    got = []

    async def testbench(ctx):
        for en, valid, qb, kb, tag in schedule:
            for port, value in ((dut.en, en), (dut.valid, valid), (dut.q, qb), (dut.k, kb),
                                (dut.tag, tag)):
                ctx.set(port, value)
            if en and ctx.get(dut.t_valid):
                got.append((ctx.get(dut.t_tag), ctx.get(dut.t)))
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(4e-9)
    sim.add_testbench(testbench)
    sim.run()
    assert [tag for tag, _ in got] == list(range(rows))
    assert [t for _, t in got] == [int(c) for c in dut.model(q, k)]
    assert dut.latency == (2 + 5 * (lanes.bit_length() - 1) + 4
                           + (0 if head_dim == lanes else 1 + 5 * (head_dim // lanes - 1)))


def simulate_step(unit, q, k, v, job: DecodeJob, *, stall: float, seed: int):
    """One step on amaranth.sim: random idle inputs and backpressure; (out beats, cycles from
    the first input beat taken to the last output beat, inclusive)."""
    beats = unit.input_beats(q, k, v, job.position)
    expected = len(unit.output_beats(np.zeros((job.heads, 1, unit.head_dim))))
    got, first, last = [], [], []

    def source(name, offset):
        async def run(ctx):
            port, rng = getattr(unit, name), np.random.default_rng(seed + offset)
            for beat in beats[name]:
                while rng.random() < stall:
                    ctx.set(port.valid, 0)
                    await ctx.tick()
                ctx.set(port.payload.as_value(), beat)
                ctx.set(port.valid, 1)
                await ctx.tick().until(port.ready)
                first.append(cycle[0])
            ctx.set(port.valid, 0)
        return run

    cycle = [0]

    async def sink(ctx):
        rng = np.random.default_rng(seed + 9)
        ctx.set(unit.position, job.position)
        ctx.set(unit.heads, job.heads)
        ctx.set(unit.kv_heads, job.kv_heads)
        while len(got) < expected and cycle[0] < 100_000:
            ready = rng.random() >= stall
            ctx.set(unit.out.ready, ready)
            _, _, valid, payload = await ctx.tick().sample(unit.out.valid,
                                                           unit.out.payload.as_value())
            if ready and valid:
                got.append(int(payload))
                last.append(cycle[0])
            cycle[0] += 1

    sim = Simulator(unit)
    sim.add_clock(4e-9)
    for i, name in enumerate("qkv"):
        sim.add_testbench(source(name, i))
    sim.add_testbench(sink)
    sim.run()
    return got, last[-1] - min(first) + 1 if first and last else None


@pytest.mark.fast
def test_decode_unit_on_amaranth_sim_small():
    """A small unit (head_dim 8, 4 lanes) on amaranth.sim: MQA with a group of 3 padded to
    the accumulators' spacing, GQA, stalls; the stall-free cycles exactly."""
    unit = DecodeAttention(head_dim=8, lanes=4, max_context=8, max_heads=6, max_group=3)
    rng = np.random.default_rng(5)
    for heads, kv_heads, position, stall in [(3, 1, 7, 0.0), (2, 1, 4, 0.0), (6, 2, 5, 0.3),
                                             (2, 2, 0, 0.0)]:
        job = DecodeJob(position=position, heads=heads, kv_heads=kv_heads)
        q, k, v = random_step(rng, unit, heads, kv_heads)
        got, cycles = simulate_step(unit, q, k, v, job, stall=stall, seed=position)
        assert got == unit.output_beats(unit.model(q, k, v, position)), (heads, kv_heads)
        if not stall:
            assert cycles == unit.expected_cycles(job), (heads, kv_heads, position)


@pytest.mark.fast
def test_cycle_model_terms():
    """The terms of ``expected_cycles`` for the documented shape (docs/attention_decode.md)."""
    unit = DecodeAttention(head_dim=64, lanes=16, max_context=2048, max_heads=32, max_group=4)
    assert unit.score_latency == 22 + 16 + 4
    assert unit.slots_per_position(1) == 5 and unit.slots_per_position(4) == 16
    # MHA, position 1023: 32 KV heads of 1024 x 4 score slots, 40 drain, 4 + 1023 x 5 value
    # slots, 16 drain; then one head's 4 output beats and 12 cycles.
    job = DecodeJob(position=1023, heads=32, kv_heads=32)
    assert unit.expected_cycles(job) == 32 * (4096 + 40 + 4 + 1023 * 5 + 16) + 4 + 12
    assert unit.memory_blocks() == {"bram36": 0.5, "uram": 1}
    assert unit.memory_blocks(uram=False) == {"bram36": 8.5, "uram": 0}


@pytest.mark.fast
@pytest.mark.parametrize("kwargs, message", [
    (dict(lanes=3), "lanes must be a power of two dividing head_dim = 64, not 3"),
    (dict(lanes=128), "lanes must be a power of two dividing head_dim = 64, not 128"),
    (dict(head_dim=48, lanes=32), "lanes must be a power of two dividing head_dim = 48, not 32"),
    (dict(max_group=9), "max_group must be at most 8, not 9"),
    (dict(max_context=0), "max_context must be a positive integer, not 0"),
])
def test_unit_refuses_bad_parameters(kwargs, message):
    params = dict(head_dim=64, lanes=16, max_context=32, max_heads=8, max_group=4) | kwargs
    with pytest.raises(ValueError, match=message):
        DecodeAttention(**params)


@pytest.mark.fast
def test_jobs_and_models_refused_beyond_the_unit():
    unit = DecodeAttention(head_dim=32, lanes=4, max_context=16, max_heads=8, max_group=4)
    with pytest.raises(ValueError, match="position 16 is outside the unit's context: "
                                         "max_context = 16"):
        unit.expected_cycles(DecodeJob(position=16, heads=4, kv_heads=4))
    with pytest.raises(ValueError, match=r"heads \(6\) must be a multiple of kv_heads \(4\)"):
        DecodeJob(position=0, heads=6, kv_heads=4)
    with pytest.raises(ValueError, match=r"a group of 8 query heads per KV head \(8 / 1\) "
                                         "exceeds max_group = 4"):
        unit.check_job(DecodeJob(position=0, heads=8, kv_heads=1))
    with pytest.raises(ValueError, match=r"heads \(10\) exceed max_heads = 8"):
        unit.check_job(DecodeJob(position=0, heads=10, kv_heads=5))
    with pytest.raises(ValueError, match="position must be a non-negative integer"):
        DecodeJob(position=-1, heads=4, kv_heads=4)
    rng = np.random.default_rng(0)
    q, k, v = random_step(rng, unit, 4, 1)
    with pytest.raises(ValueError, match="position 16 is outside"):
        unit.model(q, k, v, 16)
    with pytest.raises(ValueError, match=r"heads \(4\) must be a multiple of kv_heads \(3\)"):
        unit.model(q, np.concatenate([k] * 3), np.concatenate([v] * 3), 2)
    with pytest.raises(ValueError, match="head vectors must be head_dim = 32, not 16"):
        unit.model(q[..., :16], k[..., :16], v[..., :16], 2)


@pytest.mark.synth
def test_resources():
    from trilut.hdl.resources import estimate

    unit = DecodeAttention(head_dim=64, lanes=16, max_context=2048, max_heads=32, max_group=4)
    for uram in (True, False):
        total = estimate(unit, name="decode_attention", uram=uram).total
        print("decode_attention", "uram" if uram else "bram", total)
        blocks = unit.memory_blocks(uram=uram)
        assert (total["bram36"], total["uram"]) == (blocks["bram36"], blocks["uram"])
        assert total["dsp"] == RESOURCES["dsp"]
        assert total["lut"] <= RESOURCES["lut"] and total["ff"] <= RESOURCES["ff"]


#: yosys's figures (docs/attention_decode.md: 24,316 LUT, 15,508 FF, 68 DSP), a little
#: headroom on LUTs and flip-flops.
RESOURCES = {"dsp": 68, "lut": 25_500, "ff": 16_000}
