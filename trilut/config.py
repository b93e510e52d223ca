"""One frozen configuration tree: board -> engine -> design.

Every value is checked when the object is built; a bad value fails at once with a message
that names it and the limit it broke. The HDL, the simulator, the host packers and the
reports all read the same objects.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields, replace

from trilut.models import numerics

__all__ = ["BoardResources", "BoardConfig", "EngineConfig", "DesignConfig", "DdrSimConfig", "load_board",
           "design_for_board", "URAM_WIDTH", "URAM_DEPTH"]

#: URAM288 geometry (UltraScale+): 4096 words of 72 bits.
URAM_WIDTH = 72
URAM_DEPTH = 4096


def _positive_int(owner: str, name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}.{name} must be a positive integer, not {value!r}")


@dataclass(frozen=True)
class BoardResources:
    lut: int
    ff: int
    dsp: int
    bram36: int
    uram: int

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"board resource {f.name} must be a non-negative integer, not {v!r}")

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class EngineConfig:
    """Parameters of the TLMM engine (see ``trilut.hdl.tlmm_engine``).

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
        owner = "engine"
        for name in ("group_size", "tables_per_step", "columns_per_cycle", "accumulator_depth",
                     "max_k"):
            _positive_int(owner, name, getattr(self, name))
        if not 2 <= self.group_size <= 5:
            raise ValueError(f"engine.group_size must be 2, 3, 4 or 5, not {self.group_size!r} "
                             "(G = 1 is a plain select; G > 5 needs more than 121 table entries)")
        if not isinstance(self.mirror, bool):
            raise ValueError(f"engine.mirror must be true or false, not {self.mirror!r}")
        if self.act_bits != numerics.ACT_BITS:
            raise ValueError(f"engine.act_bits must be {numerics.ACT_BITS} (int8 activations), "
                             f"not {self.act_bits!r}")
        if self.tables_per_step > 256:
            raise ValueError(f"engine.tables_per_step must be at most 256, not {self.tables_per_step}")
        if self.columns_per_cycle > 256:
            raise ValueError(f"engine.columns_per_cycle must be at most 256, "
                             f"not {self.columns_per_cycle}")

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
        _positive_int("matmul", "k", k)
        _positive_int("matmul", "n", n)
        if self.padded_k(k) > self.padded_k(self.max_k):
            raise ValueError(f"K = {k} exceeds the engine's max_k = {self.max_k} "
                             f"(its {self.acc_width}-bit accumulators would overflow)")

    def ideal_cycles(self, m: int, k: int, n: int) -> int:
        """One weight beat per cycle: M x ceil(K / GT) x ceil(N / C)."""
        return m * (self.padded_k(k) // self.block_k) * (self.padded_n(n) // self.columns_per_cycle)

    def weight_buffer_urams(self, tile_beats: int = URAM_DEPTH) -> int:
        """URAM288 needed to feed one weight beat per cycle, double-buffered (two banks of
        ``tile_beats`` beats; URAM288 is 4096 x 72)."""
        return 2 * math.ceil(self.weight_beat_bits / URAM_WIDTH) * math.ceil(tile_beats / URAM_DEPTH)

    def weight_buffer_bram36(self, tile_beats: int = URAM_DEPTH) -> int:
        """The same banks in RAMB36 (512 x 72 at full width) on a board without URAM."""
        return 2 * math.ceil(self.weight_beat_bits / URAM_WIDTH) * math.ceil(tile_beats / 512)

    def key(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class DdrSimConfig:
    """The simulated DDR model (``trilut.sim.ddr_model.DdrModel``): fixed ``latency`` cycles
    from an AR handshake to its first R beat, and a sustained bandwidth of
    ``beats_per_window`` words per ``window`` cycles (docs/memory.md)."""

    latency: int = 20
    beats_per_window: int = 1
    window: int = 1

    def __post_init__(self):
        for name in ("latency", "beats_per_window", "window"):
            _positive_int("ddr_sim", name, getattr(self, name))
        if self.latency < 2:
            raise ValueError(f"ddr_sim.latency must be at least 2 cycles, not {self.latency!r}")
        if self.beats_per_window > self.window:
            raise ValueError(f"ddr_sim.beats_per_window must be at most window ({self.window}): "
                             f"at most one word per cycle, not {self.beats_per_window!r}")

    @property
    def words_per_cycle(self) -> float:
        return self.beats_per_window / self.window


@dataclass(frozen=True)
class BoardConfig:
    name: str
    part: str
    family: str
    clock_mhz: float
    ddr_bytes_per_second: float
    resources: BoardResources
    engine: EngineConfig = field(default_factory=EngineConfig)

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
    """A board and the engine built for it; refuses an engine that cannot fit the board."""

    board: BoardConfig
    engine: EngineConfig

    def __post_init__(self):
        res = self.board.resources
        # Boards without URAM fall back to BRAM36 (512 x 72: eight per URAM288's depth).
        if res.uram:
            need, have, kind = self.engine.weight_buffer_urams(), res.uram, "URAM288"
        else:
            need, have, kind = self.engine.weight_buffer_bram36(), res.bram36, "BRAM36"
        if need > have:
            raise ValueError(
                f"engine does not fit board {self.board.name}: a {self.engine.weight_beat_bits}-bit "
                f"weight beat (C={self.engine.columns_per_cycle} x T={self.engine.tables_per_step} "
                f"x {self.engine.index_bits} bits), double-buffered, needs {need} {kind} "
                f"but the board has {have}")


def _board_from_toml(text: str, source: str) -> BoardConfig:
    try:
        data = tomllib.loads(text)
        b = data["board"]
        resources = BoardResources(**b["resources"])
        engine = EngineConfig(**data.get("engine", {}))
        return BoardConfig(name=b["name"], part=b["part"], family=b["family"],
                           clock_mhz=b["clock_mhz"], ddr_bytes_per_second=b["ddr_bytes_per_second"],
                           resources=resources, engine=engine)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{source}: not valid TOML: {e}") from None
    except KeyError as e:
        raise ValueError(f"{source}: missing key {e.args[0]!r}") from None
    except TypeError as e:
        raise ValueError(f"{source}: {e}") from None


def load_board(name_or_path: str) -> BoardConfig:
    """A board by built-in name (``kv260``) or by the path of a TOML file."""
    from pathlib import Path

    from trilut import boards
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.is_file():
        return _board_from_toml(path.read_text(), str(path))
    return _board_from_toml(boards.board_text(name_or_path), f"board {name_or_path}")


def design_for_board(name_or_path: str, **engine_overrides) -> DesignConfig:
    board = load_board(name_or_path)
    engine = replace(board.engine, **engine_overrides) if engine_overrides else board.engine
    return DesignConfig(board=board, engine=engine)
