"""The import rule of docs/architecture.md, checked on every module's parsed imports.

models <- config, transport <- hdl <- sim; host uses models, config and transport, never
hdl or sim; the CLI (trilut/) wires them. A module that imports against the rule fails here
with its file, line and the import.
"""

import ast
import pathlib

import pytest

pytestmark = pytest.mark.fast

ROOT = pathlib.Path(__file__).resolve().parent.parent
FOLDERS = {"models": "models", "hdl": "hdl", "sim": "sim", "host": "host", "boards": "boards",
           "trilut": "trilut"}

#: What each layer may import from the project (besides itself).
ALLOWED = {
    "models": set(),
    "boards": set(),
    "config": {"models", "boards"},
    "transport": set(),
    "cache": set(),
    "hdl": {"models", "config", "cache"},
    "sim": {"models", "config", "cache", "hdl", "transport"},
    "host": {"models", "config", "transport"},
    "cli": {"models", "config", "cache", "hdl", "sim", "host", "transport", "boards"},
}


def _layer_of_module(name: str) -> str | None:
    """``trilut.hdl.memory.axi`` -> ``hdl``; ``trilut.config`` -> ``config``; the CLI-level modules
    of the ``trilut`` folder (cli, generate, bench) -> ``cli``."""
    parts = name.split(".")
    if parts[0] != "trilut":
        return None
    if len(parts) == 1:
        return "cli"
    if parts[1] in ("models", "hdl", "sim", "host", "boards", "config", "transport", "cache"):
        return parts[1]
    return "cli"


def _modules(root):
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            prefix = "trilut" if folder == "trilut" else f"trilut.{folder}"
            yield ".".join((prefix, *parts)), path


def _imports(name: str, path: pathlib.Path):
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "trilut":
                # ``from trilut import boards``: the names are the modules.
                for alias in node.names:
                    yield node.lineno, f"trilut.{alias.name}"
            else:
                yield node.lineno, target


def violations(root=ROOT):
    found = []
    for name, path in _modules(root):
        layer = _layer_of_module(name)
        for line, target in _imports(name, path):
            other = _layer_of_module(target)
            if other is None or other == layer:
                continue
            if other not in ALLOWED[layer]:
                found.append(f"{path.relative_to(root)}:{line}: {layer} imports {target}")
    return found


def test_no_module_imports_against_the_layers():
    assert violations() == []


def test_the_rule_catches_an_upward_import(tmp_path):
    """A host module importing sim is reported (the check can fail)."""
    for folder in FOLDERS:
        (tmp_path / folder).mkdir()
    (tmp_path / "host" / "bad.py").write_text("from trilut.sim.runner import run_case\n")
    (tmp_path / "hdl" / "good.py").write_text("from trilut.config import EngineConfig\n")
    (tmp_path / "models" / "bad.py").write_text("from ..hdl import axi\n")
    assert sorted(violations(tmp_path)) == ["host/bad.py:1: host imports trilut.sim.runner",
                                            "models/bad.py:1: models imports trilut.hdl"]


def test_numerics_config_and_hdl_import_without_torch():
    import subprocess
    import sys
    code = ("import sys, importlib, pkgutil, trilut.hdl, trilut.config, trilut.generate\n"
            "for m in pkgutil.walk_packages(trilut.hdl.__path__, 'trilut.hdl.'):\n"
            "    importlib.import_module(m.name)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
