"""Cycle-accurate tier: the TLMM engine on Verilator (cocotb), bit for bit against numerics.

Each engine configuration is built once (cached by the hash of its Verilog) and runs every
case in one simulator launch: random matrices, the edge cases of the weight and activation
ranges, shapes that need padding, several output tiles, with and without random valid/ready
stalls on all three streams.
"""

import numpy as np
import pytest

from trilut.config import EngineConfig
from trilut.hdl.linear.tlmm_engine import TlmmEngine, TlmmJob
from trilut.host.layer_runs import TlmmCase, run_job, tlmm_job, with_expected_cycles
from trilut.models import numerics as nm
from trilut.sim.transport import SimulationTransport

pytestmark = pytest.mark.rtl


def run_tlmm_cases(cfg, cases, run_dir):
    """Every case a phase of one run; stall-free phases assert the engine's exact cycles."""
    engine = TlmmEngine(cfg)
    cycles = [None if c.stall else engine.expected_cycles(
        TlmmJob(rows=c.acts.shape[0], k=c.acts.shape[1], n=c.weights.shape[0])) for c in cases]
    job = with_expected_cycles(tlmm_job(cfg, cases), cycles)
    results, phases = run_job(SimulationTransport(run_dir), job)
    return engine, job, results, phases, cycles

CONFIGS = {
    # G=3 sign-mirror tables (TeLLMe's code), two output tiles for N > C*D.
    "G3T2C2D4-mirror": EngineConfig(group_size=3, tables_per_step=2, columns_per_cycle=2,
                                    accumulator_depth=4, max_k=252),
    # G=2 full tables; D=2 exercises the accumulator read-after-write interlock.
    "G2T3C3D2-full": EngineConfig(group_size=2, tables_per_step=3, columns_per_cycle=3,
                                  accumulator_depth=2, max_k=252, mirror=False),
    # G=4 (81 patterns, 41 mirrored entries, 7-bit indices).
    "G4T2C4D8-mirror": EngineConfig(group_size=4, tables_per_step=2, columns_per_cycle=4,
                                    accumulator_depth=8, max_k=256),
}


def _cases(cfg: EngineConfig) -> list[TlmmCase]:
    rng = np.random.default_rng(cfg.group_size * 100 + cfg.columns_per_cycle)
    k_max = cfg.max_k
    C, D = cfg.columns_per_cycle, cfg.accumulator_depth
    n_tiles = 2 * C * D + 1                   # three tiles, the last one a single column

    def rand(name, m, k, n, stall=0.0, seed=0):
        return TlmmCase(name, rng.integers(-128, 128, (m, k)), rng.integers(-1, 2, (n, k)),
                        stall, seed)

    extremes = np.stack([np.full(k_max, -128), np.full(k_max, 127),
                         np.where(np.arange(k_max) % 2, 127, -128)])
    signs = np.stack([np.full(k_max, -1), np.zeros(k_max, dtype=int), np.full(k_max, 1),
                      np.where(np.arange(k_max) % 3 == 0, 1, -1)])
    return [
        rand("random", 3, 50, 37),
        rand("random-stall-0.3", 3, 50, 37, stall=0.3, seed=11),
        rand("random-stall-0.6", 2, 61, n_tiles, stall=0.6, seed=12),
        rand("exact-multiples", 2, 2 * cfg.block_k, 2 * C),
        rand("k1-n1", 2, 1, 1, stall=0.3, seed=13),
        rand("k-below-group", 1, cfg.group_size - 1, C + 1),
        rand("several-tiles", 2, cfg.block_k + 1, n_tiles, stall=0.2, seed=14),
        # Every weight sign against the int8 extremes at the widest K the engine holds.
        TlmmCase("extremes-max-k", extremes, signs, 0.0),
        TlmmCase("extremes-max-k-stall", extremes, signs, 0.5, seed=15),
        TlmmCase("all-zero-weights", rng.integers(-128, 128, (2, 40)),
                 np.zeros((C + 3, 40), dtype=int), 0.3, seed=16),
    ]


@pytest.mark.parametrize("name", CONFIGS)
def test_tlmm_engine_bit_exact_on_verilator(name, tmp_path):
    cfg = CONFIGS[name]
    cases = _cases(cfg)
    engine, job, results, phases, cycles = run_tlmm_cases(cfg, cases, tmp_path)
    for case, got, phase, expected_cycles in zip(cases, results, phases, cycles, strict=True):
        exact = nm.ternary_matmul(case.acts, case.weights)
        np.testing.assert_array_equal(engine.model(case.acts, case.weights), exact,
                                      err_msg=f"model vs exact: {case.name}")
        np.testing.assert_array_equal(got, exact, err_msg=f"RTL vs exact: {case.name}")
        if expected_cycles is not None:
            # The performance model is cycle-exact without stalls.
            assert phase.cycles == expected_cycles, case.name
    assert sum(c is not None for c in cycles) >= 3
    extremes = results[[c.name for c in cases].index("extremes-max-k")]
    assert extremes[0, 0] == 128 * cfg.max_k   # -128 x -1 over max_k: no wrap-around


def test_steady_state_efficiency_large_k_n(tmp_path):
    """One weight beat per cycle in steady state: ideal / measured >= 0.9 for large K, N."""
    cfg = CONFIGS["G3T2C2D4-mirror"]
    cfg = EngineConfig(**{**cfg.key(), "accumulator_depth": 64, "max_k": 1536})
    rng = np.random.default_rng(1)
    case = TlmmCase("large", rng.integers(-128, 128, (1, 1536)), rng.integers(-1, 2, (512, 1536)))
    engine, job, (got,), (phase,), (expected_cycles,) = run_tlmm_cases(cfg, [case], tmp_path)
    np.testing.assert_array_equal(got, nm.ternary_matmul(case.acts, case.weights))
    assert phase.cycles == expected_cycles
    assert cfg.ideal_cycles(1, 1536, 512) / phase.cycles >= 0.9
