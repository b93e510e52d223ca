"""TLMM engine benchmark: measured cycles on Verilator vs ideal, with yosys resources.

    python benchmarks/tlmm_engine.py [--quick] [--no-resources] [--json]

Same as ``trilut bench``.
"""

import sys

from trilut.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
