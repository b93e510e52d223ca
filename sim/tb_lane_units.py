"""cocotb testbench for the element-wise lane units (``hdl/elementwise/{dequant,activation,residual}.py``).

One testbench for every unit: the cases file (``TRILUT_LANE_CASES``, written by
``tests/test_lane_units_verilator.py``) names the unit's input streams and its output stream,
and gives per case the top-level register inputs to set, every input stream's beats, the
expected output beats (from the unit's ``model()``) and a stall probability. Each input
stream gets its own seeded idle pattern on ``valid`` and the output its own backpressure
pattern on ``ready``. Every output beat is checked bit for bit, in order; after the last case
the output must stay silent (nothing duplicated). What the RTL produced and the handshake
cycles go to ``TRILUT_LANE_RESULTS``.
"""

import json
import os
from pathlib import Path

import cocotb
from cocotb.triggers import ClockCycles

from trilut.sim.streams import (StreamSink, StreamSource, reset, stalls, start_clock)

#: Cycles the output must stay silent after the last expected beat.
_QUIET_CYCLES = 40



def _set_ports(dut, ports: dict) -> None:
    for name, value in ports.items():
        getattr(dut, name).value = value


@cocotb.test()
async def lane_unit_cases(dut):
    spec = json.loads(Path(os.environ["TRILUT_LANE_CASES"]).read_text())
    start_clock(dut.clk, 4)                       # 250 MHz
    if spec["cases"]:
        _set_ports(dut, spec["cases"][0]["ports"])
    await reset(dut.clk, dut.rst)
    sources = {name: StreamSource(dut, name, dut.clk) for name in spec["inputs"]}
    sink = StreamSink(dut, spec["output"], dut.clk)

    report = []
    mismatches = []
    for case in spec["cases"]:
        # Register inputs change only between cases, with the unit drained.
        _set_ports(dut, case["ports"])
        seed, stall = case["seed"], case["stall"]
        first_in = {}
        for i, (name, source) in enumerate(sources.items()):
            source.set_pause(stalls(stall, seed + i))
            first_in[name] = source.accepted
            for beat in case["streams"][name]:
                source.send_nowait(int(beat, 16))
        sink.set_pause(stalls(stall, seed + len(sources)))
        first_out = len(sink.received)
        expected = [int(b, 16) for b in case["expected"]]
        beats = max([len(expected)] + [len(b) for b in case["streams"].values()])
        got = await sink.recv_n(len(expected), timeout_cycles=60 * beats + 2000)
        for source in sources.values():
            await source.wait_idle(timeout_cycles=10)
        entry = {"name": case["name"], "got": [format(b, "x") for b in got]}
        if not stall:
            # Transfer cycles, for the latency and throughput checks (stall-free cases only).
            entry["in_cycles"] = {name: s.handshake_cycles[first_in[name]:]
                                  for name, s in sources.items()}
            entry["out_cycles"] = sink.handshake_cycles[first_out:]
        report.append(entry)
        if got != expected:
            bad = next(j for j, (g, e) in enumerate(zip(got, expected)) if g != e)
            mismatches.append(f"{case['name']}: beat {bad} is {got[bad]:#x}, "
                              f"expected {expected[bad]:#x}")

    total = len(sink.received)
    sink.set_pause(None)
    await ClockCycles(dut.clk, _QUIET_CYCLES)
    extra = len(sink.received) - total
    Path(os.environ["TRILUT_LANE_RESULTS"]).write_text(
        json.dumps({"cases": report, "extra_beats": extra}))
    assert not mismatches, "; ".join(mismatches)
    assert extra == 0, f"{extra} output beats beyond the expected ones"
