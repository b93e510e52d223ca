"""The table-lookup ternary matmul (TLMM) engine.

``y[m, n] = sum_k x[m, k] * W[n, k]`` with int8 ``x`` and ternary ``W`` given as table
indices (``trilut.models.numerics.TableCode``). For every block of ``G*T`` activations the
engine builds ``T`` tables (every signed sum of ``G`` activations) once, then each output
column does one lookup and one add per table: no multiplier anywhere.

Loop order (what the streams carry, see ``numerics.tlmm_weight_beats``)::

    for each activation row m:
        for each output tile of C*D columns (D = accumulator_depth column groups):
            for each K block kb:                         # one act beat: G*T int8
                for each column group d in the tile:     # one weight beat: C x T indices
                    acc[d] (+)= sum_t lookup(table_t, index[c, t])   for c in 0..C-1
            emit the tile: one result beat of C accumulators per column group

Tables are rebuilt once per (tile, block), so a tile of D groups amortizes the build over
D cycles; partial sums live in an accumulator memory of D words of C x acc_width bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from trilut.config import EngineConfig, memory_blocks, no_memory
from trilut.hdl.elementwise.lanes import FixedLatency
from trilut.models import numerics
from trilut.models.checks import positive_int

__all__ = ["TableBuilder", "ColumnLookup", "TlmmEngine", "TlmmJob", "weight_beat_layout"]

#: Width of the ``n_groups`` shape input: up to 65535 groups of C columns.
N_GROUPS_WIDTH = 16


def _act_layout(cfg: EngineConfig) -> data.ArrayLayout:
    return data.ArrayLayout(signed(cfg.act_bits), cfg.block_k)


def weight_beat_layout(cfg: EngineConfig) -> data.ArrayLayout:
    """One weight beat: ``C`` columns of ``T`` indices; field (c, t) at bit (c*T + t)*b."""
    return data.ArrayLayout(data.ArrayLayout(unsigned(cfg.index_bits), cfg.tables_per_step),
                            cfg.columns_per_cycle)


def _result_layout(cfg: EngineConfig) -> data.ArrayLayout:
    return data.ArrayLayout(signed(cfg.acc_width), cfg.columns_per_cycle)


class TableBuilder(FixedLatency, wiring.Component):
    """Combinational: one activation block (``G*T`` int8) -> ``T`` tables of partial sums.

    Entry ``e`` of table ``t`` is ``sum_i p[e][i] * acts[t*G + i]`` with ``p`` the constant
    ternary pattern of entry ``e`` (``TableCode.entry_patterns``); only adds and subtracts.
    Ports are arrays of narrow signals rather than one wide vector: Verilator turns slices of
    multi-thousand-bit vectors into word-by-word C++, which made the kv260 build 10x slower.
    """

    def __init__(self, cfg: EngineConfig):
        self._cfg = cfg
        super().__init__({
            "acts": In(signed(cfg.act_bits)).array(cfg.block_k),
            "tables": Out(signed(cfg.entry_width)).array(cfg.tables_per_step, cfg.table_entries),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self._cfg
        patterns = cfg.code.entry_patterns
        for t in range(cfg.tables_per_step):
            group = [self.acts[t * cfg.group_size + i] for i in range(cfg.group_size)]
            for e, pattern in enumerate(patterns):
                total = Const(0, signed(cfg.entry_width))
                for a, p in zip(group, pattern):
                    if p == 1:
                        total = total + a
                    elif p == -1:
                        total = total - a
                m.d.comb += self.tables[t][e].eq(total)
        return m

    #: Combinational: the tables of a block the cycle it is presented.
    latency = 0

    def model(self, acts: np.ndarray) -> np.ndarray:
        return numerics.build_tables(acts, self._cfg.code)

    def memory_blocks(self) -> dict[str, float]:
        """None: adders (the tables are the engine's registers)."""
        return no_memory()


class ColumnLookup(FixedLatency, wiring.Component):
    """Combinational: one output column's ``T`` lookups (sign applied) and their sum."""

    def __init__(self, cfg: EngineConfig):
        self._cfg = cfg
        self.sum_width = cfg.entry_width + max(1, (cfg.tables_per_step - 1).bit_length())
        super().__init__({
            "tables": In(signed(cfg.entry_width)).array(cfg.tables_per_step, cfg.table_entries),
            "indices": In(unsigned(cfg.index_bits)).array(cfg.tables_per_step),
            "sum": Out(signed(self.sum_width)),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self._cfg
        code = cfg.code
        terms = []
        for t in range(cfg.tables_per_step):
            # A lookup is a word select from the table's entries laid side by side: one
            # shift in Verilator's C++ (an Array index became a 14-branch if-chain per lookup,
            # 448 of them in the kv260 engine); yosys maps either to the same LUT mux tree.
            row = Cat(*self.tables[t])
            index = self.indices[t]
            term = Signal(signed(cfg.entry_width + 1), name=f"term{t}")
            if code.mirror:
                magnitude = Signal(signed(cfg.entry_width), name=f"magnitude{t}")
                m.d.comb += magnitude.eq(row.word_select(index[:code.magnitude_bits],
                                                         cfg.entry_width))
                # The sign-mirror trick: half the table, the sign folded into the adder tree.
                m.d.comb += term.eq(Mux(index[code.magnitude_bits], -magnitude, magnitude))
            else:
                entry = Signal(signed(cfg.entry_width), name=f"entry{t}")
                m.d.comb += entry.eq(row.word_select(index, cfg.entry_width))
                m.d.comb += term.eq(entry)
            terms.append(term)
        # Balanced adder tree.
        while len(terms) > 1:
            terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i]
                     for i in range(0, len(terms), 2)]
        m.d.comb += self.sum.eq(terms[0])
        return m

    #: Combinational: the column's sum the cycle its indices are presented.
    latency = 0

    def model(self, tables, indices) -> int:
        """``tables[T, entries]`` and one column's ``indices[T]`` -> the sum of its ``T``
        lookups (``numerics.lookup``, mirror signs applied)."""
        tables = np.asarray(tables, dtype=np.int64)
        idx = np.asarray(indices, dtype=np.int64)[:, None]
        return int(numerics.lookup(tables, idx, self._cfg.code).sum())

    def memory_blocks(self) -> dict[str, float]:
        """None: LUT multiplexers and an adder tree."""
        return no_memory()


@dataclass(frozen=True)
class TlmmJob:
    """A matmul through :class:`TlmmEngine`: ``rows`` activation rows of ``k`` elements
    against ``n`` output columns, streams never stalling."""

    rows: int
    k: int
    n: int

    def __post_init__(self):
        for name in ("rows", "k", "n"):
            positive_int(name, getattr(self, name))


class TlmmEngine(wiring.Component):
    """Streaming TLMM engine.

    Streams (``amaranth.lib.stream``, valid/ready; a beat moves when both are high on a
    clock edge):

    * ``acts`` in: one activation block per beat, ``G*T`` signed int8. One beat per
      (row, tile, K block); it is taken together with the block's first weight beat.
    * ``weights`` in: one beat per (row, tile, K block, column group): ``C`` columns x ``T``
      table indices (``numerics.tlmm_weight_beats`` builds the stream).
    * ``results`` out: one beat per (row, column group), in column order: ``C`` signed
      accumulators of ``acc_width`` bits, exact (no saturation can occur for K <= max_k).

    Shape inputs ``k_blocks`` (= K_padded / (G*T)) and ``n_groups`` (= N_padded / C) must be
    at least 1 and held constant while a matmul is in flight.

    Throughput: one weight beat per cycle when the streams keep up. Tiles narrower than 3
    column groups stall a cycle or two per beat for the accumulator read-after-write hazard.
    Latency: a last-block weight beat leaves as a result beat 3 cycles after it is taken.
    """

    def __init__(self, cfg: EngineConfig):
        if not isinstance(cfg, EngineConfig):
            raise TypeError(f"cfg must be an EngineConfig, not {cfg!r}")
        self.cfg = cfg
        self.k_blocks_width = max(1, (cfg.padded_k(cfg.max_k) // cfg.block_k).bit_length())
        super().__init__({
            "acts": In(stream.Signature(_act_layout(cfg))),
            "weights": In(stream.Signature(weight_beat_layout(cfg))),
            "results": Out(stream.Signature(_result_layout(cfg))),
            "k_blocks": In(unsigned(self.k_blocks_width)),
            "n_groups": In(unsigned(N_GROUPS_WIDTH)),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.cfg
        depth = cfg.accumulator_depth
        C = cfg.columns_per_cycle
        addr_width = max(1, (depth - 1).bit_length())

        m.submodules.table_builder = builder = TableBuilder(cfg)
        tables = [[Signal(signed(cfg.entry_width), name=f"table{t}_{e}")
                   for e in range(cfg.table_entries)] for t in range(cfg.tables_per_step)]

        m.submodules.accumulators = accs = Memory(
            shape=_result_layout(cfg), depth=depth, init=[])
        rd = accs.read_port()
        wr = accs.write_port()

        # ---- S0: sequencer over (tile, K block, column group) -----------------------------
        kb = Signal(self.k_blocks_width)
        d = Signal(addr_width)
        tile_start = Signal(N_GROUPS_WIDTH)
        remaining = Signal(N_GROUPS_WIDTH)
        tile_depth = Signal(N_GROUPS_WIDTH)
        m.d.comb += [
            remaining.eq(self.n_groups - tile_start),
            tile_depth.eq(Mux(remaining > depth, depth, remaining)),
        ]
        first = kb == 0
        last = kb == self.k_blocks - 1
        new_block = d == 0

        # ---- pipeline registers ------------------------------------------------------------
        s1_valid = Signal()
        s1_idx = [[Signal(cfg.index_bits, name=f"s1_idx{c}_{t}")
                   for t in range(cfg.tables_per_step)] for c in range(C)]
        s1_d = Signal(addr_width)
        s1_first = Signal()
        s1_last = Signal()

        s2_valid = Signal()
        s2_partial = [Signal(signed(cfg.acc_width), name=f"s2_partial{c}") for c in range(C)]
        s2_old = Signal(_result_layout(cfg))
        s2_d = Signal(addr_width)
        s2_first = Signal()
        s2_last = Signal()

        out_valid = Signal()
        out_payload = Signal(_result_layout(cfg))

        # Back-to-front advance conditions.
        out_free = ~out_valid | self.results.ready
        s2_advance = s2_valid & (~s2_last | out_free)
        s2_free = ~s2_valid | s2_advance
        s1_advance = s1_valid & s2_free
        s1_free = ~s1_valid | s1_advance

        # The accumulator word for group d is written back when its beat leaves S2; a beat
        # that must read it (not the first block) waits while an older beat for d is in flight.
        hazard = ~first & (
            (s1_valid & ~s1_last & (s1_d == d)) | (s2_valid & ~s2_last & (s2_d == d)))
        can_take = s1_free & ~hazard & self.weights.valid & (~new_block | self.acts.valid)
        take = Signal()
        m.d.comb += [
            take.eq(can_take),
            self.weights.ready.eq(s1_free & ~hazard & (~new_block | self.acts.valid)),
            self.acts.ready.eq(s1_free & ~hazard & new_block & self.weights.valid),
            *(builder.acts[j].eq(self.acts.payload[j]) for j in range(cfg.block_k)),
            rd.addr.eq(d),
            rd.en.eq(take),
        ]

        with m.If(take):
            with m.If(new_block):
                m.d.sync += [tables[t][e].eq(builder.tables[t][e])
                             for t in range(cfg.tables_per_step)
                             for e in range(cfg.table_entries)]
            with m.If(d == tile_depth - 1):
                m.d.sync += d.eq(0)
                with m.If(last):
                    m.d.sync += kb.eq(0)
                    with m.If(tile_start + tile_depth >= self.n_groups):
                        m.d.sync += tile_start.eq(0)          # row done
                    with m.Else():
                        m.d.sync += tile_start.eq(tile_start + tile_depth)
                with m.Else():
                    m.d.sync += kb.eq(kb + 1)
            with m.Else():
                m.d.sync += d.eq(d + 1)

        with m.If(s1_free):
            m.d.sync += s1_valid.eq(take)
        with m.If(take):
            m.d.sync += [s1_idx[c][t].eq(self.weights.payload[c][t])
                         for c in range(C) for t in range(cfg.tables_per_step)]
            m.d.sync += [s1_d.eq(d), s1_first.eq(first), s1_last.eq(last)]

        # ---- S1: lookups and adder trees; the accumulator read lands here -----------------
        for c in range(C):
            lookup = ColumnLookup(cfg)
            m.submodules[f"column{c}"] = lookup
            m.d.comb += [lookup.tables[t][e].eq(tables[t][e])
                         for t in range(cfg.tables_per_step) for e in range(cfg.table_entries)]
            m.d.comb += [lookup.indices[t].eq(s1_idx[c][t]) for t in range(cfg.tables_per_step)]
            with m.If(s1_advance):
                m.d.sync += s2_partial[c].eq(lookup.sum)

        with m.If(s2_free):
            m.d.sync += s2_valid.eq(s1_advance)
        with m.If(s1_advance):
            m.d.sync += [s2_old.eq(rd.data), s2_d.eq(s1_d),
                         s2_first.eq(s1_first), s2_last.eq(s1_last)]

        # ---- S2: accumulate; write back, or hand the finished sums to the output ----------
        total = Signal(_result_layout(cfg))
        for c in range(C):
            m.d.comb += total[c].eq(Mux(s2_first, 0, s2_old[c]) + s2_partial[c])
        m.d.comb += [
            wr.addr.eq(s2_d),
            wr.data.eq(total),
            wr.en.eq(s2_valid & ~s2_last),
        ]

        with m.If(out_free):
            m.d.sync += out_valid.eq(s2_valid & s2_last)
            m.d.sync += out_payload.eq(total)
        m.d.comb += [self.results.valid.eq(out_valid), self.results.payload.eq(out_payload)]
        return m

    # ---- what it computes, what it costs in time ---------------------------------------------

    def model(self, acts, weights) -> np.ndarray:
        """Bit-exact model: the engine's algorithm (tables + lookups) on ``acts[M, K]``,
        ``weights[N, K]``; returns int64 ``[M, N]``. Equal to ``numerics.ternary_matmul``."""
        return numerics.tlmm_matmul(acts, weights, self.cfg.code, self.cfg.tables_per_step)

    def memory_blocks(self) -> dict[str, float]:
        """The accumulator memory, ``accumulator_depth`` words of ``C * acc_width`` bits
        (kv260: 256 x 352 bits, 5 RAMB36 in 512 x 72 mode, as yosys maps it;
        docs/resources.md)."""
        cfg = self.cfg
        return memory_blocks(cfg.columns_per_cycle * cfg.acc_width, cfg.accumulator_depth)

    def expected_cycles(self, job: TlmmJob) -> int:
        """Cycles from the first beat taken to the last result out, with streams that never
        stall: one beat per cycle plus the pipeline latency, plus hazard stalls of tiles
        narrower than 3 groups."""
        cfg = self.cfg
        m = job.rows
        k_blocks = cfg.padded_k(job.k) // cfg.block_k
        n_groups = cfg.padded_n(job.n) // cfg.columns_per_cycle
        cycles = 0
        for start in range(0, n_groups, cfg.accumulator_depth):
            depth = min(cfg.accumulator_depth, n_groups - start)
            # A beat of a non-first block waits for the write-back of the same group's beat
            # (3 cycles after it was taken) when the tile has fewer than 3 groups.
            per_block = max(depth, 3) if k_blocks > 1 else depth
            cycles += depth + (k_blocks - 1) * per_block
        return m * cycles + 3
