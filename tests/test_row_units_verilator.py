"""Cycle-accurate tier: RmsNorm and ActQuantizer on Verilator (cocotb), bit for bit against
``models.fp16``.

Each unit configuration is built once (cached by the hash of its Verilog) and runs all its
cases as the phases of one run of the generic testbench (``sim/stream_testbench.py``): rows
drawn like real activations (normal times a per-row scale spread over decades, some with an
outlier channel), the edge rows (an outlier of 3000, +-0, +-65504, values straddling fp16's
smallest normal, subnormals, quantizer ties), lengths that are multiples of neither L nor G*T,
and random valid/ready stalls on every stream; nothing may follow the last beat. One stall-free
case per configuration checks the measured cycles against ``expected_cycles``.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from trilut.config import EngineConfig
from trilut.hdl.elementwise.act_quant import ActQuantizer, ActQuantJob
from trilut.hdl.elementwise.rmsnorm import RmsNorm, RmsNormJob
from trilut.models.numerics import lane_beats, unpack_lane_beats
from trilut.models import fp16 as fp
from trilut.sim.transport import run_stream_on
from trilut.transport import StreamPhase, StreamRun

from fp16_rows import activation_rows, edge_rows

pytestmark = pytest.mark.rtl

MAX_N = 64


@dataclass(frozen=True)
class RowCase:
    name: str
    rows: np.ndarray              # fp16 codes [R, n]
    stall: float = 0.0            # probability of an idle/backpressure cycle on every stream
    seed: int = 0
    weights: np.ndarray | None = None    # RmsNorm: fp16 codes [R, n]
    n_out: int = 1                # ActQuantizer: output columns of the matmul it feeds


def _phase(c: RowCase, *, inputs: dict, expected: dict, scalars: dict,
           expected_cycles: int) -> StreamPhase:
    return StreamPhase(name=c.name, stall=c.stall, seed=c.seed, scalars=scalars,
                       inputs=inputs, expected=expected,
                       expected_cycles=expected_cycles if c.stall == 0.0 else None)


def _run(unit, name: str, phases: list[StreamPhase], tmp_path: Path):
    # Nothing more may come out: no beat duplicated or invented after the last case.
    return run_stream_on(unit, StreamRun(phases=phases, quiet_cycles=100), name=name,
                         run_dir=tmp_path)


def _cases(rng, unit_lanes: int, block: int) -> list[RowCase]:
    """Lengths: 61 (a multiple of neither L nor G*T), MAX_N, one beat, one element, G*T + 1."""
    cases = []
    seed = 10
    for n, count, stall in ((61, 6, 0.3), (MAX_N, 4, 0.5), (unit_lanes - 1, 3, 0.4),
                            (1, 3, 0.3), (block + 1, 4, 0.6)):
        cases.append(RowCase(f"random-n{n}-stall{stall}", activation_rows(rng, count, n),
                             stall, seed))
        seed += 1
    edges = edge_rows(rng, 37)
    cases.append(RowCase("edges-n37", np.concatenate(list(edges.values())), 0.4, seed))
    cases.append(RowCase("no-stall-n61", activation_rows(rng, 4, 61)))
    return cases


# ---- RmsNorm ----------------------------------------------------------------------------------

RMS_CONFIGS = {"L4": dict(lanes=4, max_n=MAX_N, eps=1e-5)}


def _order_sensitive_rows(unit: RmsNorm, rng, n: int, per_order: int = 2):
    """Rows whose output depends on the order of the sum of squares: the hardware's
    ``partials = 2L`` gives other codes than the sequential order, ``L`` partials and ``4L``
    partials. Random rows show this in well under 1% of cases, too rarely to test the order."""
    x = activation_rows(rng, 4000, n)
    w = fp.fp16_from_float(rng.normal(1.0, 0.3, x.shape))
    ours = unit.model(x, w)
    pick = []
    for p in sorted({1, unit.lanes, 4 * unit.lanes} - {unit.partials}):
        differs = (fp.fp16_rmsnorm(x, w, unit.eps, partials=p) != ours).any(axis=1)
        found = [i for i in np.flatnonzero(differs) if i not in pick][:per_order]
        assert len(found) == per_order, f"too few rows where partials={p} differs"
        pick += found
    return x[pick], w[pick]


@pytest.mark.parametrize("name", RMS_CONFIGS)
def test_rmsnorm_bit_exact_on_verilator(name, tmp_path):
    unit = RmsNorm(**RMS_CONFIGS[name])
    rng = np.random.default_rng(2024)
    cases = []
    for c in _cases(rng, unit.lanes, unit.lanes):
        # Norm weights around 1, a few negative or large, as trained RMSNorm gains are.
        w = fp.fp16_from_float(rng.normal(1.0, 0.3, c.rows.shape) *
                               np.where(rng.random(c.rows.shape) < 0.05, -4.0, 1.0))
        cases.append(RowCase(c.name, c.rows, c.stall, c.seed, weights=w))
    rows, w = _order_sensitive_rows(unit, rng, 61)
    cases.insert(-1, RowCase("order-sensitive-n61", rows, 0.3, 99, weights=w))
    phases = [_phase(
        c, scalars={"n": c.rows.shape[1]},
        inputs={"x": lane_beats(c.rows, unit.lanes), "weight": lane_beats(c.weights, unit.lanes)},
        expected={"y": lane_beats(unit.model(c.rows, c.weights), unit.lanes)},
        expected_cycles=unit.expected_cycles(RmsNormJob(c.rows.shape[1], c.rows.shape[0])),
    ) for c in cases]
    # The testbench checks every beat bit for bit (padding lanes too), the silence after the
    # last case and the stall-free cycles against ``expected_cycles``.
    report = _run(unit, f"rmsnorm_{name.lower()}", phases, tmp_path)
    for c, phase, seen in zip(cases, phases, report, strict=True):
        rows_n, n = c.rows.shape
        got = unpack_lane_beats(seen.outputs["y"], rows_n, n, unit.lanes)
        np.testing.assert_array_equal(got, unit.model(c.rows, c.weights), err_msg=c.name)
        expected = unit.expected_cycles(RmsNormJob(n, rows_n))
        if c.stall == 0.0:
            print(f"{name} {c.name}: {seen.cycles} cycles, expected_cycles {expected}")
            assert phase.expected_cycles == expected
            assert seen.cycles == expected, c.name
        else:
            assert seen.cycles >= expected, c.name


# ---- ActQuantizer ------------------------------------------------------------------------------

QUANT_CONFIGS = {
    # G*T = 6 over L = 4: a beat straddles words (gearbox offsets 0 and 2).
    "L4-G3T2": (4, EngineConfig(group_size=3, tables_per_step=2, columns_per_cycle=2,
                                accumulator_depth=2, max_k=252)),
    # G*T = 6 under L = 8: up to two beats per word, acts-bound.
    "L8-G3T2": (8, EngineConfig(group_size=3, tables_per_step=2, columns_per_cycle=2,
                                accumulator_depth=2, max_k=252)),
}


@pytest.mark.parametrize("name", QUANT_CONFIGS)
def test_quantizer_bit_exact_on_verilator(name, tmp_path):
    lanes, cfg = QUANT_CONFIGS[name]
    unit = ActQuantizer(cfg, lanes=lanes, max_n=MAX_N)
    rng = np.random.default_rng(77)
    tile = cfg.columns_per_cycle * cfg.accumulator_depth
    cases = [RowCase(c.name, c.rows, c.stall, c.seed, n_out=n_out)
             for c, n_out in zip(_cases(rng, lanes, cfg.block_k),
                                 (2 * tile + 1, 1, tile + 1, tile, 3 * tile, 2 * tile, tile + 1))]
    phases = []
    for c in cases:
        beats, absmax = unit.model(c.rows, c.n_out)
        tiles = unit.cfg.output_tiles(c.n_out)
        phases.append(_phase(
            c, scalars={"n": c.rows.shape[1], "tiles": tiles},
            inputs={"x": lane_beats(c.rows, lanes)},
            expected={"acts": beats, "absmax": absmax.tolist()},
            expected_cycles=unit.expected_cycles(ActQuantJob(c.rows.shape[1], c.rows.shape[0],
                                                             tiles))))
    report = _run(unit, f"act_quantizer_{name.lower().replace('-', '_')}", phases, tmp_path)
    for c, phase, seen in zip(cases, phases, report, strict=True):
        beats, absmax = unit.model(c.rows, c.n_out)
        assert seen.outputs["acts"] == beats, c.name
        assert seen.outputs["absmax"] == absmax.tolist(), c.name
        cycles = unit.expected_cycles(ActQuantJob(c.rows.shape[1], c.rows.shape[0],
                                                  unit.cfg.output_tiles(c.n_out)))
        if c.stall == 0.0:
            print(f"{name} {c.name} tiles={unit.cfg.output_tiles(c.n_out)}: {seen.cycles} cycles, "
                  f"expected_cycles {cycles}")
            assert phase.expected_cycles == cycles
            assert seen.cycles == cycles, c.name
        else:
            assert seen.cycles >= cycles, c.name
