"""cocotb testbench: cocotbext-axi's ``AxiLiteMaster`` against our ``AxiLiteSlave``.

The case (``trilut.sim.runner.run_case``): ``ops``, a list of ``["w", address, data hex]``
(data as bytes in hex; the master derives ``wstrb`` from the address and length) and
``["r", address, length]``; ``ports``, the output ports to sample at the end (rw values and
the harness's pulse counters); ``stall`` and ``seed`` (random pauses on all five channels,
through cocotbext-axi's pause generators, so AW and W reach the slave in varying order).

The results: ``"ops"``, one entry per op, ``[resp]`` for a write and ``[data hex, resp]``
for a read (cocotbext-axi returns the response, it does not raise on SLVERR), and
``"ports"``, each sampled port's value. The caller compares both with the slave's model.
"""

import cocotb
from cocotb.triggers import ClockCycles
from cocotbext.axi import AxiLiteBus, AxiLiteMaster

from trilut.sim.runner import testbench_case, testbench_results
from trilut.sim.streams import reset, stalls, start_clock


@cocotb.test()
async def axil_register_map(dut):
    case = testbench_case()
    start_clock(dut.clk, 4)
    master = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axil"), dut.clk, dut.rst)
    await reset(dut.clk, dut.rst)
    if case["stall"]:
        channels = [master.write_if.aw_channel, master.write_if.w_channel,
                    master.write_if.b_channel, master.read_if.ar_channel,
                    master.read_if.r_channel]
        for i, channel in enumerate(channels):
            channel.set_pause_generator(stalls(case["stall"], case["seed"] + i))
    seen = []
    for op in case["ops"]:
        if op[0] == "w":
            resp = await master.write(op[1], bytes.fromhex(op[2]))
            seen.append([int(resp.resp)])
        else:
            resp = await master.read(op[1], op[2])
            seen.append([resp.data.hex(), int(resp.resp)])
    await ClockCycles(dut.clk, 5)
    testbench_results({"ops": seen,
                       "ports": {name: int(getattr(dut, name).value) for name in case["ports"]}})
