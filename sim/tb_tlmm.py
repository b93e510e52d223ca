"""cocotb testbench for ``trilut.hdl.tlmm_engine.TlmmEngine``.

Reads the cases that ``trilut.sim.tlmm_run`` wrote (through ``run_case``): for each, the
shape inputs, the activation and weight beat streams, the expected result beats (from the
numerics model) and the stall probability. Drives both input streams and backpressures the
output from seeded pause generators, checks every result beat bit for bit (nothing dropped,
duplicated or reordered), and writes what it saw and the cycle counts to
the caller (``run_case``).
"""

import cocotb

from trilut.sim.runner import testbench_case, testbench_results
from trilut.sim.streams import (StreamSink, StreamSource, reset, stalls, start_clock)


@cocotb.test()
async def tlmm_cases(dut):
    spec = testbench_case()
    start_clock(dut.clk, 4)                       # 250 MHz
    dut.k_blocks.value = 1
    dut.n_groups.value = 1
    await reset(dut.clk, dut.rst)
    weights = StreamSource(dut, "weights", dut.clk)
    acts = StreamSource(dut, "acts", dut.clk)
    results = StreamSink(dut, "results", dut.clk)

    report = []
    mismatches = []
    for i, case in enumerate(spec["cases"]):
        # Shapes change only between matmuls, with the engine idle (its documented contract).
        dut.k_blocks.value = case["k_blocks"]
        dut.n_groups.value = case["n_groups"]
        seed, stall = case["seed"], case["stall"]
        weights.set_pause(stalls(stall, seed))
        acts.set_pause(stalls(stall, seed + 1))
        results.set_pause(stalls(stall, seed + 2))
        first_weight = weights.accepted
        first_result = len(results.handshake_cycles)
        expected = [int(b, 16) for b in case["expected"]]
        for b in case["weights"]:
            weights.send_nowait(int(b, 16))
        for b in case["acts"]:
            acts.send_nowait(int(b, 16))
        timeout = 50 * (len(case["weights"]) + len(expected)) + 1000
        got = await results.recv_n(len(expected), timeout_cycles=timeout)
        await weights.wait_idle(timeout_cycles=10)
        await acts.wait_idle(timeout_cycles=10)
        start = weights.handshake_cycles[first_weight]
        end = results.handshake_cycles[first_result + len(expected) - 1]
        report.append({"name": case["name"], "results": [format(b, "x") for b in got],
                       "cycles": end - start + 1})
        if got != expected:
            bad = next(j for j, (g, e) in enumerate(zip(got, expected)) if g != e)
            mismatches.append(f"{case['name']}: result beat {bad} is {got[bad]:#x}, "
                              f"expected {expected[bad]:#x}")
    testbench_results({"cases": report})
    assert not mismatches, "; ".join(mismatches)
