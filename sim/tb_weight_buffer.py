"""cocotb testbench for ``trilut.hdl.memory.weight_buffer.WeightBuffer``.

Reads the cases that ``tests/test_weight_buffer_verilator.py`` wrote (``TRILUT_WB_CASES``):
for each, the tile commands, the DDR words, the expected beats (from ``WeightBuffer.model``)
and the idle/backpressure probabilities of the three streams. Drives ``tiles`` and ``fill``
and receives ``beats`` under seeded pause generators, checks every beat bit for bit (nothing
dropped, duplicated or reordered; the sink also checks valid/payload stay put while stalled),
and writes what it saw and the cycle counts to ``TRILUT_WB_RESULTS``.
"""

import json
import os
from pathlib import Path

import cocotb
from cocotb.triggers import ClockCycles

from trilut.sim.streams import (StreamSink, StreamSource, reset, stalls, start_clock)



@cocotb.test()
async def weight_buffer_cases(dut):
    spec = json.loads(Path(os.environ["TRILUT_WB_CASES"]).read_text())
    start_clock(dut.clk, 4)                       # 250 MHz
    await reset(dut.clk, dut.rst)
    tiles = StreamSource(dut, "tiles", dut.clk)
    fill = StreamSource(dut, "fill", dut.clk)
    beats = StreamSink(dut, "beats", dut.clk)

    report = []
    mismatches = []
    for case in spec["cases"]:
        seed = case["seed"]
        tiles.set_pause(stalls(case["tiles_idle"], seed))
        fill.set_pause(stalls(case["fill_idle"], seed + 1))
        beats.set_pause(stalls(case["beats_stall"], seed + 2))
        first_command = len(tiles.handshake_cycles)
        first_word = len(fill.handshake_cycles)
        first_beat = len(beats.handshake_cycles)
        expected = [int(b, 16) for b in case["expected"]]
        for command in case["commands"]:
            tiles.send_nowait(command)
        for word in case["words"]:
            fill.send_nowait(int(word, 16))
        timeout = 20 * (len(case["words"]) + len(expected)) + 1000
        got = await beats.recv_n(len(expected), timeout_cycles=timeout)
        await tiles.wait_idle(timeout_cycles=10)
        await fill.wait_idle(timeout_cycles=10)
        start = tiles.handshake_cycles[first_command]
        end = beats.handshake_cycles[first_beat + len(expected) - 1]
        report.append({
            "name": case["name"],
            "beats": [format(b, "x") for b in got],
            # First command taken .. last beat out, inclusive.
            "cycles": end - start + 1,
            "last_word_cycle": fill.handshake_cycles[first_word + len(case["words"]) - 1] - start,
            "first_beat_cycle": beats.handshake_cycles[first_beat] - start,
        })
        if got != expected:
            bad = next(j for j, (g, e) in enumerate(zip(got, expected)) if g != e)
            mismatches.append(f"{case['name']}: beat {bad} is {got[bad]:#x}, "
                              f"expected {expected[bad]:#x}")
        # Nothing more may come out once every replay is out.
        await ClockCycles(dut.clk, 16)
        if len(beats.received) != first_beat + len(expected):
            mismatches.append(f"{case['name']}: {len(beats.received) - first_beat} beats out, "
                              f"expected {len(expected)}")
    Path(os.environ["TRILUT_WB_RESULTS"]).write_text(json.dumps({"cases": report}))
    assert not mismatches, "; ".join(mismatches)
