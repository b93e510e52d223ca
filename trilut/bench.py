"""Benchmark: TLMM engine cycles on Verilator against the ideal, with resource estimates.

For each engine configuration that the test suite verifies (and the kv260 design point) it
runs one M x K x N matmul with streams that never stall and prints:

* measured cycles (first weight beat taken .. last result beat out, cycle-accurate),
* the engine's ideal, one weight beat per cycle: M x ceil(K / GT) x ceil(N / C),
* efficiency = ideal / measured, and the padding efficiency M*K*N / (G*T*C) / ideal,
* the yosys resource estimate (LUT, FF, DSP, BRAM36, URAM) of that configuration.

Speed and size targets live here, never in timed tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.table import Table

from trilut.config import DdrSimConfig, EngineConfig, design_for_board
from trilut.host.layer_runs import TlmmCase, run_job, tlmm_job

__all__ = ["run_tlmm_benchmark"]


@dataclass(frozen=True)
class BenchPoint:
    name: str
    engine: EngineConfig
    shape: tuple[int, int, int]          # M, K, N
    quick_shape: tuple[int, int, int]


def _configs() -> list[BenchPoint]:
    kv260 = design_for_board("kv260").engine
    return [
        BenchPoint("small, as tested", EngineConfig(
            group_size=3, tables_per_step=2, columns_per_cycle=2, accumulator_depth=64,
            max_k=1536), (1, 1536, 512), (1, 384, 128)),
        BenchPoint("D=2 interlock, as tested", EngineConfig(
            group_size=2, tables_per_step=3, columns_per_cycle=3, accumulator_depth=2,
            max_k=1536, mirror=False), (1, 1536, 384), (1, 384, 96)),
        BenchPoint("G=4, as tested", EngineConfig(
            group_size=4, tables_per_step=2, columns_per_cycle=4, accumulator_depth=8,
            max_k=1536), (1, 1536, 512), (1, 384, 128)),
        # BitNet 0.73B q_proj (1536 x 1536) on TeLLMe's KV260 point, 4 prompt tokens.
        BenchPoint("kv260 (TeLLMe point)", kv260, (4, 1536, 1536), (1, 1536, 1536)),
    ]




def run_tlmm_benchmark(*, quick: bool = False, resources: bool = True,
                       console: Console | None = None) -> list[dict]:
    console = console or Console()
    rows = []
    points = _configs()
    with console.status("") as status:
        for i, point in enumerate(points, 1):
            m, k, n = point.quick_shape if quick else point.shape
            status.update(f"[{i}/{len(points)}] {point.name}: {m}x{k}x{n} on Verilator")
            rng = np.random.default_rng(i)
            case = TlmmCase("bench", rng.integers(-128, 128, (m, k)), rng.integers(-1, 2, (n, k)))
            e = point.engine
            from trilut.sim.transport import SimulationTransport
            start = time.perf_counter()
            (got,), (phase,) = run_job(SimulationTransport(), tlmm_job(e, [case]))
            seconds = time.perf_counter() - start
            ideal = e.ideal_cycles(m, k, n)
            row = {
                "config": f"{point.name}: G{e.group_size} T{e.tables_per_step} "
                          f"C{e.columns_per_cycle} D{e.accumulator_depth} "
                          f"{'mirror' if e.mirror else 'full'}", "m": m, "k": k, "n": n,
                "cycles": phase.cycles, "ideal_cycles": ideal,
                "efficiency": ideal / phase.cycles,
                "padding_efficiency": m * k * n / (e.block_k * e.columns_per_cycle) / ideal,
                # The testbench has already compared every beat with the level-2 model.
                "bit_exact": bool(np.array_equal(got, case.acts @ case.weights.T)),
                "build_and_sim_seconds": seconds,
            }
            if resources:
                from trilut.hdl import resources as res
                from trilut.hdl.linear.tlmm_engine import TlmmEngine, TlmmJob
                status.update(f"[{i}/{len(points)}] {point.name}: yosys resource estimate")
                report = res.estimate(TlmmEngine(e), name="tlmm_engine")
                row.update({key: report.total.get(key) for key in
                            ("lut", "ff", "dsp", "bram36", "uram")})
            rows.append(row)

    table = Table(title="TLMM engine: cycles on Verilator (no stalls) vs ideal")
    for col in ("config", "M x K x N", "cycles", "ideal", "ideal/measured", "padding eff.",
                "exact", "LUT", "FF", "DSP", "BRAM36", "URAM"):
        table.add_column(col, justify="left" if col == "config" else "right")
    for r in rows:
        def fmt(key):
            v = r.get(key)
            return "-" if v is None else f"{v:g}"
        table.add_row(r["config"], f"{r['m']}x{r['k']}x{r['n']}", str(r["cycles"]),
                      str(r["ideal_cycles"]), f"{r['efficiency']:.4f}",
                      f"{r['padding_efficiency']:.3f}", "yes" if r["bit_exact"] else "NO",
                      fmt("lut"), fmt("ff"), fmt("dsp"), fmt("bram36"), fmt("uram"))
    console.print(table)
    return rows


def run_ddr_linear_benchmark(*, quick: bool = False, console: Console | None = None) -> list[dict]:
    """The tiny model's layers fed from DDR (decode: one token): measured cycles against the
    weight-feed bound (weight words / DDR words per cycle) and the engine alone."""
    import torch

    from trilut.host.weight_image import compile_weight_image
    from trilut.models import numerics as nm
    from trilut.models.checkpoint import build_tiny_checkpoint, load_checkpoint
    from trilut.hdl.linear.tlmm_engine import TlmmEngine, TlmmJob
    from trilut.host.layer_runs import layer_from_ddr_job
    from trilut.sim.transport import SimulationTransport, expected_cycles

    console = console or Console()
    small = EngineConfig(group_size=3, tables_per_step=4, columns_per_cycle=4,
                         accumulator_depth=16, max_k=1024)
    points = [
        ("small G3 T4 C4, 64-bit DDR, full rate", small, 64, DdrSimConfig(latency=20), 2048),
        ("small G3 T4 C4, 64-bit DDR, half rate", small, 64, DdrSimConfig(latency=40, window=2), 512),
    ]
    if not quick:
        points.append(("kv260 G3 T28 C16, one 128-bit HP port", design_for_board("kv260").engine,
                       128, DdrSimConfig(latency=50), 512))
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_checkpoint(tmp)
        model = load_checkpoint(tmp)
    layers = ["layers.0.self_attn.q_proj", "layers.0.mlp.down_proj"]
    ids = torch.tensor(list(b"decode"))
    inputs = model.capture_linear_inputs(ids, layers)
    rows = []
    with console.status("") as status:
        for name, engine, word_bits, ddr, tile_beats in points:
            image = compile_weight_image(model, engine, ddr_word_bits=word_bits)
            for layer in layers:
                status.update(f"{name}: {layer} on Verilator")
                x = inputs[layer].reshape(-1, inputs[layer].shape[-1])[-1:]
                acts = nm.int8_quantize(x)[0].numpy().astype(np.int64)
                job = layer_from_ddr_job(image, layer, acts, ddr=ddr, tile_beats=tile_beats)
                (got,), (phase,) = run_job(SimulationTransport(), job)
                n, k = image.layer_values(layer).shape
                engine_cycles = TlmmEngine(engine).expected_cycles(TlmmJob(rows=1, k=k, n=n))
                feed = job.weight_words / ddr.words_per_cycle
                bound = max(engine_cycles, feed)
                rows.append({"config": name, "layer": layer, "shape": [n, k],
                             "cycles": phase.cycles,
                             "expected_cycles": expected_cycles(job.request, job.run.phases[0]),
                             "engine_cycles": engine_cycles,
                             "weight_feed_cycles": feed, "cycles_over_bound": phase.cycles / bound,
                             "bit_exact": bool(np.array_equal(got, job.expected[0]))})
    table = Table(title="Linear layer fed from DDR (1 token): cycles vs its model and the "
                        "weight-feed bound")
    for col in ("config", "layer (N x K)", "cycles", "= expected_cycles", "engine alone",
                "weight feed bound", "cycles / bound", "exact"):
        table.add_column(col, justify="left" if col in ("config", "layer (N x K)") else "right")
    for r in rows:
        table.add_row(r["config"], f"{r['layer']} ({r['shape'][0]} x {r['shape'][1]})",
                      str(r["cycles"]), "yes" if r["cycles"] == r["expected_cycles"] else "NO",
                      str(r["engine_cycles"]), f"{r['weight_feed_cycles']:g}",
                      f"{r['cycles_over_bound']:.3f}", "yes" if r["bit_exact"] else "NO")
    console.print(table)
    return rows


def run_ffn_benchmark(*, quick: bool = False, console: Console | None = None) -> list[dict]:
    """The tiny model's FFN block (256 -> 640 -> 256, relu2) on Verilator, one token, weights
    from DDR: cycles per block against the weight-feed bound."""
    import tempfile

    import torch

    from trilut.host.weight_image import compile_weight_image
    from trilut.models import numerics as nm
    from trilut.models.checkpoint import build_tiny_checkpoint, load_checkpoint
    from trilut.host.layer_runs import ffn_job
    from trilut.sim.transport import SimulationTransport

    console = console or Console()
    points = [
        ("G3 T4 C4 D16, 64-bit DDR, full rate", EngineConfig(
            group_size=3, tables_per_step=4, columns_per_cycle=4, accumulator_depth=16,
            max_k=1024), 64, DdrSimConfig(latency=20)),
        ("G3 T4 C4 D16, 64-bit DDR, half rate", EngineConfig(
            group_size=3, tables_per_step=4, columns_per_cycle=4, accumulator_depth=16,
            max_k=1024), 64, DdrSimConfig(latency=40, window=2)),
    ]
    if not quick:
        points.append(("G3 T8 C8 D16, 128-bit DDR, full rate", EngineConfig(
            group_size=3, tables_per_step=8, columns_per_cycle=8, accumulator_depth=16,
            max_k=1024), 128, DdrSimConfig(latency=20)))
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_checkpoint(tmp)
        model = load_checkpoint(tmp)
    h = nm.fp16_from_float(model.embed_tokens.weight[torch.tensor([5])].detach().double().numpy())
    rows = []
    with console.status("") as status:
        for name, engine, word_bits, ddr in points:
            status.update(f"FFN block, {name}, on Verilator")
            image = compile_weight_image(model, engine, ddr_word_bits=word_bits)
            job = ffn_job(image, h, activation="relu2", tile_beats=512, ddr=ddr, eps=1e-5)
            (y,), (phase,) = run_job(SimulationTransport(), job)
            feed = job.weight_words / ddr.words_per_cycle
            rows.append({"config": name, "cycles": phase.cycles, "weight_words": job.weight_words,
                         "weight_feed_cycles": feed, "ratio": phase.cycles / feed,
                         "bit_exact": bool(np.array_equal(y, job.expected[0]))})
    table = Table(title="FFN block (tiny model, 1 token) fed from DDR: cycles vs weight-feed bound")
    for col in ("config", "cycles", "weight words", "weight-feed bound", "cycles / bound", "exact"):
        table.add_column(col, justify="left" if col == "config" else "right")
    for r in rows:
        table.add_row(r["config"], str(r["cycles"]), str(r["weight_words"]),
                      f"{r['weight_feed_cycles']:g}", f"{r['ratio']:.3f}",
                      "yes" if r["bit_exact"] else "NO")
    console.print(table)
    return rows
