"""cocotb testbench for ``trilut.hdl.linear_datapath.WeightFedTlmmHarness``.

Reads the run that ``trilut.sim.linear_datapath_run`` wrote (through ``run_case``): the DDR
words to place through the backdoor, the AXI read and buffer tile commands, the activation
beats and the expected result beats. Places the image, then drives the three command/data
streams and backpressures the results from seeded pause generators; checks every result beat
bit for bit, that no AXI rule was broken and no read failed, and writes what it saw and the
cycle count to the caller (``run_case``).
"""

import cocotb

from trilut.sim.runner import testbench_case, testbench_results
from trilut.sim.streams import (StreamSink, StreamSource, backdoor_load, reset, stalls,
                                start_clock)


@cocotb.test()
async def weight_fed_matmul(dut):
    case = testbench_case()
    start_clock(dut.clk, 4)
    dut.k_blocks.value = case["k_blocks"]
    dut.n_groups.value = case["n_groups"]
    await reset(dut.clk, dut.rst)

    # Place the weight image: Python per word, once, before the timed run.
    await backdoor_load(dut, dut.clk, case["ddr"], addr_width=case["word_addr_width"])

    stall, seed = case["stall"], case["seed"]
    cmd = StreamSource(dut, "cmd", dut.clk, stalls(stall, seed))
    tiles = StreamSource(dut, "tiles", dut.clk, stalls(stall, seed + 1))
    acts = StreamSource(dut, "acts", dut.clk, stalls(stall, seed + 2))
    results = StreamSink(dut, "results", dut.clk, stalls(stall, seed + 3))
    for c in case["cmd"]:
        cmd.send_nowait(c)
    for t in case["tiles"]:
        tiles.send_nowait(t)
    for a in case["acts"]:
        acts.send_nowait(int(a, 16))
    expected = [int(b, 16) for b in case["expected"]]
    got = await results.recv_n(len(expected), timeout_cycles=200 * len(expected) + 100_000)
    start = min(cmd.handshake_cycles[0], tiles.handshake_cycles[0])
    cycles = results.handshake_cycles[-1] - start + 1
    testbench_results({
        "results": [format(b, "x") for b in got], "cycles": cycles,
        "violations": int(dut.violations.value), "error": int(dut.error.value)})
    assert int(dut.violations.value) == 0, "an AXI4 rule was broken"
    assert int(dut.error.value) == 0, "a read returned an error response"
    bad = [i for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    assert not bad, f"{len(bad)} result beats differ, first {bad[0]}: {got[bad[0]]:#x} != {expected[bad[0]]:#x}"
