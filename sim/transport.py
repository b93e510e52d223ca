"""The simulation transport: ``trilut.transport.Transport`` on Verilator (cocotb).

``SimulationTransport.run_stream`` builds the requested block (a DDR-fed block inside
``DdrHarness`` with the simulated DDR behind its ``axi`` port), converts and builds it with
Verilator (cached by the hash of its Verilog), and runs the one generic testbench
(``trilut.sim.stream_testbench``) with the run as its case. The host side never sees any of
this: it hands over a ``BlockRequest`` and a ``StreamRun`` and gets ``PhaseResult``s back.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

from amaranth.lib import wiring

from trilut.hdl.linear.bitlinear import BitLinear
from trilut.hdl.decoder.ffn_block import FfnBlock
from trilut.hdl.linear.weight_fed_tlmm import WeightFedTlmm
from trilut.hdl.linear.tlmm_engine import TlmmEngine
from trilut.sim.ddr_model import DdrHarness, DdrModel
from trilut.sim.runner import run_case
from trilut.transport import BlockRequest, PhaseResult, StreamRun, Transport

__all__ = ["SimulationTransport", "build_block", "run_stream_on", "BLOCK_KINDS"]


def _ddr_fed(block: wiring.Component, params) -> DdrHarness:
    ddr = params["ddr"]
    return DdrHarness(block, DdrModel(
        depth=params["ddr_depth"], data_width=params["word_bits"], latency=ddr.latency,
        beats_per_window=ddr.beats_per_window, window=ddr.window))


#: Block kind -> how to build its simulation top from the request's parameters.
BLOCK_KINDS = {
    "tlmm_engine": lambda p: TlmmEngine(p["engine"]),
    "weight_fed_tlmm": lambda p: _ddr_fed(WeightFedTlmm(
        p["engine"], word_bits=p["word_bits"], tile_beats=p["tile_beats"]), p),
    "bitlinear": lambda p: _ddr_fed(BitLinear(
        p["engine"], max_k=p["max_k"], word_bits=p["word_bits"], tile_beats=p["tile_beats"],
        eps=p["eps"]), p),
    "ffn_block": lambda p: _ddr_fed(FfnBlock(
        p["engine"], hidden=p["hidden"], ffn=p["ffn"], activation=p["activation"],
        word_bits=p["word_bits"], tile_beats=p["tile_beats"], eps=p["eps"]), p),
}


def build_block(request: BlockRequest) -> wiring.Component:
    """The simulation top for ``request``."""
    try:
        build = BLOCK_KINDS[request.kind]
    except KeyError:
        raise ValueError(f"unknown block kind {request.kind!r}; the simulator builds: "
                         f"{', '.join(BLOCK_KINDS)}") from None
    return build(request.params)


class SimulationTransport(Transport):
    """Runs blocks cycle-accurately on Verilator. ``run_dir``: where each run's case, results
    and simulator log go (a fresh temporary directory per run when ``None``)."""

    def __init__(self, run_dir: "os.PathLike | str | None" = None):
        self.run_dir = None if run_dir is None else pathlib.Path(run_dir).resolve()
        self._runs = 0

    def run_stream(self, block: BlockRequest, run: StreamRun) -> list[PhaseResult]:
        self._runs += 1
        run_dir = (self.run_dir / f"{block.kind}-{self._runs}" if self.run_dir is not None
                   else None)
        return run_stream_on(build_block(block), run, name=block.kind, run_dir=run_dir)


def run_stream_on(top: wiring.Component, run: StreamRun, *, name: str,
                  run_dir: "os.PathLike | str | None" = None) -> list[PhaseResult]:
    """Run ``run`` on the component ``top`` with the generic testbench: what
    ``SimulationTransport`` does after building a block, open to the unit tests of blocks the
    host never asks for by kind (a weight buffer, a norm unit). ``run.memory`` needs a ``top``
    with the DDR backdoor (a ``DdrHarness``)."""
    case = {"run": run.as_json()}
    if run.memory:
        if not isinstance(top, DdrHarness):
            raise ValueError(f"{name} has no DDR to place {len(run.memory)} words in")
        case["load"] = {"prefix": "load", "addr_width": top.ddr.word_addr_width}
    run_dir = (pathlib.Path(run_dir).resolve() if run_dir is not None
               else pathlib.Path(tempfile.mkdtemp(prefix=f"trilut-{name}-")))
    seen, _ = run_case(top, name=name, test_module="trilut.sim.stream_testbench", case=case,
                       run_dir=run_dir)
    return [PhaseResult(name=p["name"], outputs=p["outputs"], cycles=p["cycles"],
                        handshakes=p["handshakes"]) for p in seen["phases"]]
