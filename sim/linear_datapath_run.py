"""Run a model's ternary linear layer on the DDR-fed datapath (Verilator) and compare.

The weights come from the compiled DDR weight image (``trilut.host.weight_image``), placed in
the simulated DDR at their image offsets; the host issues the tile schedule and streams the
int8 activation blocks; the results must equal the engine's bit-exact model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trilut.config import EngineConfig
from trilut.hdl.linear_datapath import WeightFedTlmmHarness, weight_schedule
from trilut.host.weight_image import WeightImage
from trilut.models import numerics as nm
from trilut.sim.runner import run_case

__all__ = ["DdrSetting", "DatapathOutcome", "run_layer_from_ddr", "weight_feed_spec"]


@dataclass(frozen=True)
class DdrSetting:
    """The DDR model: fixed latency and a sustained bandwidth of beats_per_window words per
    window cycles (docs/memory.md)."""
    latency: int = 20
    beats_per_window: int = 1
    window: int = 1

    @property
    def words_per_cycle(self) -> float:
        return self.beats_per_window / self.window


@dataclass(frozen=True)
class DatapathOutcome:
    layer: str
    results: np.ndarray           # RTL, int64 [M, N]
    expected: np.ndarray          # the engine's bit-exact model
    cycles: int                   # first command taken .. last result out
    engine_cycles: int            # the engine alone with weights always there
    weight_feed_cycles: float     # weight words read from DDR / DDR words per cycle
    tiles: int

    @property
    def exact(self) -> bool:
        return np.array_equal(self.results, self.expected)


def weight_feed_spec(image: WeightImage, layer: str, rows: int, datapath, ddr_model):
    """What a testbench needs to feed ``layer`` from DDR for ``rows`` activation rows: the
    backdoor writes placing the layer's words at their image addresses (the DDR model wraps
    addresses modulo its depth, so a small model holds any one layer), the AXI read and buffer
    tile commands, and the engine's shape inputs. Returns ``(spec, schedule)``."""
    cfg = image.engine
    n, k = image.layer_values(layer).shape
    span = image.ddr_span(layer)
    if span.words > ddr_model.depth:
        raise ValueError(f"{layer} spans {span.words} DDR words; the DDR model has "
                         f"{ddr_model.depth}")
    schedule = weight_schedule(
        address=span.address, beats_per_row=len(image.layer_beats(layer)), rows=rows,
        words_per_beat=image.words_per_beat, word_bytes=image.ddr_word_bits // 8,
        tile_beats=datapath.buffer.tile_beats)
    length_offset = datapath.master.cmd_layout["length"].offset
    spec = {
        "k_blocks": cfg.padded_k(k) // cfg.block_k,
        "n_groups": cfg.padded_n(n) // cfg.columns_per_cycle,
        "word_addr_width": ddr_model.word_addr_width,
        "ddr": [[(span.first_word + i) % ddr_model.depth, format(w, "x")]
                for i, w in enumerate(image.layer_words(layer))],
        "cmd": [t.address | t.words << length_offset for t in schedule],
        "tiles": [datapath.buffer.command(t.beats, t.replays) for t in schedule],
    }
    return spec, schedule


def run_layer_from_ddr(image: WeightImage, layer: str, acts: np.ndarray, *,
                       ddr: DdrSetting = DdrSetting(), tile_beats: int = 4096,
                       ddr_words: int = 8192, stall: float = 0.0, seed: int = 1,
                       run_dir: Path | None = None) -> DatapathOutcome:
    cfg: EngineConfig = image.engine
    values = image.layer_values(layer)
    n, k = values.shape
    m = acts.shape[0]
    cfg.check_shape(k, n)
    harness = WeightFedTlmmHarness(cfg, ddr_words=ddr_words, word_bits=image.ddr_word_bits,
                                   tile_beats=tile_beats, latency=ddr.latency,
                                   beats_per_window=ddr.beats_per_window, window=ddr.window)
    dp = harness.datapath
    T, C, D = cfg.tables_per_step, cfg.columns_per_cycle, cfg.accumulator_depth
    expected = dp.engine.model(acts, values)
    spec, schedule = weight_feed_spec(image, layer, m, dp, harness.ddr)
    spec.update({
        "acts": [format(b, "x") for b in nm.tlmm_act_beats(acts, cfg.code, T, C, D, n)],
        "expected": [format(b, "x") for b in nm.tlmm_result_beats(expected, C, cfg.acc_width)],
        "stall": stall, "seed": seed,
    })
    seen, _ = run_case(harness, name="weight_fed_tlmm", test_module="trilut.sim.tb_linear_datapath",
                       case=spec, run_dir=run_dir)
    beats = [int(b, 16) for b in seen["results"]]
    words_read = sum(t.words for t in schedule)
    return DatapathOutcome(
        layer=layer, expected=expected,
        results=nm.tlmm_unpack_results(beats, m, n, C, cfg.acc_width),
        cycles=seen["cycles"], engine_cycles=dp.engine.expected_cycles(m, k, n),
        weight_feed_cycles=words_read / ddr.words_per_cycle, tiles=len(schedule))
