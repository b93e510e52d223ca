# amaranth: UnusedElaboratable=no
"""The prefill attention unit (``hdl/attention/prefill.py``) against
``models.attention.online_attention``, bit for bit.

Cycle-accurate tier (``rtl``): five Verilator builds, each running all its cases as the phases
of one run of the generic testbench: ``n4-l8-d32`` (MHA / GQA / MQA 4/4, 4/2, 4/1 with 1,
``n_pe - 1``, ``n_pe`` and ``2 n_pe + 1`` tokens, chunks that start past 0), ``n3-l4-d16`` (an
``n_pe`` that is not a power of two), ``n1-l8-d8`` and ``n1-l2-d16`` (one query a batch: the
periods wait for the ``o`` loop, with one beat a vector and no adder chain, or for the K/V
intake) and ``kv260`` (n_pe 4, 16 lanes, head_dim 64: the benchmark of
docs/attention_prefill.md, 16, 32 and 64 tokens).
Every case runs in both schedules (reordered and plain), on random fp16 with some vectors
scaled up so that ``exp2`` flushes (checked); stall-free phases assert ``expected_cycles``
exactly, and the cases run again with 30 % random stalls on every stream;
nothing may follow a phase's last beat and ``idle`` must be high after each.

Fast tier: the refusals (a chunk past ``max_context``, heads that do not split, a group too
large, bad parameters) and the stream packer's order. Synthesis tier (``synth``): the yosys
estimate of the kv260 point.
"""

from __future__ import annotations

import numpy as np
import pytest

from trilut.hdl.attention.prefill import PrefillAttention, PrefillJob, prefill_batches
from trilut.models import attention as att
from trilut.models import fp16 as fp
from trilut.models import numerics as nm

#: The Verilator build: (n_pe, lanes, head_dim, max_context, max_heads, max_group).
BUILD = dict(n_pe=4, lanes=8, head_dim=32, max_context=32, max_heads=4, max_group=4)


def prefill_streams(unit: PrefillAttention, job: PrefillJob, q, k, v, out=None) -> dict:
    """The unit's streams for one job (the host's packer, ``models.attention.prefill_streams``)."""
    return att.prefill_streams(q, k, v, start=job.start, n_pe=unit.n_pe, lanes=unit.lanes,
                               plain=job.plain, out=out)


def _data(rng, job: PrefillJob, d: int):
    """Random fp16 q, k, v; a few q and k vectors scaled by 6 so that some scores lie more
    than 16 (log2 domain) below the running maximum and their ``exp2`` flushes to zero."""
    S = job.start + job.tokens
    q = rng.normal(0, 1.0, (job.heads, job.tokens, d))
    k = rng.normal(0, 1.0, (job.kv_heads, S, d))
    v = rng.normal(0, 1.0, (job.kv_heads, S, d))
    q[:, rng.random(job.tokens) < 0.3] *= 6.0
    k[:, rng.random(S) < 0.3] *= 6.0
    return tuple(fp.fp16_from_float(a) for a in (q, k, v))


def _flushes(q, k, start: int, lanes: int) -> int:
    """How many softmax factors (``c`` on a new maximum, ``p`` otherwise) of the online
    recurrence flush to zero in ``exp2_neg`` for this data."""
    from trilut.models import attention as att
    group = q.shape[0] // k.shape[0]
    qv, kv = fp.FP16.decode(q), fp.FP16.decode(k).repeat(group, axis=0)
    count = 0
    for i in range(q.shape[1]):
        t = att.scores(qv[:, i:i + 1], kv[:, :start + i + 1], lanes)     # [H, keys]
        m = np.maximum.accumulate(t, axis=1)
        diff = fp.FP32.round(-np.abs(t[:, 1:] - m[:, :-1]))
        count += int(np.sum(att.exp2_neg(diff) == 0))
    return count


#: Builds of the unit, each one Verilator run: parameters, and the cases (start, tokens,
#: heads, kv_heads) run in both schedules without stalls, then again with stalls.
BUILDS = {
    # Every shape of batch: MHA / GQA / MQA, 1, n_pe - 1, n_pe, 2 n_pe + 1 tokens, start > 0.
    "n4-l8-d32": (BUILD, {
        "mha-t1": (0, 1, 4, 4),
        "mha-t3": (0, 3, 4, 4),
        "gqa-t4": (0, 4, 4, 2),
        "mqa-t9": (0, 9, 4, 1),
        "gqa-t9-start5": (5, 9, 4, 2),
        "mha-t6-start11": (11, 6, 4, 4),
        "mqa-t1-start20": (20, 1, 4, 1),
    }),
    # n_pe that is not a power of two, 4 lanes.
    "n3-l4-d16": (dict(n_pe=3, lanes=4, head_dim=16, max_context=16, max_heads=4, max_group=2), {
        "mha-t2": (0, 2, 2, 2),
        "gqa-t7-start3": (3, 7, 4, 2),
        "mha-t3-start1": (1, 3, 1, 1),
    }),
    # One query a batch: the periods wait, for the o loop (one beat a vector, no adder chain)
    # or for the K/V intake (8 beats a vector, 16 intake beats a key).
    "n1-l8-d8": (dict(n_pe=1, lanes=8, head_dim=8, max_context=8, max_heads=2, max_group=1), {
        "mha-t1": (0, 1, 1, 1),
        "mha-t3-start5": (5, 3, 2, 2),
    }),
    "n1-l2-d16": (dict(n_pe=1, lanes=2, head_dim=16, max_context=8, max_heads=2, max_group=2), {
        "mha-t3-start2": (2, 3, 2, 2),
        "gqa-t2-start4": (4, 2, 2, 1),
    }),
    # The kv260 point (n_pe 4, head_dim 64, 16 lanes): the benchmark of docs/attention_prefill.md.
    "kv260": (dict(n_pe=4, lanes=16, head_dim=64, max_context=64, max_heads=4, max_group=4), {
        "mha-t16": (0, 16, 1, 1),
        "mha-t32": (0, 32, 1, 1),
        "mha-t64": (0, 64, 1, 1),
        "gqa4-t16": (0, 16, 4, 1),
        "gqa4-t32": (0, 32, 4, 1),
        "gqa4-t64": (0, 64, 4, 1),
    }),
}
#: Cases of each build that run again under random stalls.
STALLED = {"n4-l8-d32": None, "n3-l4-d16": None, "n1-l8-d8": None, "n1-l2-d16": None,
           "kv260": ["mha-t16", "gqa4-t16"]}


@pytest.mark.rtl
@pytest.mark.parametrize("build", list(BUILDS))
def test_prefill_attention_bit_exact_and_cycles(build, tmp_path):
    from trilut.sim.transport import run_stream_on
    from trilut.transport import StreamPhase, StreamRun

    params, cases = BUILDS[build]
    unit = PrefillAttention(**params)
    rng = np.random.default_rng(len(build))
    phases, expected_cycles = [], {}
    flushes = 0
    stalled = STALLED[build] or list(cases)
    for stall in (0.0, 0.3):
        for i, (name, (start, tokens, heads, kv_heads)) in enumerate(cases.items()):
            if stall and name not in stalled:
                continue
            for plain in (False, True):
                job = PrefillJob(start=start, tokens=tokens, heads=heads, kv_heads=kv_heads,
                                 plain=plain)
                q, k, v = _data(rng, job, unit.head_dim)
                flushes += _flushes(q, k, start, unit.lanes)
                out = unit.model(q, k, v, start, plain)
                streams = prefill_streams(unit, job, q, k, v, out)
                label = f"{name}-{'plain' if plain else 'reordered'}-stall{stall}"
                cycles = None if stall else unit.expected_cycles(job)
                expected_cycles[label] = cycles
                phases.append(StreamPhase(
                    name=label, stall=stall, seed=2 * i + plain,
                    scalars={"start": start, "tokens": tokens, "heads": heads,
                             "kv_heads": kv_heads, "plain": int(plain)},
                    inputs={"q": streams["q"], "kv": streams["kv"]},
                    expected={"out": streams["out"]}, expected_cycles=cycles,
                    flags={"idle": 1}, settle_cycles=20))
    assert flushes > 0                       # the data reaches exp2's flush to zero
    results = run_stream_on(unit, StreamRun(phases),
                            name="prefill_attention_" + build.replace("-", "_"), run_dir=tmp_path)
    for phase in results:
        if expected_cycles.get(phase.name) is not None:
            print(f"{build} {phase.name}: {phase.cycles} cycles")
            assert phase.cycles == expected_cycles[phase.name], phase.name


# --- fast tier ----------------------------------------------------------------------------------

@pytest.mark.fast
def test_stream_order_and_batches():
    job = PrefillJob(start=2, tokens=5, heads=2, kv_heads=1)
    assert prefill_batches(job, 4) == [(0, 4, 4, 7), (0, 0, 1, 3)]
    plain = PrefillJob(start=2, tokens=5, heads=2, kv_heads=1, plain=True)
    assert prefill_batches(plain, 4) == [(0, 4, 4, 7), (0, 0, 1, 7)]
    unit = PrefillAttention(n_pe=4, lanes=4, head_dim=8, max_context=16, max_heads=2,
                            max_group=2)
    # Each code names its (head, token, element); the packer's order is the docstring's.
    q = np.arange(2 * 5 * 8).reshape(2, 5, 8).astype(np.uint16)
    k = (1000 + np.arange(7 * 8)).reshape(1, 7, 8).astype(np.uint16)
    v = (2000 + np.arange(7 * 8)).reshape(1, 7, 8).astype(np.uint16)
    streams = prefill_streams(unit, job, q, k, v)
    lanes = [nm.unpack_fields(b, 16, 4) for b in streams["q"]]
    firsts = [int(x[0]) for x in lanes[::2]]            # first element of each vector
    # batch 0: tokens 4, 3, 2, 1 (heads 0 then 1 each), batch 1: token 0
    assert firsts == [q[h, t, 0] for t in (4, 3, 2, 1, 0) for h in (0, 1)]
    kv = [int(nm.unpack_fields(b, 16, 4)[0]) for b in streams["kv"][::2]]
    assert kv == [x for j in range(7) for x in (k[0, j, 0], v[0, j, 0])] + \
                 [x for j in range(3) for x in (k[0, j, 0], v[0, j, 0])]


@pytest.mark.fast
def test_refusals():
    unit = PrefillAttention(**BUILD)
    with pytest.raises(ValueError, match="exceed max_context = 32"):
        unit.expected_cycles(PrefillJob(start=30, tokens=3, heads=4, kv_heads=4))
    with pytest.raises(ValueError, match="4 query heads do not split into 3"):
        PrefillJob(start=0, tokens=1, heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="exceeds max_group = 2"):
        PrefillAttention(**{**BUILD, "max_group": 2}).expected_cycles(
            PrefillJob(start=0, tokens=1, heads=4, kv_heads=1))
    with pytest.raises(ValueError, match="heads must be at most max_heads = 4"):
        unit.expected_cycles(PrefillJob(start=0, tokens=1, heads=8, kv_heads=8))
    with pytest.raises(ValueError, match="n_pe must be a positive integer, not 0"):
        PrefillAttention(**{**BUILD, "n_pe": 0})
    with pytest.raises(ValueError, match="lanes must be a power of two from 1 to 256, not 6"):
        PrefillAttention(**{**BUILD, "lanes": 6})
    with pytest.raises(ValueError, match=r"lanes \(8\) must divide head_dim \(36\)"):
        PrefillAttention(**{**BUILD, "head_dim": 36})
    with pytest.raises(ValueError, match="tokens must be a positive integer, not 0"):
        PrefillJob(start=0, tokens=0, heads=4, kv_heads=4)
    with pytest.raises(ValueError, match="max_group must be at most 4, not 8"):
        PrefillAttention(**{**BUILD, "max_group": 8})


# --- synthesis tier -----------------------------------------------------------------------------

#: The kv260 point of docs/attention_prefill.md: (lanes, LUTs at most, flip-flops at most).
SYNTH = {"l16": (16, 27_000, 19_700), "l8": (8, 18_000, 12_800)}


@pytest.mark.synth
@pytest.mark.parametrize("point", list(SYNTH))
def test_resources(point):
    from trilut.hdl.resources import estimate

    lanes, luts, ffs = SYNTH[point]
    unit = PrefillAttention(n_pe=4, lanes=lanes, head_dim=64, max_context=2048, max_heads=20,
                            max_group=4)
    total = estimate(unit, name=f"prefill_attention_{point}").total
    print(point, total)
    assert total["dsp"] == 6 * lanes + 6
    assert (total["bram36"], total["uram"]) == (unit.memory_blocks()["bram36"], 0)
    assert total["lut"] <= luts and total["ff"] <= ffs
