"""Fast tier: the TLMM engine in Amaranth's own simulator, small configs, random stalls.

The cycle-accurate Verilator tests (test_tlmm_engine_verilator.py) are the main check; these
catch regressions in seconds and exercise the sub-components' models.
"""

import random

import numpy as np
import pytest
from amaranth.sim import Simulator

from trilut.config import EngineConfig
from trilut.hdl.linear.tlmm_engine import ColumnLookup, TableBuilder, TlmmEngine
from trilut.models import numerics as nm

pytestmark = pytest.mark.fast


def run_engine(cfg, x, w, *, seed, p_valid=0.7, p_ready=0.7, max_cycles=20000):
    dut = TlmmEngine(cfg)
    m, k = x.shape
    n = w.shape[0]
    T, C, D = cfg.tables_per_step, cfg.columns_per_cycle, cfg.accumulator_depth
    weight_beats = nm.tlmm_weight_beats(w, cfg.code, T, C, D) * m
    act_beats = nm.tlmm_act_beats(x, cfg.code, T, C, D, n)
    n_groups = cfg.padded_n(n) // C
    got = []

    async def testbench(ctx):
        ctx.set(dut.k_blocks, cfg.padded_k(k) // cfg.block_k)
        ctx.set(dut.n_groups, n_groups)
        rng = random.Random(seed)
        wv = av = False
        for _ in range(max_cycles):
            if len(got) == m * n_groups:
                break
            # A source may raise valid at will but must hold it (and the payload) until taken.
            wv = bool(weight_beats) and (wv or rng.random() < p_valid)
            av = bool(act_beats) and (av or rng.random() < p_valid)
            ready = rng.random() < p_ready
            ctx.set(dut.weights.valid, wv)
            ctx.set(dut.acts.valid, av)
            if weight_beats:
                ctx.set(dut.weights.payload.as_value(), weight_beats[0])
            if act_beats:
                ctx.set(dut.acts.payload.as_value(), act_beats[0])
            ctx.set(dut.results.ready, ready)
            *_, w_ready, a_ready, r_valid, r_payload = await ctx.tick().sample(
                dut.weights.ready, dut.acts.ready, dut.results.valid, dut.results.payload.as_value())
            if wv and w_ready:
                weight_beats.pop(0)
                wv = False
            if av and a_ready:
                act_beats.pop(0)
                av = False
            if ready and r_valid:
                got.append(r_payload)
        assert not weight_beats and not act_beats, "engine did not take every beat"

    sim = Simulator(dut)
    sim.add_clock(4e-9)
    sim.add_testbench(testbench)
    sim.run()
    return nm.tlmm_unpack_results(got, m, n, C, cfg.acc_width), dut


CONFIGS = [
    EngineConfig(group_size=3, tables_per_step=2, columns_per_cycle=2, accumulator_depth=4, max_k=256),
    EngineConfig(group_size=2, tables_per_step=3, columns_per_cycle=3, accumulator_depth=2, max_k=256,
                 mirror=False),
    EngineConfig(group_size=4, tables_per_step=1, columns_per_cycle=4, accumulator_depth=8, max_k=256),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"G{c.group_size}T{c.tables_per_step}"
                         f"C{c.columns_per_cycle}D{c.accumulator_depth}{'m' if c.mirror else 'f'}")
def test_engine_random_under_stalls(cfg):
    rng = np.random.default_rng(cfg.group_size)
    x = rng.integers(-128, 128, (2, 23))
    w = rng.integers(-1, 2, (13, 23))
    got, dut = run_engine(cfg, x, w, seed=cfg.columns_per_cycle)
    np.testing.assert_array_equal(got, nm.ternary_matmul(x, w))
    np.testing.assert_array_equal(got, dut.model(x, w))


def test_engine_extremes_under_stalls():
    cfg = CONFIGS[0]
    k = cfg.max_k
    x = np.full((2, k), -128)
    x[1] = 127
    w = np.stack([np.full(k, -1), np.full(k, 1), np.zeros(k, dtype=int)])
    got, _ = run_engine(cfg, x, w, seed=3)
    np.testing.assert_array_equal(got, nm.ternary_matmul(x, w))
    assert got[0, 0] == 128 * k  # the accumulator holds the extreme without wrapping


def test_table_builder_and_lookup_models():
    cfg = CONFIGS[0]
    rng = np.random.default_rng(1)
    acts = rng.integers(-128, 128, cfg.block_k)
    builder = TableBuilder(cfg)
    lookup = ColumnLookup(cfg)
    idx = rng.integers(0, cfg.code.entries, cfg.tables_per_step)
    expected_tables = builder.model(acts)

    async def testbench(ctx):
        for j, a in enumerate(acts):
            ctx.set(builder.acts[j], int(a))
        for t in range(cfg.tables_per_step):
            ctx.set(lookup.indices[t], int(idx[t]))
            for e in range(cfg.table_entries):
                ctx.set(lookup.tables[t][e], ctx.get(builder.tables[t][e]))
        got = np.array([[ctx.get(builder.tables[t][e]) for e in range(cfg.table_entries)]
                        for t in range(cfg.tables_per_step)])
        np.testing.assert_array_equal(got, expected_tables)
        expected_sum = nm.lookup(expected_tables, idx[:, None], cfg.code).sum()
        assert ctx.get(lookup.sum) == expected_sum

    from amaranth.hdl import Module
    top = Module()
    top.submodules.builder = builder
    top.submodules.lookup = lookup
    sim = Simulator(top)
    sim.add_testbench(testbench)
    sim.run()
