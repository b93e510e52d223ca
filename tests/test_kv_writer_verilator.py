# amaranth: UnusedElaboratable=no
"""The KV-cache writer on Verilator: rows of lane beats written through the AXI4 write master
into the DDR model at the KvLayout addresses, read back through the model's peek port.

Per configuration (lanes wider than, equal to and narrower than the DDR word; full-rate and
slow DDR) one build runs: a prefill of several positions for every KV head, then single
decode positions, then a read-back of the whole region compared with the writer's model (so
a row at a wrong address, a lost or duplicated word and a stray write all fail). Stall-free
phases assert ``expected_cycles`` exactly; the same phases run again under random stalls on
``x`` and ``done``.
"""

import numpy as np
import pytest

from trilut.config import DdrSimConfig
from trilut.hdl.attention.kv_writer import KvCacheWriter, KvWriteJob
from trilut.models.kv_cache import KvLayout
from trilut.sim.ddr_model import DdrHarness, DdrModel
from trilut.sim.transport import run_stream_on
from trilut.transport import StreamPhase, StreamRun

CONFIGS = {
    # lanes, head_dim, word bits, DDR beats/window, window, b latency
    "l16-w128-full": (16, 64, 128, 1, 1, 2),
    "l8-w128-half": (8, 32, 128, 1, 2, 6),
    "l4-w128-full": (4, 32, 128, 1, 1, 3),
}
DEPTH = 1024                                   # 128-bit words: 16 KiB


def _setup(name):
    lanes, d, word_bits, b, w, b_lat = CONFIGS[name]
    layout = KvLayout(layers=2, kv_heads=3, max_context=16, head_dim=d)
    writer = KvCacheWriter(layout, lanes=lanes, word_bits=word_bits, addr_width=40,
                           max_outstanding=4)
    ddr = DdrModel(depth=DEPTH, data_width=word_bits, addr_width=40, write=True,
                   ddr=DdrSimConfig(latency=8, beats_per_window=b, window=w), b_latency=b_lat)
    return layout, writer, DdrHarness(writer, ddr), (b, w, b_lat)


def _lane_beats(rows, lanes):
    flat = np.asarray(rows, dtype=np.uint16).reshape(-1, lanes).astype(object)
    return [sum(int(v) << (16 * i) for i, v in enumerate(beat)) for beat in flat]


@pytest.mark.rtl
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_rows_land_at_their_layout_addresses(name, tmp_path):
    layout, writer, top, (b, w, b_lat) = _setup(name)
    lanes = writer.lanes
    rng = np.random.default_rng(len(name))
    memory = {a: 0 for a in range(DEPTH)}
    # (layer, first position, positions, heads): a prefill, decode steps, a partial head set.
    writes = [(0, 0, 5, 3), (1, 0, 5, 3), (0, 5, 1, 3), (1, 5, 1, 3), (1, 6, 2, 2)]
    phases, expected_cycles = [], {}
    for stall in (0.0, 0.3):
        for i, (layer, position, positions, heads) in enumerate(writes):
            if stall:
                position += 8                   # fresh rows, so the read-back sees both runs
            rows = rng.integers(0, 1 << 16, (positions, heads, layout.head_dim), dtype=np.uint16)
            base = layout.k_base + layer * layout.layer_stride
            job = KvWriteJob(layout, base=base, position=position, positions=positions,
                             heads=heads, beats_per_window=b, window=w, b_latency=b_lat)
            memory = writer.model(memory, job, rows)
            label = f"write{i}-stall{stall}"
            cycles = None if stall else writer.expected_cycles(job)
            expected_cycles[label] = cycles
            phases.append(StreamPhase(
                name=label, stall=stall, seed=i, expected_cycles=cycles,
                inputs={"job": [writer.job_payload(job)], "x": _lane_beats(rows, lanes)},
                expected={"done": [0] * (positions * heads)}, flags={"idle": 1},
                settle_cycles=30))
    phases.append(StreamPhase(name="read-back", inputs={"peek": list(range(DEPTH))},
                              expected={"peek_data": [memory[a] for a in range(DEPTH)]}))
    results = run_stream_on(top, StreamRun(phases, clean_flags=("write_violations", "error")),
                            name="kv_writer", run_dir=tmp_path)
    for phase in results:
        if expected_cycles.get(phase.name) is not None:
            print(f"{name} {phase.name}: {phase.cycles} cycles")
            assert phase.cycles == expected_cycles[phase.name], phase.name


@pytest.mark.fast
def test_layout_addresses_and_refusals():
    lay = KvLayout(layers=2, kv_heads=3, max_context=16, head_dim=64)
    assert lay.row_bytes == 128 and lay.head_stride == 2048 and lay.region_bytes == 12288
    assert lay.v_base == 12288
    assert lay.address("k", 1, 2, 5) == 1 * 6144 + 2 * 2048 + 5 * 128
    assert lay.address("v", 0, 0, 0) == 12288
    with pytest.raises(ValueError, match="position 16 is outside"):
        lay.address("k", 0, 0, 16)
    with pytest.raises(ValueError, match="15 positions in the KV cache plus 2 new"):
        lay.check_room(15, 2)
    with pytest.raises(ValueError, match="outside the K region"):
        KvLayout(layers=2, kv_heads=3, max_context=16, head_dim=64, v_base=8192)
    rows = np.arange(128, dtype=np.uint16).reshape(2, 64)
    assert np.array_equal(lay.words_to_rows(lay.rows_to_words(rows, 128), 128), rows)
    with pytest.raises(ValueError, match="lanes \\(48\\) must divide"):
        KvCacheWriter(lay, lanes=48, word_bits=128, addr_width=40, max_outstanding=4)
    with pytest.raises(ValueError, match=r"heads must be an integer from 1 to kv_heads \(3\)"):
        KvWriteJob(lay, base=0, position=0, positions=1, heads=4, beats_per_window=1,
                   window=1, b_latency=2)
    with pytest.raises(ValueError, match="exceed the context"):
        KvWriteJob(lay, base=0, position=10, positions=7, heads=1, beats_per_window=1,
                   window=1, b_latency=2)
