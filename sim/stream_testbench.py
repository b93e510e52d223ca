"""The one cocotb testbench: any block, driven by a ``trilut.transport.StreamRun``.

Started by ``trilut.sim.transport.SimulationTransport`` through ``run_case``; the case is the
run as JSON plus where the DDR backdoor is (``load``: stream prefix and word-address width).

After reset it writes the run's DDR words through the backdoor (Python per word, once, before
anything is timed), then for each phase: sets the held scalar inputs, gives every input
stream its seeded idle pattern and every output stream its seeded backpressure pattern
(``stall`` probability; none when 0), queues every input beat, and receives as many beats on
each output as the phase expects. Each beat is compared with the expected one, in order; the
phase's cycles (first input beat taken .. last output beat, inclusive) must equal its
``expected_cycles`` when it has no stalls. After the last phase every output must stay silent
for ``quiet_cycles`` (nothing dropped is made up for by a duplicate, nothing extra follows the
last beat), and every ``clean_flags`` port must read zero. Everything seen goes back to the
caller, and then the test fails if anything differed.
"""

import cocotb
from cocotb.triggers import ClockCycles

from trilut.sim.runner import testbench_case, testbench_results
from trilut.sim.streams import StreamSink, StreamSource, reset, stalls, start_clock

#: Seeds of the output streams' backpressure patterns start here (inputs count from 0).
_SINK_SEED_OFFSET = 100


def _set_scalars(dut, scalars: dict) -> None:
    for name, value in scalars.items():
        getattr(dut, name).value = value


@cocotb.test()
async def stream_run(dut):
    case = testbench_case()
    run = case["run"]
    phases = run["phases"]
    start_clock(dut.clk, 4)                       # 250 MHz
    _set_scalars(dut, phases[0]["scalars"])
    await reset(dut.clk, dut.rst)

    if run["memory"]:
        load = StreamSource(dut, case["load"]["prefix"], dut.clk)
        shift = case["load"]["addr_width"]
        for addr, word in run["memory"]:
            load.send_nowait(addr | word << shift)
        await load.wait_idle(timeout_cycles=len(run["memory"]) + 100)

    inputs = sorted({name for p in phases for name in p["inputs"]})
    outputs = sorted({name for p in phases for name in p["expected"]})
    sources = {name: StreamSource(dut, name, dut.clk) for name in inputs}
    sinks = {name: StreamSink(dut, name, dut.clk) for name in outputs}

    report, problems = [], []
    for phase in phases:
        name, stall, seed = phase["name"], phase["stall"], phase["seed"]
        # Held inputs change only between phases, with the block drained.
        _set_scalars(dut, phase["scalars"])
        for i, source in enumerate(sources.values()):
            source.set_pause(stalls(stall, seed + i))
        for i, sink in enumerate(sinks.values()):
            if sink.stallable:
                sink.set_pause(stalls(stall, seed + _SINK_SEED_OFFSET + i))
        first_in = {n: len(s.handshake_cycles) for n, s in sources.items()}
        first_out = {n: len(s.handshake_cycles) for n, s in sinks.items()}
        begin = sources[inputs[0]].cycle if inputs else sinks[outputs[0]].cycle
        for stream, beats in phase["inputs"].items():
            for beat in beats:
                sources[stream].send_nowait(beat)
        beats = sum(map(len, phase["inputs"].values())) + sum(map(len, phase["expected"].values()))
        timeout = 400 * beats + 200_000
        got = {}
        for stream, expected in phase["expected"].items():
            got[stream] = await sinks[stream].recv_n(len(expected), timeout_cycles=timeout)
        for source in sources.values():
            await source.wait_idle(timeout_cycles=timeout)

        starts = [s.handshake_cycles[first_in[n]] for n, s in sources.items()
                  if len(s.handshake_cycles) > first_in[n]]
        start = min(starts) if starts else begin
        ends = [sinks[n].handshake_cycles[-1] for n in phase["expected"] if phase["expected"][n]]
        cycles = max(ends) - start + 1 if ends else 0
        handshakes = {n: [c - start for c in s.handshake_cycles[first_in[n]:]]
                      for n, s in sources.items()}
        handshakes.update({n: [c - start for c in s.handshake_cycles[first_out[n]:]]
                           for n, s in sinks.items()})
        report.append({"name": name, "outputs": got, "cycles": cycles,
                       "handshakes": handshakes})

        for stream, expected in phase["expected"].items():
            seen = got[stream]
            if seen != expected:
                bad = next(j for j, (g, e) in enumerate(zip(seen, expected)) if g != e)
                problems.append(f"{name}: {stream} beat {bad} of {len(expected)} is "
                                f"{seen[bad]:#x}, expected {expected[bad]:#x}")
        if not stall and phase["expected_cycles"] is not None and cycles != phase["expected_cycles"]:
            problems.append(f"{name}: {cycles} cycles without stalls, expected exactly "
                            f"{phase['expected_cycles']}")

    totals = {n: len(s.received) for n, s in sinks.items()}
    for sink in sinks.values():
        if sink.stallable:
            sink.set_pause(None)
    await ClockCycles(dut.clk, run["quiet_cycles"])
    for n, s in sinks.items():
        if len(s.received) != totals[n]:
            problems.append(f"{n}: {len(s.received) - totals[n]} beats after the last "
                            "expected one")
    flags = {flag: int(getattr(dut, flag).value) for flag in run["clean_flags"]}
    problems += [f"{flag} = {value:#x} at the end, expected 0"
                 for flag, value in flags.items() if value]
    testbench_results({"phases": report, "flags": flags})
    assert not problems, "; ".join(problems)
