"""One frozen configuration tree: board -> (engine, datapath, ddr_sim) -> design.

Every value is checked when the object is built; a bad value fails at once with a message
that names it and the limit it broke. The HDL, the simulator, the host packers and the
reports all read the same objects. The weight buffer's block-memory count lives here too
(:func:`weight_buffer_blocks`), so the design's fit check and ``WeightBuffer.memory_blocks``
are one computation. See ``docs/configuration.md``.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import MISSING, dataclass, field, fields, replace

from trilut.models import numerics
from trilut.models.checks import (int_in_range, one_of, positive_int, positive_number,
                                 power_of_two)

__all__ = ["BoardResources", "BoardConfig", "EngineConfig", "DatapathConfig", "DdrSimConfig",
           "DesignConfig", "load_board", "design_for_board", "weight_buffer_blocks",
           "weight_buffer_depth", "uram_columns", "uram_cascade", "URAM_WIDTH", "URAM_DEPTH",
           "BRAM36_SHAPES", "ACTIVATIONS", "AXI_ADDR_WIDTH", "MAX_REPLAYS", "LUTRAM_MAX_DEPTH",
           "memory_blocks", "no_memory", "sum_memory"]

#: Byte-address width of the AXI masters and of the read command the host encodes (its length
#: sits above it): the Zynq UltraScale+ physical address map, 40 bits (the KV260's upper 2 GB
#: window at ``0x8_0000_0000`` needs 36; ``hdl/memory/axi.py`` says why not 32 or 49). A
#: property of the SoC's address map rather than of a datapath build, so a constant, not a
#: board-file key.
AXI_ADDR_WIDTH = 40

#: The weight buffer's largest replay count (``WeightBuffer.max_replays``; its ``replays``
#: field is 16 bits) and what the host's tile commands may ask for.
MAX_REPLAYS = 65535

#: URAM288 geometry (UltraScale+): 4096 words of 72 bits.
URAM_WIDTH = 72
URAM_DEPTH = 4096

#: RAMB36E2 aspect ratios (depth, width) usable for one simple-dual-port memory (UG573).
BRAM36_SHAPES = ((32768, 1), (16384, 2), (8192, 4), (4096, 9), (2048, 18), (1024, 36), (512, 72))

#: The gated activations the element-wise unit implements (``trilut.hdl.elementwise.activation``).
ACTIVATIONS = ("relu2", "silu")




# ---- the weight buffer's block memories: one count for the config and the HDL -------------

def uram_columns(width_bits: int) -> int:
    """URAM288 side by side for a memory ``width_bits`` wide: ``ceil(width_bits / 72)``."""
    return math.ceil(width_bits / URAM_WIDTH)


def uram_cascade(depth: int) -> int:
    """URAM288 cascaded in depth for a memory ``depth`` words deep: ``ceil(depth / 4096)``."""
    return math.ceil(depth / URAM_DEPTH)


def _bram36_blocks(width_bits: int, depth: int) -> int:
    """RAMB36E2 for one memory: the cheapest aspect ratio of :data:`BRAM36_SHAPES`."""
    return min(math.ceil(width_bits / width) * math.ceil(depth / d) for d, width in BRAM36_SHAPES)


#: Deepest memory yosys (``synth_xilinx -family xcup``) keeps in LUTs (distributed RAM): a
#: 64-deep one maps to LUTRAM and a 255-deep one to RAMB36 (measured; docs/resources.md).
LUTRAM_MAX_DEPTH = 64


def no_memory() -> dict[str, float]:
    """The ``memory_blocks()`` of a block with no block memory (registers and LUTs only)."""
    return {"bram36": 0, "uram": 0}


def sum_memory(*blocks: dict[str, float]) -> dict[str, float]:
    """The ``memory_blocks()`` of a parent: the sum of its children's."""
    return {key: sum(b[key] for b in blocks) for key in ("bram36", "uram")}


def memory_blocks(width_bits: int, depth: int, *, count: int = 1) -> dict[str, float]:
    """Block memories of ``count`` memories of ``depth`` x ``width_bits`` (a block's buffer,
    FIFO or ROM, no URAM), as yosys maps them: none up to :data:`LUTRAM_MAX_DEPTH` words (LUT
    RAM), else half a BRAM36 where one RAMB18E2 holds it, else the cheapest RAMB36E2 aspect
    ratio. Yosys can do a little better by mixing
    aspect ratios in one memory: the kv260 row buffer (1080 x 256 bits) is 12 here and 11 in
    its report (docs/row_units.md). For memories with a synchronous read port: a ROM read
    combinationally is always LUTs."""
    if depth <= LUTRAM_MAX_DEPTH:
        return no_memory()
    # RAMB18E2: each RAMB36 shape at half the depth, up to 512 x 36 (no 72-bit mode).
    if any(width_bits <= w and depth <= d // 2 for d, w in BRAM36_SHAPES if w <= 36):
        return {"bram36": 0.5 * count, "uram": 0}
    return {"bram36": count * _bram36_blocks(width_bits, depth), "uram": 0}


def weight_buffer_depth(tile_beats: int, *, one_memory: bool = False) -> int:
    """Words per weight-buffer memory: ``tile_beats`` per bank, or with ``one_memory`` both
    banks in one memory, bank 1 from address ``2**max(1, ceil(log2(tile_beats)))`` (the bank
    is the top address bit, as in ``WeightBuffer.elaborate``)."""
    int_in_range("weight_buffer.tile_beats", tile_beats, 1)
    addr_width = max(1, (tile_beats - 1).bit_length())
    return (1 << addr_width) + tile_beats if one_memory else tile_beats


def weight_buffer_blocks(engine: EngineConfig, *, tile_beats: int, uram: bool,
                         one_memory: bool = False) -> dict[str, int]:
    """Block memories of the double-buffered weight buffer (``trilut.hdl.memory.weight_buffer``):
    ``{"uram": n, "bram36": 0}`` with ``uram``, else ``{"uram": 0, "bram36": m}``.

    Two banks of ``tile_beats`` beats of ``engine.weight_beat_bits`` bits (with
    ``one_memory``, one memory holding both). URAM288: ``ceil(beat_bits / 72)`` columns of
    ``ceil(depth / 4096)`` cascaded blocks per memory. RAMB36E2: the cheapest aspect ratio per
    memory (4096 x 9 for 4096-deep banks, 512 x 72 for 512-deep ones). This is the count
    ``WeightBuffer.memory_blocks`` reports and ``DesignConfig`` checks against the board;
    tests/test_weight_buffer_resources.py checks it against yosys.
    """
    if not isinstance(engine, EngineConfig):
        raise TypeError(f"engine must be an EngineConfig, not {engine!r}")
    if not isinstance(uram, bool) or not isinstance(one_memory, bool):
        raise ValueError(f"uram and one_memory must be True or False, not {uram!r} and "
                         f"{one_memory!r}")
    depth = weight_buffer_depth(tile_beats, one_memory=one_memory)
    memories = 1 if one_memory else 2
    width = engine.weight_beat_bits
    if uram:
        return {"uram": memories * uram_columns(width) * uram_cascade(depth), "bram36": 0}
    return {"uram": 0, "bram36": memories * _bram36_blocks(width, depth)}


@dataclass(frozen=True)
class BoardResources:
    lut: int
    ff: int
    dsp: int
    bram36: int
    uram: int

    def __post_init__(self):
        for f in fields(self):
            int_in_range(f"board resource {f.name}", getattr(self, f.name), 0)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class EngineConfig:
    """Parameters of the TLMM engine (see ``trilut.hdl.linear.tlmm_engine``).

    group_size         G: activations (and weights) per table.
    tables_per_step    T: tables built from one activation block; the engine consumes G*T
                       activations per block and T indices per output column per cycle.
    columns_per_cycle  C: output columns computed every cycle.
    mirror             sign-mirror tables ((3**G-1)/2+1 entries) instead of full (3**G).
    accumulator_depth  D: column groups of C held in the accumulator memory; an output tile
                       is C*D columns and the tables are rebuilt once per tile and block.
    max_k              the widest reduction the engine must hold exactly (sets accumulator width).
    """

    group_size: int = 3
    tables_per_step: int = 28
    columns_per_cycle: int = 16
    mirror: bool = True
    accumulator_depth: int = 256
    max_k: int = 8640
    act_bits: int = numerics.ACT_BITS

    def __post_init__(self):
        for name in ("group_size", "accumulator_depth", "max_k"):
            int_in_range(f"engine.{name}", getattr(self, name), 1)
        for name in ("tables_per_step", "columns_per_cycle"):
            positive_int(f"engine.{name}", getattr(self, name), at_most=256)
        if not 2 <= self.group_size <= 5:
            raise ValueError(f"engine.group_size must be 2, 3, 4 or 5, not {self.group_size!r} "
                             "(G = 1 is a plain select; G > 5 needs more than 121 table entries)")
        if not isinstance(self.mirror, bool):
            raise ValueError(f"engine.mirror must be true or false, not {self.mirror!r}")
        if self.act_bits != numerics.ACT_BITS:
            raise ValueError(f"engine.act_bits must be {numerics.ACT_BITS} (int8 activations), "
                             f"not {self.act_bits!r}")

    @property
    def code(self) -> numerics.TableCode:
        return numerics.TableCode(self.group_size, self.mirror)

    @property
    def block_k(self) -> int:
        """Activations per block (TeLLMe: 84); K is padded to a multiple of this."""
        return self.group_size * self.tables_per_step

    @property
    def index_bits(self) -> int:
        return self.code.index_bits

    @property
    def table_entries(self) -> int:
        return self.code.entries

    @property
    def entry_width(self) -> int:
        return numerics.table_entry_width(self.group_size, self.act_bits)

    @property
    def acc_width(self) -> int:
        return numerics.accumulator_width(self.padded_k(self.max_k), self.act_bits)

    @property
    def index_vector_bits(self) -> int:
        """Index bits per output column per cycle (TeLLMe: 28 x 5 = 140)."""
        return self.tables_per_step * self.index_bits

    @property
    def weight_beat_bits(self) -> int:
        return self.columns_per_cycle * self.index_vector_bits

    @property
    def act_beat_bits(self) -> int:
        return self.block_k * self.act_bits

    def padded_k(self, k: int) -> int:
        return -(-k // self.block_k) * self.block_k

    def padded_n(self, n: int) -> int:
        return -(-n // self.columns_per_cycle) * self.columns_per_cycle

    def check_shape(self, k: int, n: int) -> None:
        int_in_range("matmul.k", k, 1)
        int_in_range("matmul.n", n, 1)
        if self.padded_k(k) > self.padded_k(self.max_k):
            raise ValueError(f"K = {k} exceeds the engine's max_k = {self.max_k} "
                             f"(its {self.acc_width}-bit accumulators would overflow)")

    def output_tiles(self, n: int) -> int:
        """Output tiles of ``C * D`` columns for a matmul with ``n`` output columns: how many
        times the engine needs each activation row (``ActQuantizer``'s ``tiles`` input; the
        host's ``numerics.tlmm_act_beats`` re-sends a row per tile)."""
        int_in_range("n_out", n, 1)
        return -(-(self.padded_n(n) // self.columns_per_cycle) // self.accumulator_depth)

    def ideal_cycles(self, m: int, k: int, n: int) -> int:
        """One weight beat per cycle: M x ceil(K / GT) x ceil(N / C)."""
        return m * (self.padded_k(k) // self.block_k) * (self.padded_n(n) // self.columns_per_cycle)

    def key(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class DatapathConfig:
    """The datapath around the engine: DDR read ports, weight buffer and element-wise units.

    ddr_word_bits    AXI data width of each DDR read port (a power of two, 32..1024); the
                     weight buffer's ``fill`` words and the AXI read master's ``data``.
    read_ports       DDR read ports feeding the weight buffer, 1..4. Only one is implemented
                     in the HDL; more is a planned feature, accepted here so that boards can
                     describe it, and refused by :class:`DesignConfig` until it exists.
    tile_beats       weight-buffer bank depth in weight beats (``WeightBuffer.tile_beats``).
    max_outstanding  AXI read bursts in flight (``AxiReadMaster.max_outstanding``), 1..16.
    lanes            fp16 values per element-wise beat (norm, quantizer, dequantizer, gated
                     activation, residual); must equal ``engine.columns_per_cycle`` so one
                     engine result beat is one element-wise beat (checked by DesignConfig).
    activation       the FFN's gated activation: "relu2" (BitNet b1.58 2B4T) or "silu".
    norm_eps         RMSNorm's epsilon, a positive float.
    """

    ddr_word_bits: int = 128
    read_ports: int = 1
    tile_beats: int = URAM_DEPTH
    max_outstanding: int = 4
    lanes: int = 16
    activation: str = "relu2"
    norm_eps: float = 1e-5

    def __post_init__(self):
        power_of_two("datapath.ddr_word_bits", self.ddr_word_bits, 32, 1024,
                     why="an AXI4 data width")
        int_in_range("datapath.read_ports", self.read_ports, 1, 4)
        int_in_range("datapath.tile_beats", self.tile_beats, 1)
        int_in_range("datapath.max_outstanding", self.max_outstanding, 1, 16)
        int_in_range("datapath.lanes", self.lanes, 1)
        one_of("datapath.activation", self.activation, ACTIVATIONS)
        positive_number("datapath.norm_eps", self.norm_eps)

    @property
    def ddr_word_bytes(self) -> int:
        return self.ddr_word_bits // 8

    def key(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class DdrSimConfig:
    """The simulated DDR (``trilut.sim.ddr_model``): a fixed latency and a sustained bandwidth.

    latency           cycles from an AR handshake to its first R beat, at least 2 (the model
                      registers the read address and the read data).
    beats_per_window  with ``window``: at most ``beats_per_window`` R beats in any ``window``
    window            cycles in the long run; ``1 <= beats_per_window <= window`` (at most one
                      beat per cycle on one port).
    """

    latency: int = 20
    beats_per_window: int = 1
    window: int = 1

    def __post_init__(self):
        # The model counts time in 32-bit signed registers (sim/ddr_model.py's _TIME_WIDTH).
        int_in_range("ddr_sim.latency", self.latency, 2, 2 ** 31 - 1,
                     why="the model registers the read address and the data")
        int_in_range("ddr_sim.window", self.window, 1)
        int_in_range("ddr_sim.beats_per_window", self.beats_per_window, 1, self.window,
                     high_name="window", why="at most one beat per cycle")

    @property
    def words_per_cycle(self) -> float:
        return self.beats_per_window / self.window

    def key(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class BoardConfig:
    name: str
    part: str
    family: str
    clock_mhz: float
    ddr_bytes_per_second: float
    resources: BoardResources
    engine: EngineConfig = field(default_factory=EngineConfig)
    datapath: DatapathConfig = field(default_factory=DatapathConfig)
    ddr_sim: DdrSimConfig = field(default_factory=DdrSimConfig)

    def __post_init__(self):
        if not self.clock_mhz > 0:
            raise ValueError(f"board {self.name}: clock_mhz must be positive, not {self.clock_mhz!r}")
        if not self.ddr_bytes_per_second > 0:
            raise ValueError(f"board {self.name}: ddr_bytes_per_second must be positive, "
                             f"not {self.ddr_bytes_per_second!r}")

    @property
    def ddr_bits_per_cycle(self) -> float:
        return self.ddr_bytes_per_second * 8 / (self.clock_mhz * 1e6)


@dataclass(frozen=True)
class DesignConfig:
    """A board, the engine and the datapath built for it; refuses a combination that cannot be
    built: lanes that differ from the engine's columns, more DDR read ports than the HDL has,
    or a weight buffer larger than the board's block memory."""

    board: BoardConfig
    engine: EngineConfig
    datapath: DatapathConfig | None = None      # None: the board's

    def __post_init__(self):
        if self.datapath is None:
            object.__setattr__(self, "datapath", self.board.datapath)
        e, d = self.engine, self.datapath
        if d.lanes != e.columns_per_cycle:
            raise ValueError(
                f"datapath.lanes ({d.lanes}) must equal engine.columns_per_cycle "
                f"({e.columns_per_cycle}): each engine result beat is one element-wise beat")
        if d.read_ports != 1:
            raise ValueError(f"datapath.read_ports = {d.read_ports}: only one DDR read port is "
                             f"implemented yet")
        res = self.board.resources
        # Boards without URAM fall back to RAMB36E2 (the cheapest aspect ratio per bank).
        uram = res.uram > 0
        need = weight_buffer_blocks(e, tile_beats=d.tile_beats, uram=uram)
        kind, key = ("URAM288", "uram") if uram else ("BRAM36", "bram36")
        have = getattr(res, key)
        if need[key] > have:
            raise ValueError(
                f"engine does not fit board {self.board.name}: a {e.weight_beat_bits}-bit "
                f"weight beat (C={e.columns_per_cycle} x T={e.tables_per_step} "
                f"x {e.index_bits} bits), double-buffered {d.tile_beats} beats deep, needs "
                f"{need[key]} {kind} but the board has {have}")

    @property
    def ddr_sim(self) -> DdrSimConfig:
        return self.board.ddr_sim

    @property
    def weight_buffer_blocks(self) -> dict[str, int]:
        """The weight buffer's block memories on this board (two separate banks)."""
        return weight_buffer_blocks(self.engine, tile_beats=self.datapath.tile_beats,
                                    uram=self.board.resources.uram > 0)


def _table(data: dict, name: str, cls, source: str, *, table: str | None = None):
    """``cls(**data[name])``; an unknown or missing key is named together with its table."""
    table = table or name
    values = data.get(name, {})
    if not isinstance(values, dict):
        raise ValueError(f"{source}: [{table}] must be a table, not {values!r}")
    known = [f.name for f in fields(cls)]
    for key in values:
        if key not in known:
            raise ValueError(f"{source}: unknown key {key!r} in [{table}] "
                             f"(known: {', '.join(known)})")
    for f in fields(cls):
        if f.name not in values and f.default is MISSING and f.default_factory is MISSING:
            raise ValueError(f"{source}: missing key {f.name!r} in [{table}]")
    try:
        return cls(**values)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


_BOARD_KEYS = ("name", "part", "family", "clock_mhz", "ddr_bytes_per_second", "resources")
_TABLES = ("board", "engine", "datapath", "ddr_sim")


def _board_from_toml(text: str, source: str) -> BoardConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{source}: not valid TOML: {e}") from None
    for key in data:
        if key not in _TABLES:
            raise ValueError(f"{source}: unknown table [{key}] (known: {', '.join(_TABLES)})")
    b = data.get("board")
    if not isinstance(b, dict):
        raise ValueError(f"{source}: missing key 'board'")
    for key in b:
        if key not in _BOARD_KEYS:
            raise ValueError(f"{source}: unknown key {key!r} in [board] "
                             f"(known: {', '.join(_BOARD_KEYS)})")
    for key in _BOARD_KEYS:
        if key not in b:
            raise ValueError(f"{source}: missing key {key!r}")
    resources = _table(b, "resources", BoardResources, source, table="board.resources")
    engine = _table(data, "engine", EngineConfig, source)
    datapath = _table(data, "datapath", DatapathConfig, source)
    ddr_sim = _table(data, "ddr_sim", DdrSimConfig, source)
    return BoardConfig(name=b["name"], part=b["part"], family=b["family"],
                       clock_mhz=b["clock_mhz"], ddr_bytes_per_second=b["ddr_bytes_per_second"],
                       resources=resources, engine=engine, datapath=datapath, ddr_sim=ddr_sim)


def load_board(name_or_path: str) -> BoardConfig:
    """A board by built-in name (``kv260``) or by the path of a TOML file."""
    from pathlib import Path

    from trilut import boards
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.is_file():
        return _board_from_toml(path.read_text(), str(path))
    return _board_from_toml(boards.board_text(name_or_path), f"board {name_or_path}")


def design_for_board(name_or_path: str, *, datapath_overrides: dict | None = None,
                     **engine_overrides) -> DesignConfig:
    """The board's design, with engine keys and datapath keys replaced.

    ``datapath.lanes`` follows an overridden ``columns_per_cycle`` unless ``datapath_overrides``
    sets it: lanes must equal C, so that is the only value that builds."""
    board = load_board(name_or_path)
    engine = replace(board.engine, **engine_overrides) if engine_overrides else board.engine
    datapath_overrides = dict(datapath_overrides or {})
    if "columns_per_cycle" in engine_overrides:
        datapath_overrides.setdefault("lanes", engine.columns_per_cycle)
    datapath = replace(board.datapath, **datapath_overrides)
    return DesignConfig(board=board, engine=engine, datapath=datapath)
