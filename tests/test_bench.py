"""The benchmark commands run (their quick forms): every row bit-exact, and the DDR-fed
layers at their exact expected_cycles. The figures themselves are the benchmarks' to report."""

import pytest
from rich.console import Console

from trilut.bench import run_ddr_linear_benchmark, run_ffn_benchmark

pytestmark = pytest.mark.rtl


def test_quick_benchmarks_run_bit_exact():
    console = Console(quiet=True)
    linear = run_ddr_linear_benchmark(quick=True, console=console)
    assert linear and all(r["bit_exact"] and r["cycles"] == r["expected_cycles"] for r in linear)
    ffn = run_ffn_benchmark(quick=True, console=console)
    assert ffn and all(r["bit_exact"] for r in ffn)
