"""cocotb testbench for ``trilut.sim.ddr_model.DdrReadHarness`` (AxiReadMaster + DdrModel).

Reads the spec that ``tests/test_axi_read_verilator.py`` wrote (``TRILUT_AXI_SPEC``): the
memory image, then phases of read commands, each with the words the master's model expects,
the bursts it must issue, and the idle / backpressure probabilities for the ``cmd`` and
``data`` streams. Python runs per transaction and per stream beat only; the memory, its
latency and its bandwidth run inside the simulated design.

Per phase it checks that every word arrives exactly once, in order, bit for bit; that the AR
channel carried exactly the expected bursts, none longer than 256 beats or across a 4 KiB
boundary; and that the master is idle afterwards. At the end it checks the harness's sticky
flags (AXI rule violations seen by the DDR model, R beats stalled by the master, error
responses). It writes what it saw, with cycle counts, to ``TRILUT_AXI_RESULTS``.
"""

import json
import os
from pathlib import Path

import cocotb
from cocotb.triggers import ClockCycles

from trilut.sim.streams import (StreamSink, StreamSource, reset, stalls, start_clock)

PAGE_BYTES = 4096



class TB:
    """Clock, reset and the four stream drivers of the harness, bound by port prefix."""

    def __init__(self, dut, spec):
        self.dut = dut
        self.addr_width = spec["addr_width"]
        self.word_addr_width = spec["word_addr_width"]
        self.bytes_per_word = spec["data_width"] // 8

    async def start(self):
        dut = self.dut
        start_clock(dut.clk, 4)                         # 250 MHz
        await reset(dut.clk, dut.rst)
        self.load = StreamSource(dut, "load", dut.clk)
        self.cmd = StreamSource(dut, "cmd", dut.clk)
        self.data = StreamSink(dut, "data", dut.clk)
        self.ar = StreamSink(dut, "ar_monitor", dut.clk)

    async def preload(self, image: list[int]) -> None:
        shift = self.word_addr_width
        await self.load.send_all(((word << shift) | i for i, word in enumerate(image)),
                                 timeout_cycles=len(image) + 10)

    def ar_bursts(self, first: int) -> list[tuple[int, int]]:
        """(araddr, beats) of every AR seen since index ``first``."""
        mask = (1 << self.addr_width) - 1
        return [(beat & mask, (beat >> self.addr_width) + 1) for beat in self.ar.received[first:]]


@cocotb.test()
async def axi_read_phases(dut):
    spec = json.loads(Path(os.environ["TRILUT_AXI_SPEC"]).read_text())
    tb = TB(dut, spec)
    await tb.start()
    await tb.preload([int(word, 16) for word in spec["image"]])

    report, problems = [], []
    for number, phase in enumerate(spec["phases"]):
        name = phase["name"]
        tb.cmd.set_pause(stalls(phase["cmd_idle"], 2 * number + 1))
        tb.data.set_pause(stalls(phase["data_stall"], 2 * number + 2))
        first_cmd, first_word = tb.cmd.accepted, len(tb.data.received)
        first_ar = len(tb.ar.received)
        expected = [int(word, 16) for word in phase["expected"]]
        for addr, length in phase["commands"]:
            tb.cmd.send_nowait(addr | length << tb.addr_width)
        timeout = 20 * len(expected) + 100 * len(phase["commands"]) + 2000
        got = await tb.data.recv_n(len(expected), timeout_cycles=timeout)
        await tb.cmd.wait_idle(timeout_cycles=100)
        # Let anything extra (a duplicated beat, a stray burst) surface before counting again.
        await ClockCycles(dut.clk, 3 * spec["latency"] + 20)
        extra = len(tb.data.received) - first_word - len(expected)
        bursts = tb.ar_bursts(first_ar)

        if extra:
            problems.append(f"{name}: {extra} extra words after the last expected one")
        if got != expected:
            bad = next(i for i, (g, e) in enumerate(zip(got, expected)) if g != e)
            problems.append(f"{name}: word {bad} is {got[bad]:#x}, expected {expected[bad]:#x}")
        for addr, beats in bursts:
            last_byte = addr + beats * tb.bytes_per_word - 1
            if beats > 256 or addr // PAGE_BYTES != last_byte // PAGE_BYTES:
                problems.append(f"{name}: burst of {beats} beats at {addr:#x} breaks AXI4 rules")
        if bursts != [tuple(b) for b in phase["bursts"]]:
            problems.append(f"{name}: AR bursts {bursts[:6]}... differ from the expected "
                            f"{phase['bursts'][:6]}...")
        if int(dut.idle.value) != 1:
            problems.append(f"{name}: the master is not idle after its last word")

        data_cycles = tb.data.handshake_cycles[first_word:first_word + len(expected)]
        cmd_cycles = tb.cmd.handshake_cycles[first_cmd:]
        report.append({
            "name": name,
            "words": [format(word, "x") for word in got],
            "bursts": bursts,
            "cycles": (data_cycles[-1] - cmd_cycles[0] + 1) if data_cycles else 0,
            "first_word_cycle": data_cycles[0] - cmd_cycles[0] if data_cycles else None,
            "data_span": (data_cycles[-1] - data_cycles[0]) if data_cycles else 0,
        })

    flags = {"violations": int(dut.violations.value), "r_stalled": int(dut.r_stalled.value),
             "error": int(dut.error.value)}
    for flag, value in flags.items():
        if value:
            problems.append(f"{flag} = {value:#x}")
    Path(os.environ["TRILUT_AXI_RESULTS"]).write_text(
        json.dumps({"phases": report, "flags": flags}))
    assert not problems, "; ".join(problems)
