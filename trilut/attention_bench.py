"""Benchmark: the attention units' cycles on Verilator, against their cycle models.

At the kv260 attention point (4 query PEs, 16 lanes, head_dim 64; one KV head, no group):

* the prefill unit over prompt lengths 16 .. 256, with the reversed-reordered schedule
  (each batch streams keys only up to its last query) and the plain one (every batch every
  key, masked), on the same unit;
* the decode unit over context lengths 16 .. 2048.

Every run is bit-exact against the level-2 model (the testbench compares every beat) and its
measured cycles are printed beside the unit's ``expected_cycles`` (exact when nothing
stalls: the testbench also asserts it). A PNG plot of both goes to ``out_dir``. Speed
targets live here, never in timed tests.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from trilut.hdl.attention.decode import DecodeAttention, DecodeJob
from trilut.hdl.attention.prefill import PrefillAttention, PrefillJob
from trilut.models import attention as att
from trilut.models.fp16 import FP16
from trilut.sim.transport import run_stream_on
from trilut.transport import StreamPhase, StreamRun

__all__ = ["run_attention_benchmark", "KV260_ATTENTION"]

#: The kv260 design point of the attention units (docs/attention_prefill.md,
#: docs/attention_decode.md): TeLLMe's 4 query PEs, the datapath's 16 lanes, BitNet 0.73B's
#: head_dim is 96 and 2B-4T's 128; 64 is the tiny model's and the common case.
KV260_ATTENTION = {"n_pe": 4, "lanes": 16, "head_dim": 64}
CLOCK_MHZ = 250


def _random(rng, shape):
    return FP16.from_float(rng.normal(0.0, 1.0, shape))


def _prefill_rows(lengths, rng, run_dir, console):
    p = KV260_ATTENTION
    unit = PrefillAttention(n_pe=p["n_pe"], lanes=p["lanes"], head_dim=p["head_dim"],
                            max_context=max(lengths), max_heads=1, max_group=1)
    phases, jobs = [], []
    for tokens in lengths:
        q, k, v = (_random(rng, (1, tokens, p["head_dim"])) for _ in range(3))
        out = unit.model(q, k, v, 0, False)
        for plain in (False, True):
            job = PrefillJob(start=0, tokens=tokens, heads=1, kv_heads=1, plain=plain)
            streams = att.prefill_streams(q, k, v, start=0, n_pe=p["n_pe"], lanes=p["lanes"],
                                          plain=plain, out=out)
            jobs.append(job)
            phases.append(StreamPhase(
                name=f"T{tokens}-{'plain' if plain else 'reordered'}",
                scalars={"start": 0, "tokens": tokens, "heads": 1, "kv_heads": 1,
                         "plain": int(plain)},
                inputs={"q": streams["q"], "kv": streams["kv"]},
                expected={"out": streams["out"]}, expected_cycles=unit.expected_cycles(job),
                flags={"idle": 1}, settle_cycles=20))
    console.print(f"prefill attention: {len(phases)} runs on Verilator ...")
    results = run_stream_on(unit, StreamRun(phases), name="prefill_attention_bench",
                            run_dir=run_dir / "prefill")
    rows = []
    for job, result in zip(jobs, results):
        rows.append({"tokens": job.tokens, "schedule": "plain" if job.plain else "reordered",
                     "cycles": result.cycles, "expected_cycles": unit.expected_cycles(job)})
    return rows


def _decode_rows(contexts, rng, run_dir, console):
    p = KV260_ATTENTION
    unit = DecodeAttention(head_dim=p["head_dim"], lanes=p["lanes"], max_context=max(contexts),
                           max_heads=1, max_group=1)
    phases, jobs = [], []
    for context in contexts:
        position = context - 1
        q = _random(rng, (1, 1, p["head_dim"]))
        k, v = (_random(rng, (1, context, p["head_dim"])) for _ in range(2))
        out = unit.model(q, k, v, position)
        job = DecodeJob(position=position, heads=1, kv_heads=1)
        streams = att.decode_streams(q, k, v, position=position, lanes=p["lanes"], out=out)
        jobs.append(job)
        phases.append(StreamPhase(
            name=f"context{context}",
            scalars={"position": position, "heads": 1, "kv_heads": 1},
            inputs={n: streams[n] for n in ("q", "k", "v")}, expected={"out": streams["out"]},
            expected_cycles=unit.expected_cycles(job), settle_cycles=20))
    console.print(f"decode attention: {len(phases)} runs on Verilator ...")
    results = run_stream_on(unit, StreamRun(phases), name="decode_attention_bench",
                            run_dir=run_dir / "decode")
    return [{"context": job.position + 1, "cycles": r.cycles,
             "expected_cycles": unit.expected_cycles(job)} for job, r in zip(jobs, results)]


def _plot(prefill, decode, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for schedule, style in (("reordered", "o-"), ("plain", "s--")):
        pts = [r for r in prefill if r["schedule"] == schedule]
        a.plot([r["tokens"] for r in pts], [r["cycles"] for r in pts], style, label=schedule)
    a.set(yscale="log", xlabel="prompt tokens", ylabel="cycles (one KV head)",
          title="prefill attention, 4 PEs x 16 lanes, d = 64")
    a.legend()
    b.plot([r["context"] for r in decode], [r["cycles"] for r in decode], "o-")
    b.set(yscale="log", xlabel="context (positions)", ylabel="cycles (one head)",
          title="decode attention, 16 lanes, d = 64")
    for ax, xs in ((a, sorted({r["tokens"] for r in prefill})),
                   (b, [r["context"] for r in decode])):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_attention_benchmark(*, quick: bool = False, out_dir="trilut-bench",
                            console: Console | None = None) -> dict:
    """Run both benchmarks; print the tables, write ``attention.png``; return the rows."""
    console = console or Console()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lengths = [16, 32, 64] if quick else [16, 32, 64, 128, 256]
    contexts = [16, 64, 256] if quick else [16, 64, 256, 1024, 2048]
    start = time.perf_counter()
    prefill = _prefill_rows(lengths, rng, out_dir, console)
    decode = _decode_rows(contexts, rng, out_dir, console)

    table = Table(title="prefill attention (kv260 point, one KV head): reordered vs plain")
    for col in ("tokens", "reordered cycles", "plain cycles", "reordered / plain",
                "us at 250 MHz", "= expected_cycles"):
        table.add_column(col, justify="right")
    for tokens in lengths:
        r, p = (next(x for x in prefill if x["tokens"] == tokens and x["schedule"] == s)
                for s in ("reordered", "plain"))
        table.add_row(str(tokens), str(r["cycles"]), str(p["cycles"]),
                      f"{r['cycles'] / p['cycles']:.3f}", f"{r['cycles'] / CLOCK_MHZ:.1f}",
                      "yes" if r["cycles"] == r["expected_cycles"]
                      and p["cycles"] == p["expected_cycles"] else "NO")
    console.print(table)
    table = Table(title="decode attention (kv260 point, one head)")
    for col in ("context", "cycles", "us at 250 MHz", "cycles / position", "= expected_cycles"):
        table.add_column(col, justify="right")
    for r in decode:
        table.add_row(str(r["context"]), str(r["cycles"]), f"{r['cycles'] / CLOCK_MHZ:.1f}",
                      f"{r['cycles'] / r['context']:.2f}",
                      "yes" if r["cycles"] == r["expected_cycles"] else "NO")
    console.print(table)
    plot = out_dir / "attention.png"
    _plot(prefill, decode, plot)
    console.print(f"plot: {plot}  ({time.perf_counter() - start:.0f} s)")
    return {"prefill": prefill, "decode": decode, "plot": str(plot)}
