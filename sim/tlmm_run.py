"""Run matmuls through the TLMM engine on Verilator (cocotb) and read the results back.

The host side of ``trilut.sim.tb_tlmm``: packs each case's streams with the numerics module,
computes the expected result beats with the engine's bit-exact model, runs every case of a
configuration in one simulator launch, and unpacks what the RTL produced.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trilut.config import EngineConfig
from trilut.hdl.tlmm_engine import TlmmEngine
from trilut.models import numerics as nm
from trilut.sim.runner import CocotbResult, run_case

__all__ = ["TlmmCase", "TlmmOutcome", "run_tlmm_cases"]


@dataclass(frozen=True)
class TlmmCase:
    name: str
    acts: np.ndarray          # int8 values [M, K]
    weights: np.ndarray       # ternary [N, K]
    stall: float = 0.0        # probability of an idle/backpressure cycle on every stream
    seed: int = 0


@dataclass(frozen=True)
class TlmmOutcome:
    case: TlmmCase
    results: np.ndarray       # what the RTL produced, int64 [M, N]
    expected: np.ndarray      # the engine's bit-exact model
    cycles: int               # first weight beat taken .. last result beat out, inclusive
    expected_cycles: int      # TlmmEngine.expected_cycles (meaningful without stalls)
    ideal_cycles: int         # one weight beat per cycle

    @property
    def exact(self) -> bool:
        return np.array_equal(self.results, self.expected)


def _case_spec(engine: TlmmEngine, case: TlmmCase) -> dict:
    cfg = engine.cfg
    m, k = case.acts.shape
    n = case.weights.shape[0]
    cfg.check_shape(k, n)
    T, C, D = cfg.tables_per_step, cfg.columns_per_cycle, cfg.accumulator_depth
    weight_beats = nm.tlmm_weight_beats(case.weights, cfg.code, T, C, D)
    act_beats = nm.tlmm_act_beats(case.acts, cfg.code, T, C, D, n)
    expected = nm.tlmm_result_beats(engine.model(case.acts, case.weights), C, cfg.acc_width)
    return {
        "name": case.name, "seed": case.seed, "stall": case.stall,
        "k_blocks": cfg.padded_k(k) // cfg.block_k, "n_groups": cfg.padded_n(n) // C,
        # The engine re-reads the weights for every activation row.
        "weights": [format(b, "x") for b in weight_beats] * m,
        "acts": [format(b, "x") for b in act_beats],
        "expected": [format(b, "x") for b in expected],
    }


def run_tlmm_cases(cfg: EngineConfig, cases: list[TlmmCase], *,
                   run_dir: Path | None = None) -> tuple[list[TlmmOutcome], CocotbResult]:
    """Run ``cases`` in order on one Verilator build of the engine for ``cfg``.

    Raises ``trilut.sim.runner.SimulationFailed`` if any result beat differs from the model.
    """
    engine = TlmmEngine(cfg)
    seen, sim = run_case(engine, name="tlmm_engine", test_module="trilut.sim.tb_tlmm",
                         case={"cases": [_case_spec(engine, c) for c in cases]}, run_dir=run_dir)
    report = seen["cases"]
    outcomes = []
    for case, seen in zip(cases, report, strict=True):
        m, k = case.acts.shape
        n = case.weights.shape[0]
        beats = [int(b, 16) for b in seen["results"]]
        outcomes.append(TlmmOutcome(
            case=case,
            results=nm.tlmm_unpack_results(beats, m, n, cfg.columns_per_cycle, cfg.acc_width),
            expected=engine.model(case.acts, case.weights),
            cycles=seen["cycles"],
            expected_cycles=engine.expected_cycles(m, k, n),
            ideal_cycles=cfg.ideal_cycles(m, k, n)))
    return outcomes, sim
