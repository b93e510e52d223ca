"""The host's command encoders against the HDL's stream layouts, and the weight schedule."""

import pytest
from amaranth.hdl import Const

from trilut.config import EngineConfig
from trilut.hdl.memory.axi import AxiReadMaster
from trilut.hdl.memory.weight_buffer import WeightBuffer
from trilut.host.schedule import (MAX_REPLAYS, STREAM_TILE_BEATS, read_command, tile_command,
                                  weight_schedule)

pytestmark = pytest.mark.fast

ENGINE = EngineConfig(group_size=3, tables_per_step=4, columns_per_cycle=4, accumulator_depth=16,
                      max_k=1024)


@pytest.mark.parametrize("tile_beats", [512, 2048, 4096])
def test_tile_command_is_the_weight_buffer_layout(tile_beats):
    buffer = WeightBuffer(ENGINE, tile_beats=tile_beats, word_bits=64)
    assert buffer.max_replays == MAX_REPLAYS
    for beats, replays in [(1, 1), (tile_beats, 1), (17, 3), (tile_beats, MAX_REPLAYS)]:
        assert tile_command(beats, replays, tile_beats=tile_beats) == buffer.command(beats, replays)
    with pytest.raises(ValueError, match="a tile holds 1 to"):
        tile_command(tile_beats + 1, 1, tile_beats=tile_beats)
    with pytest.raises(ValueError, match="streamed 1 to"):
        tile_command(1, 0, tile_beats=tile_beats)


def test_read_command_is_the_axi_master_layout():
    master = AxiReadMaster(data_width=64, max_outstanding=4)
    for addr, words in [(0, 1), (0x12_3456_7800, 300), ((1 << 40) - 8, 5)]:
        packed = Const.cast(master.cmd_layout.const({"addr": addr, "length": words})).value
        assert read_command(addr, words) == packed


def test_schedule_replays_a_row_that_fits_and_streams_one_that_does_not():
    fits = weight_schedule(address=0x1000, beats_per_row=100, rows=3, words_per_beat=2,
                           word_bytes=8, tile_beats=512)
    assert [(t.address, t.words, t.beats, t.replays) for t in fits] == [(0x1000, 200, 100, 3)]
    streamed = weight_schedule(address=0, beats_per_row=600, rows=2, words_per_beat=2,
                               word_bytes=8, tile_beats=512)
    chunks = [STREAM_TILE_BEATS, STREAM_TILE_BEATS, 600 - 2 * STREAM_TILE_BEATS]
    assert [t.beats for t in streamed] == chunks * 2
    assert [t.address for t in streamed[:3]] == [0, 256 * 16, 512 * 16]
    assert all(t.replays == 1 for t in streamed)
