"""Attention benchmark: the prefill unit (reordered vs plain schedule) over prompt lengths and
the decode unit over context lengths, on Verilator, against their cycle models; a PNG plot.

    python benchmarks/attention.py [--quick] [--out DIR]

The same runs are part of ``trilut bench``.
"""

import argparse

from trilut.attention_bench import run_attention_benchmark

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="trilut-bench")
    args = parser.parse_args()
    run_attention_benchmark(quick=args.quick, out_dir=args.out)
