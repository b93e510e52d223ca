"""The simulation transport: ``trilut.transport.Transport`` on Verilator (cocotb).

``SimulationTransport.run_stream`` builds the requested block (a DDR-fed block inside
``DdrHarness`` with the simulated DDR behind its ``axi`` port), converts and builds it with
Verilator (cached by the hash of its Verilog), and runs the one generic testbench
(``trilut.sim.stream_testbench``) with the run as its case. The host side never sees any of
this: it hands over a ``BlockRequest`` and a ``StreamRun`` and gets ``PhaseResult``s back.

Stall-free cycles: the host cannot ask the hardware blocks (it never imports ``hdl``), so
the mapping from what it sends to what a block's cycle model takes lives here.
:func:`block_job` turns a ``BlockRequest`` and one of its ``StreamPhase``s into the block's own
job object (``WeightFedJob``, ``BitLinearJob``, ``FfnJob``, ``QkvJob``: the shape from the phase's
scalars and input beat counts, the read and tile commands decoded from the ``cmd`` /
``tiles`` beats with the block's own payload layouts, the DDR timing from the request), and
:func:`expected_cycles` asks the block. A caller that wants the count asserted puts it in the
phase (``trilut.host.layer_runs.with_expected_cycles``); the testbench then checks it.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

from amaranth.lib import wiring

from amaranth.hdl import Elaboratable

from trilut.config import AXI_ADDR_WIDTH
from trilut.hdl.linear.bitlinear import BitLinear, BitLinearJob
from trilut.hdl.decoder.ffn_block import FfnBlock, FfnJob
from trilut.hdl.decoder.qkv_block import QkvBlock, QkvJob
from trilut.hdl.linear.weight_fed_tlmm import WeightFedJob, WeightFedTlmm
from trilut.hdl.linear.tlmm_engine import TlmmEngine, TlmmJob
from trilut.sim.ddr_model import DdrHarness, DdrModel
from trilut.sim.runner import run_case
from trilut.transport import BlockRequest, PhaseResult, StreamPhase, StreamRun, Transport

__all__ = ["SimulationTransport", "build_block", "run_stream_on", "BLOCK_KINDS", "block_job",
           "expected_cycles"]


def _ddr_fed(block: wiring.Component, params) -> DdrHarness:
    return DdrHarness(block, DdrModel(
        depth=params["ddr_depth"], data_width=params["datapath"].ddr_word_bits,
        addr_width=AXI_ADDR_WIDTH, ddr=params["ddr"]))


#: Block kind -> how to build its simulation top from the request's parameters (``engine``:
#: the ``EngineConfig``; ``datapath``: the ``DatapathConfig``; ``ddr``: the ``DdrSimConfig``
#: and ``ddr_depth`` for DDR-fed blocks; the blocks' shapes).
BLOCK_KINDS = {
    "tlmm_engine": lambda p: TlmmEngine(p["engine"]),
    "weight_fed_tlmm": lambda p: _ddr_fed(WeightFedTlmm(p["engine"], p["datapath"]), p),
    "bitlinear": lambda p: _ddr_fed(BitLinear(p["engine"], p["datapath"], max_k=p["max_k"]),
                                    p),
    "ffn_block": lambda p: _ddr_fed(FfnBlock(p["engine"], p["datapath"], hidden=p["hidden"],
                                             ffn=p["ffn"]), p),
    "qkv_block": lambda p: _ddr_fed(QkvBlock(p["engine"], hidden=p["hidden"], q_out=p["q_out"],
                                             kv_out=p["kv_out"], datapath=p["datapath"]), p),
}


# ---- the blocks' cycle models, from what the host sends ------------------------------------

def _fields(layout, value: int) -> tuple[int, ...]:
    """A packed stream payload -> its fields' values, in layout order."""
    return tuple((value >> f.offset) & ((1 << f.shape.width) - 1) for _, f in layout)


def _commands(block, phase: StreamPhase) -> tuple[tuple, tuple]:
    """The phase's read commands ``(byte address, words)`` and tile commands ``(length,
    replays)``, decoded with the block's own payload layouts."""
    dp = block if isinstance(block, WeightFedTlmm) else block.datapath
    reads = tuple(_fields(dp.master.cmd_layout, c) for c in phase.inputs.get("cmd", ()))
    tiles = tuple(_fields(dp.buffer.command_layout, t) for t in phase.inputs.get("tiles", ()))
    return reads, tiles


def block_job(request: BlockRequest, phase: StreamPhase, block: "wiring.Component | None" = None):
    """The job object of ``request``'s block for one ``phase`` (see the module docstring);
    ``block``: the block itself when it is already built (the component inside the DDR
    harness), else it is built here for its models only."""
    if block is None:
        block = build_block(request)
        _mark_used(block)
    if isinstance(block, DdrHarness):
        block = block.block
    ddr = request.params.get("ddr")
    reads, tiles = _commands(block, phase) if "cmd" in phase.inputs else ((), ())
    if isinstance(block, (WeightFedTlmm, TlmmEngine)):
        s = phase.scalars
        cfg = block.cfg
        k_blocks, n_groups = s["k_blocks"], s["n_groups"]
        per_row = k_blocks * -(-n_groups // cfg.accumulator_depth)
        acts = len(phase.inputs["acts"])
        if acts % per_row:
            raise ValueError(f"phase {phase.name!r}: {acts} activation beats are not whole "
                             f"rows of {per_row}")
        shape = dict(rows=acts // per_row, k=k_blocks * cfg.block_k,
                     n=n_groups * cfg.columns_per_cycle)
        if isinstance(block, TlmmEngine):
            return TlmmJob(**shape)
        return WeightFedJob(**shape, reads=reads, tiles=tiles, ddr=ddr)
    if isinstance(block, BitLinear):
        s = phase.scalars
        k, lanes = s["k"], block.cfg.columns_per_cycle
        return BitLinearJob(rows=len(phase.inputs["x"]) // -(-k // lanes), k=k,
                            n=s["n_groups"] * lanes, reads=reads, tiles=tiles, ddr=ddr)
    if isinstance(block, FfnBlock):
        return FfnJob(rows=len(phase.inputs["h"]) // block.hidden_beats, reads=reads,
                      tiles=tiles, ddr=ddr)
    if isinstance(block, QkvBlock):
        return QkvJob(rows=len(phase.inputs["h"]) // block.hidden_beats, reads=reads,
                      tiles=tiles, ddr=ddr)
    raise ValueError(f"no job mapping for block kind {request.kind!r}")


def expected_cycles(request: BlockRequest, phase: StreamPhase) -> int:
    """The stall-free cycles of ``phase`` on ``request``'s block, from the block's own
    ``expected_cycles`` of :func:`block_job`."""
    block = build_block(request)
    _mark_used(block)
    inner = block.block if isinstance(block, DdrHarness) else block
    return inner.expected_cycles(block_job(request, phase, block))


def _mark_used(component) -> None:
    """A component built only for its models is never elaborated: keep Amaranth from warning
    about it and every sub-block it holds."""
    seen = set()
    stack = [component]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        obj._MustUse__used = True
        stack += [v for v in vars(obj).values() if isinstance(v, Elaboratable)]


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
