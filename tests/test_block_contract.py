"""One block contract (issue 6, item 3): every hardware block, a ``wiring.Component`` defined in
``trilut.hdl``, answers in its own class (or a mixin it names, such as ``FixedLatency``) what it
computes (``model``), how long it takes (``expected_cycles(job)``, one job object) and what
memory it uses (``memory_blocks()``)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
from amaranth.lib import wiring

import trilut.hdl

pytestmark = pytest.mark.fast

#: Components excused, with the reason (the simulation wrappers, ``DdrHarness`` and the DDR
#: model, live in ``trilut.sim``; the signatures are ``wiring.Signature`` subclasses, not
#: components). Each entry is an open gap, named in the issue's notes.
EXEMPT: dict[str, str] = {
    "AttentionBlock": "expected_cycles not yet written: its QKV and o_proj phases' models "
                      "time at most two rows (QkvBlock.MAX_TIMED_ROWS); docs/attention_block.md",
}


def hdl_components() -> list[type]:
    found = []
    for info in pkgutil.walk_packages(trilut.hdl.__path__, "trilut.hdl."):
        module = importlib.import_module(info.name)
        for cls in vars(module).values():
            if (inspect.isclass(cls) and issubclass(cls, wiring.Component)
                    and cls.__module__ == module.__name__):
                found.append(cls)
    return found


def _problems(cls: type) -> list[str]:
    problems = [f"no {name}()" for name in ("model", "expected_cycles", "memory_blocks")
                if not callable(getattr(cls, name, None))]
    if callable(getattr(cls, "expected_cycles", None)):
        params = list(inspect.signature(cls.expected_cycles).parameters.values())[1:]
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        # One job object; keyword-only options with defaults (a parent's pacing) are allowed.
        required_kw = [p for p in params if p.kind == p.KEYWORD_ONLY and p.default is p.empty]
        if len(positional) != 1 or required_kw or any(
                p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            problems.append(f"expected_cycles{inspect.signature(cls.expected_cycles)} does not "
                            f"take exactly one job")
    return problems


def test_the_walk_finds_the_blocks():
    names = {cls.__name__ for cls in hdl_components()}
    assert {"TlmmEngine", "AxiReadMaster", "WeightBuffer", "RmsNorm", "Exp2Neg",
            "FfnBlock"} <= names


def test_every_block_answers_the_contract():
    broken = {f"{cls.__module__}.{cls.__name__}": problems
              for cls in hdl_components() if cls.__name__ not in EXEMPT
              for problems in [_problems(cls)] if problems}
    assert not broken, "blocks that do not answer the contract:\n" + "\n".join(
        f"  {name}: {', '.join(p)}" for name, p in sorted(broken.items()))


def test_the_check_can_fail():
    class Loose(wiring.Component):
        def __init__(self):
            super().__init__({})

        def expected_cycles(self, m, k, n):
            return 0

    assert _problems(Loose) == ["no model()", "no memory_blocks()",
                                "expected_cycles(self, m, k, n) does not take exactly one job"]
