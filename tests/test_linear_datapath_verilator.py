# amaranth: UnusedElaboratable=no
"""The ternary linear layer fed from DDR: image -> DDR model -> AXI read master -> weight
buffer -> TLMM engine, cycle-accurate on Verilator, bit for bit against the engine's model.

Real shapes of the tiny test model (q_proj 256 x 256, gate_proj 256 -> 640, down_proj
640 -> 256), int8 activations quantized from what the golden model feeds those layers, random
stalls on every stream, both buffer schedules (a row's weights replayed from one tile; a row
streamed in several tiles, re-read from DDR per row); and, without stalls, the cycles equal
``WeightFedTlmm.expected_cycles`` exactly, for decode and prefill, at full, half and 3/5 DDR
rate, with the DDR latency hidden and not (a long latency, one or two bursts in flight).
"""

import numpy as np
import pytest
import torch

from trilut.config import DdrSimConfig, EngineConfig
from trilut.hdl.memory.axi import AxiReadMaster, ReadJob
from trilut.host.layer_runs import layer_from_ddr_job, run_job, with_expected_cycles
from trilut.host.weight_image import compile_weight_image
from trilut.models import numerics as nm
from trilut.models.checkpoint import build_tiny_checkpoint, load_checkpoint
from trilut.sim.transport import SimulationTransport, block_job, expected_cycles

pytestmark = pytest.mark.rtl

ENGINE = EngineConfig(group_size=3, tables_per_step=4, columns_per_cycle=4, accumulator_depth=16,
                      max_k=1024)
SETTINGS = {
    # Full rate (one 64-bit word per cycle), short latency; a tile holds a whole q_proj row.
    "ddr-full-rate": (DdrSimConfig(latency=20, beats_per_window=1, window=1), 2048),
    # Half rate, long latency; 512-beat tiles, so rows stream in several tiles.
    "ddr-half-rate": (DdrSimConfig(latency=40, beats_per_window=1, window=2), 512),
}

Q, GATE, DOWN = "layers.0.self_attn.q_proj", "layers.0.mlp.gate_proj", "layers.1.mlp.down_proj"
#: Stall-free cases: (layer, rows, DDR, tile_beats, max_outstanding or None, latency hidden),
#: with the cycles measured (equal to the model).
EXACT = {
    "decode-full-rate": (Q, 1, DdrSimConfig(latency=20), 2048, None, True),          # 2978
    "prefill-replayed": (Q, 3, DdrSimConfig(latency=20), 2048, None, True),          # 7069
    "prefill-restreamed-half-rate": (DOWN, 3, DdrSimConfig(latency=40, window=2), 512, None,
                                     True),                                           # 41648
    "prefill-slow-ddr-3-of-5": (DOWN, 2, DdrSimConfig(latency=60, beats_per_window=3,
                                                      window=5), 512, None, True),    # 23236
    "decode-latency-300": (Q, 1, DdrSimConfig(latency=300), 512, None, False),       # 3488
    "prefill-one-burst-in-flight": (Q, 2, DdrSimConfig(latency=30), 512, 1, False),  # 6450
    "decode-64-beat-tiles-2-of-3": (GATE, 1, DdrSimConfig(latency=100, beats_per_window=2,
                                                          window=3), 64, 2, True),    # 10732
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
@pytest.mark.parametrize("layer", [Q, DOWN])
def test_layer_from_ddr_bit_exact_under_stalls(model_and_image, setting, layer, tmp_path):
    model, image = model_and_image
    ddr, tile_beats = SETTINGS[setting]
    acts = layer_acts(model, layer, rows=3)
    job = layer_from_ddr_job(image, layer, acts, ddr=ddr, tile_beats=tile_beats, stall=0.3,
                             seed=7)
    (got,), _ = run_job(SimulationTransport(tmp_path), job)
    values, _scale = model.linear_weights()[layer]
    # The image stores Q's rows in RoPE pair order (WeightImage.row_order).
    stored = values.numpy()[image.row_order(layer)]
    np.testing.assert_array_equal(got, nm.ternary_matmul(acts, stored))
    np.testing.assert_array_equal(got, job.expected[0])


@pytest.mark.parametrize("case", EXACT)
def test_layer_from_ddr_cycles_exact(model_and_image, case, tmp_path):
    """Without stalls the measured cycles equal ``WeightFedTlmm.expected_cycles``."""
    model, image = model_and_image
    layer, rows, ddr, tile_beats, max_outstanding, hidden = EXACT[case]
    job = layer_from_ddr_job(image, layer, layer_acts(model, layer, rows), ddr=ddr,
                             tile_beats=tile_beats, max_outstanding=max_outstanding)
    phase = job.run.phases[0]
    expected = expected_cycles(job.request, phase)
    # The case covers what it says: the AXI master's latency hidden, or not.
    dp = job.request.params["datapath"]
    master = AxiReadMaster(data_width=dp.ddr_word_bits, max_outstanding=dp.max_outstanding)
    assert master.hides_latency(ReadJob(block_job(job.request, phase).reads, ddr)) == hidden
    job = with_expected_cycles(job, [expected])
    (got,), (result,) = run_job(SimulationTransport(tmp_path), job)
    np.testing.assert_array_equal(got, job.expected[0])
    print(f"{case}: {result.cycles} cycles measured, {expected} expected "
          f"({job.weight_words} DDR words)")
    assert result.cycles == expected
