"""cocotb testbench for the row units (``hdl/elementwise/{rmsnorm,act_quant}.py``): RmsNorm and ActQuantizer.

Reads the cases the pytest side wrote (``TRILUT_ROW_CASES``): for each, the shape inputs, the
input beat streams, the number of beats expected on each output stream and the stall
probability. Drives every input stream and backpressures every output stream from seeded
pause generators, and writes what each output stream carried and the cycle counts to
``TRILUT_ROW_RESULTS``; the pytest side compares them with the models bit for bit.

``activation_rows`` draws the test rows; the Amaranth-simulator tests use it too.
"""

import json
import os
from pathlib import Path

import cocotb
from cocotb.triggers import ClockCycles
import numpy as np

from trilut.models import fp16 as fp
from trilut.sim.streams import (StreamSink, StreamSource, reset, stalls, start_clock)

__all__ = ["activation_rows", "edge_rows"]


def activation_rows(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """fp16 codes ``[rows, n]`` drawn like real activations: normal values times a per-row
    scale spread over decades (exponential in log2), so rows differ in magnitude as residual
    streams and linear outputs do; about one row in three gets an outlier channel."""
    scale = np.exp2(rng.normal(0.0, 3.0, (rows, 1)))
    x = rng.normal(0.0, 1.0, (rows, n)) * scale
    for r in range(rows):
        if rng.random() < 0.35:
            x[r, rng.integers(n)] *= rng.choice([-1, 1]) * rng.uniform(50, 2000)
    return fp.fp16_from_float(np.clip(x, -65504, 65504))


def edge_rows(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """The named edge rows (each ``[1, n]`` fp16 codes)."""
    base = rng.normal(0.0, 1.0, n)
    outlier = base.copy()
    outlier[rng.integers(n)] = 3000.0
    tiny = rng.normal(0.0, 1.0, n) * 1e-4            # straddles fp16's smallest normal
    signed_max = np.where(rng.random(n) < 0.5, -65504.0, 65504.0)
    zeros = np.zeros(n, np.uint16)
    zeros[::2] = 0x8000                               # +0 and -0
    subnormal = rng.integers(1, 0x400, n).astype(np.uint16) | np.where(
        rng.random(n) < 0.5, 0x8000, 0).astype(np.uint16)
    ties = fp.fp16_from_float(np.resize([127.0, -127.0, 63.5, -0.5, 1.5, 2.5], n))
    return {
        "outlier": fp.fp16_from_float(outlier)[None],
        "zeros": zeros[None],
        "fp16-max": fp.fp16_from_float(signed_max)[None],
        "tiny": fp.fp16_from_float(tiny)[None],
        "subnormals": subnormal[None],
        "ties": ties[None],
    }


@cocotb.test()
async def row_unit_cases(dut):
    spec = json.loads(Path(os.environ["TRILUT_ROW_CASES"]).read_text())
    start_clock(dut.clk, 4)                       # 250 MHz
    for port, value in spec["cases"][0]["shapes"].items():
        getattr(dut, port).value = value
    await reset(dut.clk, dut.rst)
    sources = {name: StreamSource(dut, name, dut.clk) for name in spec["inputs"]}
    sinks = {name: StreamSink(dut, name, dut.clk) for name in spec["outputs"]}

    report = []
    for case in spec["cases"]:
        # Shapes change only between cases, with the unit idle (its documented contract).
        for port, value in case["shapes"].items():
            getattr(dut, port).value = value
        seed, stall = case["seed"], case["stall"]
        for i, source in enumerate(sources.values()):
            source.set_pause(stalls(stall, seed + i))
        for i, sink in enumerate(sinks.values()):
            sink.set_pause(stalls(stall, seed + 100 + i))
        first = {name: source.accepted for name, source in sources.items()}
        for name, beats in case["inputs"].items():
            for b in beats:
                sources[name].send_nowait(int(b, 16))
        total_in = sum(len(b) for b in case["inputs"].values())
        got = {}
        for name, count in case["outputs"].items():
            timeout = 60 * (total_in + count) + 2000
            got[name] = await sinks[name].recv_n(count, timeout_cycles=timeout)
        for source in sources.values():
            await source.wait_idle(timeout_cycles=10)
        start = min(sources[name].handshake_cycles[first[name]] for name in sources
                    if case["inputs"].get(name))
        end = max(sinks[name].handshake_cycles[-1] for name in case["outputs"])
        report.append({"name": case["name"],
                       "outputs": {k: [format(b, "x") for b in v] for k, v in got.items()},
                       "cycles": end - start + 1})
    Path(os.environ["TRILUT_ROW_RESULTS"]).write_text(json.dumps({"cases": report}))
    # Nothing more may come out: no beat duplicated or invented after the last case.
    await ClockCycles(dut.clk, 100)
    for name, sink in sinks.items():
        expected = sum(case["outputs"][name] for case in spec["cases"])
        assert len(sink.received) == expected, \
            f"{name}: {len(sink.received) - expected} extra beats after the last case"
