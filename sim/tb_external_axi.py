"""cocotb testbench: an AXI master (inside ``FlatAxiPorts``) against cocotbext-axi's AxiRam.

The case (``trilut.sim.runner.run_case``): ``kind`` ``"write"`` or ``"read"``, ``size``
(bytes of RAM), ``image`` (``[byte address, word]`` pairs preloaded), ``commands``
(``[byte address, words]``; for reads one such list per port of ``ports``, the stream-name
suffixes: ``[""]`` for one master, ``["0", "1", ...]`` for masters behind an arbiter),
``words`` (the data to write, for a write master), ``stall``
and ``seed`` (random idle/backpressure on our streams and on every AXI channel of the RAM,
through its pause generators), ``word_bytes``.

A write master: drive ``cmd`` and ``data``, take every ``done`` beat, then read the RAM's
contents back at every command's range. Read masters: drive each ``cmd``, take each
``data``'s words. Everything seen goes back to the caller, which compares it with the master's model;
the RAM itself raises on any burst it cannot serve (cocotbext-axi checks size, burst type and
4 KiB crossings with assertions, which fail the test).
"""

import cocotb
from cocotb.triggers import ClockCycles
from cocotbext.axi import AxiRamRead, AxiRamWrite, AxiReadBus, AxiWriteBus

from trilut.sim.runner import testbench_case, testbench_results
from trilut.sim.streams import StreamSink, StreamSource, reset, stalls, start_clock


@cocotb.test()
async def external_axi(dut):
    case = testbench_case()
    start_clock(dut.clk, 4)
    await reset(dut.clk, dut.rst)
    write = case["kind"] == "write"
    ram = (AxiRamWrite(AxiWriteBus.from_prefix(dut, "axi"), dut.clk, dut.rst, size=case["size"])
           if write else
           AxiRamRead(AxiReadBus.from_prefix(dut, "axi"), dut.clk, dut.rst, size=case["size"]))
    word_bytes = case["word_bytes"]
    for addr, word in case["image"]:
        ram.write(addr, word.to_bytes(word_bytes, "little"))
    stall, seed = case["stall"], case["seed"]
    if stall:
        channels = ([ram.aw_channel, ram.w_channel, ram.b_channel] if write
                    else [ram.ar_channel, ram.r_channel])
        for i, channel in enumerate(channels):
            channel.set_pause_generator(stalls(stall, seed + 200 + i))

    seen = {}
    if write:
        commands = case["commands"]
        cmd = StreamSource(dut, "cmd", dut.clk, stalls(stall, seed))
        for addr, length in commands:
            cmd.send_nowait(addr | length << case["addr_width"])
        timeout = 100 * (sum(n for _, n in commands) + len(commands)) + 10_000
        data = StreamSource(dut, "data", dut.clk, stalls(stall, seed + 1))
        for word in case["words"]:
            data.send_nowait(word)
        done = StreamSink(dut, "done", dut.clk, stalls(stall, seed + 2))
        seen["done"] = await done.recv_n(len(commands), timeout_cycles=timeout)
        await ClockCycles(dut.clk, 20)
        seen["extra_done"] = len(done.received) - len(commands)
        seen["written"] = [[int.from_bytes(ram.read(addr + i * word_bytes, word_bytes), "little")
                            for i in range(length)] for addr, length in commands]
    else:
        # One or more read ports: ``cmd{p}`` / ``data{p}`` for each suffix ``p`` of ``ports``
        # (``[""]`` for a lone master), ``commands[i]`` those of port ``i``.
        sinks = []
        for i, (port, commands) in enumerate(zip(case["ports"], case["commands"])):
            cmd = StreamSource(dut, f"cmd{port}", dut.clk, stalls(stall, seed + i))
            for addr, length in commands:
                cmd.send_nowait(addr | length << case["addr_width"])
            sinks.append(StreamSink(dut, f"data{port}", dut.clk, stalls(stall, seed + 100 + i)))
        total = sum(n for commands in case["commands"] for _, n in commands)
        timeout = 100 * total + 10_000
        seen["data"] = [await sink.recv_n(sum(n for _, n in commands), timeout_cycles=timeout)
                        for sink, commands in zip(sinks, case["commands"])]
        await ClockCycles(dut.clk, 40)
        seen["extra_data"] = [len(s.received) - len(d) for s, d in zip(sinks, seen["data"])]
    seen["error"] = int(dut.error.value)
    seen["idle"] = int(dut.idle.value)
    testbench_results(seen)
