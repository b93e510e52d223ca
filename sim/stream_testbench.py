"""The one cocotb testbench: any block, driven by a ``trilut.transport.StreamRun``.

Started by ``trilut.sim.transport.SimulationTransport`` (or ``run_stream_on``) through
``run_case``; the case is the run as JSON plus where the DDR backdoor is (``load``: stream
prefix and word-address width).

After reset it writes the run's DDR words through the backdoor (Python per word, once, before
anything is timed), then for each phase: sets the held scalar inputs, gives every input stream
its seeded idle pattern and every output stream its seeded backpressure pattern (``stall``
probability, or the stream's own in ``stream_stalls``; none when 0; an output without
``ready``, such as ``DdrHarness.ar_monitor``, is only watched), queues every input beat, and
receives as many beats on each output as the phase expects. Each beat is compared with the
expected one, in order; the phase's cycles (first input beat taken .. last output beat,
inclusive) must equal its ``expected_cycles`` when no stream stalls. A phase with
``settle_cycles`` then releases the backpressure and watches every output stay silent that long
(a beat seen there is reported with this phase, and not handed to the next one), and then every
port in its ``flags`` must read the given value. An output that does not carry its expected
beats within the phase's timeout (``timeout_cycles``, else a bound from the beat count) ends
the run with that phase and stream named. After the last phase every output must stay silent
for ``quiet_cycles`` (nothing dropped is made up for by a duplicate, nothing extra follows the
last beat), and every ``clean_flags`` port must read zero. Everything seen goes back to the
caller, and then the test fails, with an ``AssertionError`` naming the phase, the stream and
the beat of each problem, if anything differed.
"""

import cocotb
from cocotb.triggers import ClockCycles

from trilut.sim.runner import testbench_case, testbench_results
from trilut.sim.streams import (StreamSink, StreamSource, StreamTimeout, reset, stalls,
                                start_clock)

#: Seeds of the output streams' backpressure patterns start here (inputs count from 0).
_SINK_SEED_OFFSET = 100


def _set_scalars(dut, scalars: dict) -> None:
    for name, value in scalars.items():
        getattr(dut, name).value = value


def _beats(count: int) -> str:
    return f"{count} beat" + ("s" if count != 1 else "")


async def _silence(dut, sinks: dict, taken: dict, cycles: int) -> dict:
    """Release every output's backpressure for ``cycles`` cycles; return how many beats each
    output carried beyond the ``taken`` ones expected so far (before or during the wait),
    and hand those out, so that no later phase receives them."""
    for sink in sinks.values():
        if sink.stallable:
            sink.set_pause(None)
    await ClockCycles(dut.clk, cycles)
    extra = {}
    for n, sink in sinks.items():
        count = len(sink.received) - taken[n]
        if count:
            await sink.recv_n(count)
            taken[n] += count
            extra[n] = count
    return extra


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

    report, problems, stuck = [], [], False
    taken = {n: 0 for n in sinks}           # beats handed out by each sink so far
    for phase in phases:
        name, seed = phase["name"], phase["seed"]
        own = phase.get("stream_stalls") or {}
        stall = {n: own.get(n, phase["stall"]) for n in (*sources, *sinks)}
        stalled = any(stall.values())
        problems += [f"{name}: stream_stalls names {n!r}, which is no stream of this run"
                     for n in own if n not in stall]
        # Held inputs change only between phases, with the block drained.
        _set_scalars(dut, phase["scalars"])
        for i, (n, source) in enumerate(sources.items()):
            source.set_pause(stalls(stall[n], seed + i))
        for i, (n, sink) in enumerate(sinks.items()):
            if sink.stallable:
                sink.set_pause(stalls(stall[n], seed + _SINK_SEED_OFFSET + i))
        first_in = {n: len(s.handshake_cycles) for n, s in sources.items()}
        first_out = {n: len(s.handshake_cycles) for n, s in sinks.items()}
        begin = sources[inputs[0]].cycle if inputs else sinks[outputs[0]].cycle
        for stream, beats in phase["inputs"].items():
            for beat in beats:
                sources[stream].send_nowait(beat)
        beats = sum(map(len, phase["inputs"].values())) + sum(map(len, phase["expected"].values()))
        timeout = phase.get("timeout_cycles") or 400 * beats + 200_000
        got = {}
        try:
            for stream, expected in phase["expected"].items():
                got[stream] = await sinks[stream].recv_n(len(expected), timeout_cycles=timeout)
                taken[stream] += len(expected)
        except StreamTimeout:
            seen = len(sinks[stream].received) - first_out[stream]
            problems.append(f"{name}: {stream} carried {seen} of the {len(expected)} expected "
                            f"beats within {timeout} cycles")
            stuck = True
            break
        try:
            for stream, source in sources.items():
                await source.wait_idle(timeout_cycles=timeout)
        except StreamTimeout:
            accepted = len(source.handshake_cycles) - first_in[stream]
            problems.append(f"{name}: {stream} took {accepted} of its "
                            f"{len(phase['inputs'].get(stream, ()))} input beats within "
                            f"{timeout} cycles after the last output beat")
            stuck = True
            break

        starts = [s.handshake_cycles[first_in[n]] for n, s in sources.items()
                  if len(s.handshake_cycles) > first_in[n]]
        start = min(starts) if starts else begin
        ends = [sinks[n].handshake_cycles[first_out[n] + len(e) - 1]
                for n, e in phase["expected"].items() if e]
        cycles = max(ends) - start + 1 if ends else 0
        handshakes = {n: [c - start for c in s.handshake_cycles[first_in[n]:]]
                      for n, s in sources.items()}
        handshakes.update({n: [c - start for c in s.handshake_cycles[first_out[n]:]]
                           for n, s in sinks.items()})
        entry = {"name": name, "outputs": got, "cycles": cycles, "handshakes": handshakes}
        report.append(entry)

        for stream, expected in phase["expected"].items():
            seen = got[stream]
            if seen != expected:
                bad = next(j for j, (g, e) in enumerate(zip(seen, expected)) if g != e)
                problems.append(f"{name}: {stream} beat {bad} of {len(expected)} is "
                                f"{seen[bad]:#x}, expected {expected[bad]:#x}")
        want = phase["expected_cycles"]
        if not stalled and want is not None and cycles != want:
            problems.append(f"{name}: {cycles} cycles without stalls, expected exactly {want}")

        if phase.get("settle_cycles"):
            extra = await _silence(dut, sinks, taken, phase["settle_cycles"])
            problems += [f"{name}: {n}: {_beats(count)} after the last expected one"
                         for n, count in extra.items()]
        if phase.get("flags"):
            entry["flags"] = {flag: int(getattr(dut, flag).value) for flag in phase["flags"]}
            problems += [f"{name}: {flag} = {entry['flags'][flag]:#x} after the phase, "
                         f"expected {value:#x}" for flag, value in phase["flags"].items()
                         if entry["flags"][flag] != value]

    if not stuck:
        last = phases[-1]["name"]
        extra = await _silence(dut, sinks, taken, run["quiet_cycles"])
        problems += [f"{last}: {n}: {_beats(count)} after the last expected one"
                     for n, count in extra.items()]
    flags = {flag: int(getattr(dut, flag).value) for flag in run["clean_flags"]}
    problems += [f"{flag} = {value:#x} at the end, expected 0"
                 for flag, value in flags.items() if value]
    testbench_results({"phases": report, "flags": flags})
    assert not problems, "; ".join(problems)
