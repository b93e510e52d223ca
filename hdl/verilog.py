"""The one Amaranth -> Verilog conversion: what is shipped, simulated and synthesised.

``trilut generate`` writes :func:`convert`'s text, the Verilator build
(``trilut.sim.runner``) compiles it and the resource estimate (``trilut.hdl.resources``)
synthesises it, so the three see the same Verilog. The conversion is Amaranth's
``back.verilog.convert`` (through yosys's ``write_verilog``) with two kinds of lines removed,
neither of which changes the circuit:

- **No ``src`` attributes** (``emit_src=False``): the text, and so the build and synthesis
  caches keyed by its hash, survives edits of the Python that do not change the design.
- **All-zero memory initialisers** (:func:`strip_zero_memory_inits`). Amaranth spells out every
  memory's initial contents. A memory whose every word is zero loses its ``initial`` block:
  block RAM and URAM power up zeroed after configuration, Verilator builds with
  ``--x-initial 0`` (the same zeros), and the block costs Verilator a 1.3 MB C++ file and 35 s
  per 4096-word memory and yosys seconds per 4k words, and stops URAM inference. A block with
  any non-zero word (a ROM, a preloaded table) is kept whole.
- **Per-field debug alias wires** (:func:`strip_field_aliases`) of layout-typed ports
  (``\\beats__payload[0]``). They drive nothing; yosys 0.70's ABC9 asserts on them
  (YosysHQ/yosys#4349). Removing them changes no cell count (checked against the same design
  with a flat payload, tests/test_resources.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["VerilogText", "convert", "to_verilog", "clean", "strip_zero_memory_inits",
           "strip_field_aliases"]


@dataclass(frozen=True)
class VerilogText:
    text: str
    zero_inits_stripped: int       # memory initial blocks removed
    field_aliases_stripped: int    # alias-wire lines removed


def convert(component, *, name: str) -> VerilogText:
    """``component`` as Verilog with top module ``name``, cleaned as the module docstring says."""
    from amaranth.back import verilog
    return clean(verilog.convert(component, name=name, emit_src=False))


def to_verilog(component, *, name: str) -> str:
    """The text of :func:`convert`."""
    return convert(component, name=name).text


def clean(verilog: str) -> VerilogText:
    """Apply both removals to Verilog text (idempotent: clean text comes back unchanged)."""
    text, aliases = strip_field_aliases(verilog)
    text, inits = strip_zero_memory_inits(text)
    return VerilogText(text, inits, aliases)


# One ``initial begin ... end`` block holding nothing but word assignments: the way yosys's
# write_verilog (which Amaranth uses) emits a memory's initial contents.
_INIT_BLOCK = re.compile(
    r"^[ \t]*initial begin\n((?:[ \t]*[^\n]*\[\d+\] = [^\n;]*;\n)+)[ \t]*end\n", re.MULTILINE)
# ``mem[12] = 72'h000000000000000000;`` or with an escaped identifier, ``\a.b [12] = 8'd0;``.
_ZERO_WORD = re.compile(r"[ \t]*(?:\\\S+ |[A-Za-z_][\w$]*)\s*\[\d+\] = "
                        r"(?:\d+'s?(?:[hH]0+|[bB]0+|[oO]0+|[dD]0+)|0+);")


def strip_zero_memory_inits(verilog: str) -> tuple[str, int]:
    """Remove the memory initial blocks whose every word is zero; return (text, count)."""
    count = 0

    def replace(match: re.Match) -> str:
        nonlocal count
        words = match.group(1).splitlines()
        if all(_ZERO_WORD.fullmatch(word) for word in words):
            count += 1
            return ""
        return match.group(0)

    return _INIT_BLOCK.sub(replace, verilog), count


_FIELD_ALIAS = re.compile(
    r"^[ \t]*(?:wire(?: \[\d+:\d+\])? |assign )\\\S+?\[\d+\]\S* *(?:;| = [^;\n]*;)\n", re.M)


def strip_field_aliases(verilog: str) -> tuple[str, int]:
    """Remove Amaranth's per-field debug alias wires; return the text and how many lines went."""
    return _FIELD_ALIAS.subn("", verilog)
