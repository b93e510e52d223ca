"""Weight schedules: how the host feeds a layer's weights from DDR to the engine.

For every tile the host issues two commands: an AXI read of the tile's words (``cmd`` of
``hdl.axi.AxiReadMaster``: byte address, length in words) and a weight-buffer command
(``tiles`` of ``hdl.weight_buffer.WeightBuffer``: length in beats, replays). A tile replayed R
times serves R activation rows without reading DDR again, which is possible when a row's
whole weight stream fits one buffer bank; otherwise every row streams the layer from DDR
again (decode does exactly that: M = 1). docs/linear_datapath.md has the measured cycles.

The command words' bit layouts are the hardware's stream payloads;
``tests/test_host_schedule.py`` checks that these encoders and the HDL's layouts agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# One definition each, shared with the HDL (``AxiReadMaster``, ``WeightBuffer``).
from trilut.config import AXI_ADDR_WIDTH, MAX_REPLAYS
from trilut.host.weight_image import WeightImage

__all__ = ["TileCommand", "STREAM_TILE_BEATS", "AXI_ADDR_WIDTH", "MAX_REPLAYS",
           "weight_schedule", "read_command", "tile_command", "WeightFeed", "weight_feed",
           "ddr_depth_for"]

#: Tile size when a row streams straight through (no replay): small tiles let the next tile's
#: fill overlap this one's stream from the start (a single tile would fill completely first).
STREAM_TILE_BEATS = 256


@dataclass(frozen=True)
class TileCommand:
    address: int        # byte address of the tile's first word in DDR
    words: int          # DDR words to read
    beats: int          # weight beats in the tile
    replays: int        # how many activation rows stream this tile


def weight_schedule(*, address: int, beats_per_row: int, rows: int, words_per_beat: int,
                    word_bytes: int, tile_beats: int) -> list[TileCommand]:
    """The (AXI read, buffer tile) commands that stream a layer of ``beats_per_row`` beats,
    stored at ``address``, to the engine for ``rows`` activation rows."""
    if rows > 1 and beats_per_row <= tile_beats:
        # The whole row's stream fits one bank: read it once, replay it for every row.
        return [TileCommand(address, beats_per_row * words_per_beat, beats_per_row, rows)]
    chunk = min(tile_beats, STREAM_TILE_BEATS)
    chunks = []
    for start in range(0, beats_per_row, chunk):
        beats = min(chunk, beats_per_row - start)
        chunks.append(TileCommand(address + start * words_per_beat * word_bytes,
                                  beats * words_per_beat, beats, 1))
    return chunks * rows


def read_command(address: int, words: int) -> int:
    """The AXI read master's ``cmd`` payload: ``addr`` in the low bits, ``length`` above."""
    return address | words << AXI_ADDR_WIDTH


def tile_command(beats: int, replays: int, *, tile_beats: int) -> int:
    """The weight buffer's ``tiles`` payload: ``length`` (``tile_beats.bit_length()`` bits),
    then ``replays``. Refuses a tile the hardware cannot hold."""
    if not 1 <= beats <= tile_beats:
        raise ValueError(f"a tile holds 1 to {tile_beats} beats, not {beats!r}")
    if not 1 <= replays <= MAX_REPLAYS:
        raise ValueError(f"a tile is streamed 1 to {MAX_REPLAYS} times, not {replays!r}")
    return beats | replays << tile_beats.bit_length()


@dataclass(frozen=True)
class WeightFeed:
    """What the hardware needs to stream one layer from DDR for ``rows`` activation rows."""
    memory: dict[int, int]          # DDR word address (modulo the model's depth) -> word
    cmd: list[int]                  # AXI read commands
    tiles: list[int]                # weight-buffer commands
    schedule: list[TileCommand]
    k_blocks: int                   # the engine's shape inputs
    n_groups: int

    @property
    def words_read(self) -> int:
        return sum(t.words for t in self.schedule)


def weight_feed(image: WeightImage, layer: str, rows: int, *, tile_beats: int,
                ddr_depth: int) -> WeightFeed:
    """The backdoor words placing ``layer`` at its image addresses (a simulated DDR of
    ``ddr_depth`` words wraps addresses modulo its depth, so a small one holds any one
    layer), the tile schedule and the engine's shape inputs."""
    cfg = image.engine
    n, k = image.layer_values(layer).shape
    span = image.ddr_span(layer)
    if span.words > ddr_depth:
        raise ValueError(f"{layer} spans {span.words} DDR words; the DDR holds {ddr_depth}")
    schedule = weight_schedule(
        address=span.address, beats_per_row=len(image.layer_beats(layer)), rows=rows,
        words_per_beat=image.words_per_beat, word_bytes=image.ddr_word_bits // 8,
        tile_beats=tile_beats)
    return WeightFeed(
        memory={(span.first_word + i) % ddr_depth: w
                for i, w in enumerate(image.layer_words(layer))},
        cmd=[read_command(t.address, t.words) for t in schedule],
        tiles=[tile_command(t.beats, t.replays, tile_beats=tile_beats) for t in schedule],
        schedule=schedule,
        k_blocks=cfg.padded_k(k) // cfg.block_k,
        n_groups=cfg.padded_n(n) // cfg.columns_per_cycle)


def ddr_depth_for(image: WeightImage, names) -> int:
    """The smallest power-of-two DDR model depth in which the layers' spans, wrapped modulo the
    depth, do not overlap."""
    spans = [image.ddr_span(n) for n in names]
    depth = 1 << (max(sum(s.words for s in spans) - 1, 1)).bit_length()
    while True:
        used = np.zeros(depth, dtype=bool)
        ok = True
        for s in spans:
            idx = (s.first_word + np.arange(s.words)) % depth
            if s.words > depth or used[idx].any():
                ok = False
                break
            used[idx] = True
        if ok:
            return depth
        depth *= 2
