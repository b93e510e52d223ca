"""cocotb testbench for ``trilut.hdl.ffn_block.FfnBlockHarness``.

Reads the case (written by ``trilut.sim.ffn_block_run``): the three layers' weight
words to place in DDR, the tile schedule (gate, up, down per row), the fp16 input rows and
both norms' weights as lane beats, the three weight scales, and the expected fp16 output
beats. Drives every stream from seeded pause generators, checks the output bit for bit and
that no AXI rule broke, and writes what it saw and the cycle count to the caller (``run_case``).
"""

import cocotb

from trilut.sim.runner import testbench_case, testbench_results
from trilut.sim.streams import (StreamSink, StreamSource, backdoor_load, reset, stalls,
                                start_clock)


@cocotb.test()
async def ffn_rows(dut):
    case = testbench_case()
    start_clock(dut.clk, 4)
    for name in ("gate_scale", "up_scale", "down_scale"):
        getattr(dut, name).value = case[name]
    await reset(dut.clk, dut.rst)

    await backdoor_load(dut, dut.clk, case["ddr"], addr_width=case["word_addr_width"])

    stall, seed = case["stall"], case["seed"]
    sources = {name: StreamSource(dut, name, dut.clk, stalls(stall, seed + i))
               for i, name in enumerate(("cmd", "tiles", "h", "norm_weight",
                                         "sub_norm_weight"))}
    y = StreamSink(dut, "y", dut.clk, stalls(stall, seed + 9))
    for name, source in sources.items():
        for beat in case[name]:
            source.send_nowait(int(beat, 16) if isinstance(beat, str) else beat)
    expected = [int(b, 16) for b in case["expected"]]
    got = await y.recv_n(len(expected), timeout_cycles=200 * len(case["cmd"]) * 64 + 200_000)
    start = min(s.handshake_cycles[0] for s in sources.values())
    testbench_results({
        "y": [format(b, "x") for b in got], "cycles": y.handshake_cycles[-1] - start + 1})
    assert int(dut.violations.value) == 0, "an AXI4 rule was broken"
    assert int(dut.error.value) == 0, "a read returned an error response"
    bad = [i for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    assert not bad, (f"{len(bad)} output beats differ, first {bad[0]}: "
                     f"{got[bad[0]]:#x} != {expected[bad[0]]:#x}")
