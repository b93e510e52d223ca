# amaranth: UnusedElaboratable=no
"""The prefill attention unit (``hdl/attention/prefill.py``) against
``models.attention.online_attention``, bit for bit.

Cycle-accurate tier: one Verilator build (``n_pe`` 4, 8 lanes, head_dim 32, up to 4 heads in
groups of up to 4) runs every case as a phase of the generic testbench: MHA / GQA / MQA
(4/4, 4/2, 4/1), 1, ``n_pe - 1``, ``n_pe`` and ``2 n_pe + 1`` tokens, chunks that start past
0, in both schedules (reordered and plain), random fp16 with some vectors scaled up so that
``exp2`` flushes; stall-free phases assert ``expected_cycles`` exactly, the same cases run again
with 30 % random stalls on every stream; nothing may follow a phase's last beat.

Fast tier: the refusals (a chunk past ``max_context``, heads that do not split, bad
parameters) and the stream packer's order.
"""

from __future__ import annotations

import numpy as np
import pytest

from trilut.hdl.attention.prefill import PrefillAttention, PrefillJob, prefill_batches
from trilut.models import fp16 as fp
from trilut.models import numerics as nm

#: The Verilator build: (n_pe, lanes, head_dim, max_context, max_heads, max_group).
BUILD = dict(n_pe=4, lanes=8, head_dim=32, max_context=32, max_heads=4, max_group=4)


def prefill_streams(unit: PrefillAttention, job: PrefillJob, q, k, v, out=None) -> dict:
    """The unit's streams for one job: fp16 codes ``q[H, T, d]``, ``k, v[H_kv, S, d]`` (and
    the expected ``out[H, T, d]``) -> lane beats of ``q``, ``kv`` (and ``out``), in the order
    of ``PrefillAttention``'s docstring: per batch (:func:`prefill_batches`), ``q`` per query
    (descending position) per head of the group; ``kv`` per key ``k_j`` then ``v_j``."""
    L, G = unit.lanes, job.group
    qs, kvs, outs = [], [], []
    for h, first, queries, keys in prefill_batches(job, unit.n_pe):
        for i in range(queries):
            for g in range(G):
                qs.append(q[h * G + g, first - i])
                if out is not None:
                    outs.append(out[h * G + g, first - i])
        for j in range(keys):
            kvs += [k[h, j], v[h, j]]
    streams = {"q": nm.lane_beats(np.array(qs), L), "kv": nm.lane_beats(np.array(kvs), L)}
    if out is not None:
        streams["out"] = nm.lane_beats(np.array(outs), L)
    return streams


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


#: name -> (start, tokens, heads, kv_heads)
CASES = {
    "mha-t1": (0, 1, 4, 4),
    "mha-t3": (0, 3, 4, 4),
    "gqa-t4": (0, 4, 4, 2),
    "mqa-t9": (0, 9, 4, 1),
    "gqa-t9-start5": (5, 9, 4, 2),
    "mha-t6-start11": (11, 6, 4, 4),
    "mqa-t1-start20": (20, 1, 4, 1),
}


@pytest.mark.rtl
def test_prefill_attention_bit_exact_and_cycles(tmp_path):
    from trilut.sim.transport import run_stream_on
    from trilut.transport import StreamPhase, StreamRun

    unit = PrefillAttention(**BUILD)
    rng = np.random.default_rng(7)
    phases, expected_cycles = [], {}
    for stall in (0.0, 0.3):
        for i, (name, (start, tokens, heads, kv_heads)) in enumerate(CASES.items()):
            for plain in (False, True):
                job = PrefillJob(start=start, tokens=tokens, heads=heads, kv_heads=kv_heads,
                                 plain=plain)
                q, k, v = _data(rng, job, unit.head_dim)
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
    results = run_stream_on(unit, StreamRun(phases), name="prefill_attention", run_dir=tmp_path)
    for phase in results:
        if expected_cycles.get(phase.name) is not None:
            print(f"{phase.name}: {phase.cycles} cycles")
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
