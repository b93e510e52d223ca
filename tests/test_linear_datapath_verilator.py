"""The ternary linear layer fed from DDR: image -> DDR model -> AXI read master -> weight
buffer -> TLMM engine, cycle-accurate on Verilator, bit for bit against the engine's model.

Real shapes of the tiny test model (q_proj 256 x 256, down_proj 640 -> 256), int8 activations
quantized from what the golden model feeds those layers, two DDR bandwidth/latency settings,
random stalls on every stream, and both buffer schedules (a row's weights replayed from one
tile; a row streamed in several tiles, re-read from DDR per row).
"""

import numpy as np
import pytest
import torch

from trilut.config import DdrSimConfig, EngineConfig
from trilut.hdl.linear.tlmm_engine import TlmmEngine
from trilut.host.layer_runs import layer_from_ddr_job, run_job
from trilut.host.weight_image import compile_weight_image
from trilut.models import numerics as nm
from trilut.models.checkpoint import build_tiny_checkpoint, load_checkpoint
from trilut.sim.transport import SimulationTransport

pytestmark = pytest.mark.rtl

ENGINE = EngineConfig(group_size=3, tables_per_step=4, columns_per_cycle=4, accumulator_depth=16,
                      max_k=1024)
SETTINGS = {
    # Full rate (one 64-bit word per cycle), short latency; a tile holds a whole q_proj row.
    "ddr-full-rate": (DdrSimConfig(latency=20, beats_per_window=1, window=1), 2048),
    # Half rate, long latency; 512-beat tiles, so rows stream in several tiles.
    "ddr-half-rate": (DdrSimConfig(latency=40, beats_per_window=1, window=2), 512),
}


@pytest.fixture(scope="module")
def model_and_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    build_tiny_checkpoint(path)
    model = load_checkpoint(path)
    return model, compile_weight_image(model, ENGINE, ddr_word_bits=64)


def layer_acts(model, layer, rows):
    ids = torch.tensor(list(b"ternary lookups"))[:rows]
    x = model.capture_linear_inputs(ids, [layer])[layer]
    return nm.int8_quantize(x.reshape(-1, x.shape[-1]))[0].numpy().astype(np.int64)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("layer", ["layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"])
def test_layer_from_ddr_bit_exact_under_stalls(model_and_image, setting, layer, tmp_path):
    model, image = model_and_image
    ddr, tile_beats = SETTINGS[setting]
    acts = layer_acts(model, layer, rows=3)
    job = layer_from_ddr_job(image, layer, acts, ddr=ddr, tile_beats=tile_beats, stall=0.3,
                             seed=7)
    (got,), _ = run_job(SimulationTransport(tmp_path), job)
    values, _scale = model.linear_weights()[layer]
    np.testing.assert_array_equal(got, nm.ternary_matmul(acts, values.numpy()))
    np.testing.assert_array_equal(got, job.expected[0])


@pytest.mark.parametrize("setting", SETTINGS)
def test_layer_from_ddr_cycles_against_the_bounds(model_and_image, setting, tmp_path):
    """Without stalls the datapath is bound by the engine or by the weight feed from DDR."""
    model, image = model_and_image
    ddr, tile_beats = SETTINGS[setting]
    layer = "layers.0.self_attn.q_proj"
    acts = layer_acts(model, layer, rows=1)
    job = layer_from_ddr_job(image, layer, acts, ddr=ddr, tile_beats=tile_beats)
    (got,), (phase,) = run_job(SimulationTransport(tmp_path), job)
    np.testing.assert_array_equal(got, job.expected[0])
    n, k = image.layer_values(layer).shape
    engine_cycles = TlmmEngine(image.engine).expected_cycles(1, k, n)
    bound = max(engine_cycles, job.weight_words / ddr.words_per_cycle)
    assert phase.cycles >= bound
    # Decode (one row): the weights cross DDR once; overheads are latency and tile turnarounds.
    assert phase.cycles <= 1.15 * bound + 200, (phase.cycles, bound)
