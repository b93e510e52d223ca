# amaranth: UnusedElaboratable=no
"""The configuration tree refuses bad values when it is built, naming value and limit."""

import json
from dataclasses import replace

import pytest

from trilut import boards
from trilut.config import (DatapathConfig, DdrSimConfig, DesignConfig, EngineConfig,
                           design_for_board, load_board, weight_buffer_blocks)
from trilut.generate import generate

pytestmark = pytest.mark.fast


def test_kv260_defaults_follow_tellme():
    design = design_for_board("kv260")
    e = design.engine
    assert (e.group_size, e.tables_per_step, e.columns_per_cycle) == (3, 28, 16)
    assert e.block_k == 84 and e.index_vector_bits == 140
    assert design.weight_buffer_blocks == {"uram": 64, "bram36": 0}
    assert design.weight_buffer_blocks["uram"] <= design.board.resources.uram


@pytest.mark.parametrize("kwargs,match", [
    ({"group_size": 0}, "group_size must be a positive integer, not 0"),
    ({"group_size": 7}, "group_size must be 2, 3, 4 or 5, not 7"),
    ({"tables_per_step": "28"}, "tables_per_step must be a positive integer, not '28'"),
    ({"columns_per_cycle": -1}, "columns_per_cycle must be a positive integer"),
    ({"mirror": 1}, "mirror must be true or false"),
    ({"act_bits": 4}, "act_bits must be 8"),
])
def test_engine_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs)


def test_engine_that_does_not_fit_the_board_is_refused():
    with pytest.raises(ValueError, match=r"does not fit board kv260: .* needs 126 URAM288 but the board has 64"):
        design_for_board("kv260", columns_per_cycle=32)


def test_shape_beyond_max_k_is_refused():
    e = EngineConfig(max_k=168)
    e.check_shape(168, 10)
    with pytest.raises(ValueError, match="K = 169 exceeds the engine's max_k = 168"):
        e.check_shape(169, 10)


def test_unknown_and_malformed_boards(tmp_path):
    with pytest.raises(ValueError, match="unknown board 'zcu999'; known boards: kv260"):
        load_board("zcu999")
    bad = tmp_path / "bad.toml"
    bad.write_text('[board]\nname = "x"\n')
    with pytest.raises(ValueError, match=r"bad.toml: missing key 'part'"):
        load_board(str(bad))


def test_generate_writes_verilog_and_manifest(tmp_path):
    design = design_for_board("kv260", tables_per_step=2, columns_per_cycle=2, accumulator_depth=4)
    manifest = generate(design, tmp_path)
    assert (tmp_path / "tlmm_engine.v").read_text().count("module tlmm_engine") == 1
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == manifest
    ports = {p["name"]: p for p in manifest["ports"]["tlmm_engine"]}
    assert ports["weights__payload"]["width"] == design.engine.weight_beat_bits
    assert ports["acts__payload"]["width"] == design.engine.act_beat_bits
    assert ports["results__payload"]["width"] == 2 * design.engine.acc_width
    assert ports["results__valid"]["direction"] == "output"
    # Every manifest port is a port of the Verilog module, with that width.
    verilog = (tmp_path / "tlmm_engine.v").read_text()
    for p in manifest["ports"]["tlmm_engine"]:
        width = f"[{p['width'] - 1}:0] " if p["width"] > 1 else ""
        assert f"  {p['direction']} {width}{p['name']};" in verilog


def test_generate_with_a_model_writes_its_weight_image(tmp_path):
    from trilut.host.weight_image import load_weight_image
    from trilut.models.checkpoint import build_tiny_checkpoint
    build_tiny_checkpoint(tmp_path / "model")
    design = design_for_board("kv260", tables_per_step=2, columns_per_cycle=2, accumulator_depth=4)
    manifest = generate(design, tmp_path / "out", model=tmp_path / "model")
    image = load_weight_image(tmp_path / "out" / "weights.bin", engine=design.engine)
    assert manifest["weight_image"]["bytes"] == len(image)
    layers = manifest["weight_image"]["layers"]
    assert set(layers) == set(image.layer_names())
    q = image.ddr_span("layers.0.self_attn.q_proj")
    assert layers["layers.0.self_attn.q_proj"] == {"address": q.address, "words": q.words}


def test_a_board_without_uram_counts_bram36_in_the_cheapest_shape(tmp_path):
    path = tmp_path / "no_uram.toml"
    path.write_text(boards.board_text("kv260").replace("uram = 64", "uram = 0"))
    board = load_board(str(path))          # the board alone is fine; its kv260 engine is not
    # 2 banks x ceil(2240 / 9) RAMB36E2 as 4096 x 9: the count WeightBuffer.memory_blocks gives.
    with pytest.raises(ValueError, match="4096 beats deep, needs 498 BRAM36 but the board has 144"):
        DesignConfig(board=board, engine=board.engine)
    # 512-deep banks fit RAMB36E2 as 512 x 72: 2 x ceil(2240 / 72) = 64.
    shallow = DesignConfig(board=board, engine=board.engine,
                           datapath=replace(board.datapath, tile_beats=512))
    assert shallow.weight_buffer_blocks == {"uram": 0, "bram36": 64}


def test_generate_with_the_datapath_writes_every_block(tmp_path):
    from trilut.generate import design_components
    from trilut.hdl.verilog import convert
    design = design_for_board("kv260", tables_per_step=2, columns_per_cycle=2, accumulator_depth=4,
                              max_k=64, datapath_overrides={"ddr_word_bits": 64, "tile_beats": 512})
    manifest = generate(design, tmp_path, datapath=True)
    # The datapath is sized from the configuration tree, and the manifest says so.
    assert manifest["datapath"]["ddr_word_bits"] == 64
    assert manifest["weight_buffer"] == design.weight_buffer_blocks
    # What is shipped is the one conversion, the text the simulator builds and yosys reads.
    for name, component in design_components(design, datapath=True).items():
        assert (tmp_path / f"{name}.v").read_text() == convert(component, name=name).text
    assert set(manifest["modules"]) == {"tlmm_engine", "axi_read_master", "weight_buffer",
                                        "rms_norm", "act_quantizer", "dequantizer",
                                        "gated_activation", "residual_add"}
    ports = {name: {p["name"]: p["width"] for p in plist}
             for name, plist in manifest["ports"].items()}
    # The blocks agree on the widths where they meet.
    assert ports["weight_buffer"]["beats__payload"] == ports["tlmm_engine"]["weights__payload"]
    assert ports["act_quantizer"]["acts__payload"] == ports["tlmm_engine"]["acts__payload"]
    assert ports["dequantizer"]["acc__payload"] == ports["tlmm_engine"]["results__payload"]
    assert ports["weight_buffer"]["fill__payload"] == ports["axi_read_master"]["data__payload"] == 64
    for name in manifest["modules"]:
        assert (tmp_path / f"{name}.v").read_text().count(f"module {name}(") == 1


# ---- datapath and simulated DDR ------------------------------------------------------------

def test_kv260_datapath_and_ddr_sim_defaults():
    board = load_board("kv260")
    assert board.datapath == DatapathConfig() == DatapathConfig(
        ddr_word_bits=128, read_ports=1, tile_beats=4096, max_outstanding=4, lanes=16,
        activation="relu2", norm_eps=1e-5)
    assert board.ddr_sim == DdrSimConfig(latency=20, beats_per_window=1, window=1)
    assert board.ddr_sim.words_per_cycle == 1.0
    assert DdrSimConfig(latency=40, beats_per_window=3, window=4).words_per_cycle == 0.75
    design = design_for_board("kv260")
    assert design.datapath == board.datapath
    assert design.ddr_sim == board.ddr_sim
    assert design.datapath.lanes == design.engine.columns_per_cycle


def test_a_board_without_datapath_tables_gets_the_defaults(tmp_path):
    text = boards.board_text("kv260").split("[datapath]")[0]
    path = tmp_path / "bare.toml"
    path.write_text(text)
    board = load_board(str(path))
    assert board.datapath == DatapathConfig() and board.ddr_sim == DdrSimConfig()


@pytest.mark.parametrize("cls,kwargs,match", [
    (DatapathConfig, {"ddr_word_bits": 12},
     r"datapath.ddr_word_bits must be a power of two from 32 to 1024 \(an AXI4 data width\), "
     r"not 12"),
    (DatapathConfig, {"ddr_word_bits": 96},
     r"datapath.ddr_word_bits must be a power of two .* not 96"),
    (DatapathConfig, {"ddr_word_bits": 2048}, r"datapath.ddr_word_bits .* 32 to 1024.* not 2048"),
    (DatapathConfig, {"ddr_word_bits": 16}, r"datapath.ddr_word_bits .* not 16"),
    (DatapathConfig, {"ddr_word_bits": 128.0}, r"datapath.ddr_word_bits .* not 128.0"),
    (DatapathConfig, {"read_ports": 0},
     "datapath.read_ports must be an integer from 1 to 4, not 0"),
    (DatapathConfig, {"read_ports": 5},
     "datapath.read_ports must be an integer from 1 to 4, not 5"),
    (DatapathConfig, {"tile_beats": 0}, "datapath.tile_beats must be a positive integer, not 0"),
    (DatapathConfig, {"tile_beats": True},
     "datapath.tile_beats must be a positive integer, not True"),
    (DatapathConfig, {"max_outstanding": 0},
     "datapath.max_outstanding must be an integer from 1 to 16, not 0"),
    (DatapathConfig, {"max_outstanding": 17},
     "datapath.max_outstanding must be an integer from 1 to 16, not 17"),
    (DatapathConfig, {"lanes": 0}, "datapath.lanes must be a positive integer, not 0"),
    (DatapathConfig, {"activation": "gelu"},
     "datapath.activation must be one of relu2, silu, not 'gelu'"),
    (DatapathConfig, {"norm_eps": 0.0}, "datapath.norm_eps must be a positive number, not 0.0"),
    (DatapathConfig, {"norm_eps": -1e-5}, "datapath.norm_eps must be a positive number"),
    (DatapathConfig, {"norm_eps": "1e-5"},
     "datapath.norm_eps must be a positive number, not '1e-5'"),
    (DatapathConfig, {"norm_eps": float("nan")},
     "datapath.norm_eps must be a positive number, not nan"),
    (DdrSimConfig, {"latency": 1}, r"ddr_sim.latency must be an integer from 2 to \d+ .* not 1"),
    (DdrSimConfig, {"latency": 2 ** 31},
     r"ddr_sim.latency must be an integer from 2 to 2147483647"),
    (DdrSimConfig, {"window": 0}, "ddr_sim.window must be a positive integer, not 0"),
    (DdrSimConfig, {"beats_per_window": 2},
     r"ddr_sim.beats_per_window must be an integer from 1 to window \(1\) \(at most one "
     r"beat per cycle\), not 2"),
    (DdrSimConfig, {"beats_per_window": 0, "window": 4},
     r"ddr_sim.beats_per_window must be an integer from 1 to window \(4\).* not 0"),
])
def test_datapath_and_ddr_sim_reject_bad_values(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_a_bad_value_in_the_board_file_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(boards.board_text("kv260").replace("ddr_word_bits = 128", "ddr_word_bits = 12"))
    with pytest.raises(ValueError, match=r"bad.toml: datapath.ddr_word_bits must be a power of "
                                         r"two from 32 to 1024 .*not 12"):
        load_board(str(path))


@pytest.mark.parametrize("old,new,match", [
    ("max_k = 8640", "max_k = 8640\nmax_kk = 1", r"unknown key 'max_kk' in \[engine\]"),
    ("tile_beats = 4096", "tile_beat = 4096", r"unknown key 'tile_beat' in \[datapath\]"),
    ("latency = 20", "latency = 20\nburst = 4", r"unknown key 'burst' in \[ddr_sim\]"),
    ("uram = 64", "uram = 64\nlutram = 1", r"unknown key 'lutram' in \[board.resources\]"),
    ("clock_mhz = 250", "clock_mhz = 250\nclock = 1", r"unknown key 'clock' in \[board\]"),
    ("[ddr_sim]", "[ddr]", r"unknown table \[ddr\] \(known: board, engine, datapath, ddr_sim\)"),
    ("uram = 64", "", r"missing key 'uram' in \[board.resources\]"),
])
def test_unknown_and_missing_keys_name_the_key_and_the_table(tmp_path, old, new, match):
    text = boards.board_text("kv260")
    assert old in text
    path = tmp_path / "typo.toml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ValueError, match=r"typo.toml: " + match):
        load_board(str(path))


def test_lanes_must_equal_the_engine_columns():
    board = load_board("kv260")
    with pytest.raises(ValueError, match=r"datapath.lanes \(8\) must equal "
                                         r"engine.columns_per_cycle \(16\)"):
        design_for_board("kv260", datapath_overrides={"lanes": 8})
    small = replace(board.engine, columns_per_cycle=4)
    with pytest.raises(ValueError, match=r"datapath.lanes \(16\) must equal "
                                         r"engine.columns_per_cycle \(4\)"):
        DesignConfig(board=board, engine=small)
    # design_for_board lets lanes follow an overridden C (the only value that builds) ...
    assert design_for_board("kv260", columns_per_cycle=4).datapath.lanes == 4
    # ... unless the caller says otherwise.
    with pytest.raises(ValueError, match=r"datapath.lanes \(16\) must equal"):
        design_for_board("kv260", columns_per_cycle=4, datapath_overrides={"lanes": 16})


def test_more_than_one_read_port_is_described_but_refused():
    assert DatapathConfig(read_ports=4).read_ports == 4      # a board may describe it
    with pytest.raises(ValueError, match="datapath.read_ports = 2: only one DDR read port is "
                                         "implemented yet"):
        design_for_board("kv260", datapath_overrides={"read_ports": 2})


def test_datapath_overrides_reach_the_fit_check():
    design = design_for_board("kv260", datapath_overrides={"ddr_word_bits": 64, "tile_beats": 512,
                                                           "activation": "silu"})
    assert (design.datapath.ddr_word_bits, design.datapath.activation) == (64, "silu")
    assert design.weight_buffer_blocks == {"uram": 64, "bram36": 0}
    # 8192-deep banks cascade two URAM288 per column: 128 > 64.
    with pytest.raises(ValueError,
                       match=r"8192 beats deep, needs 128 URAM288 but the board has 64"):
        design_for_board("kv260", datapath_overrides={"tile_beats": 8192})


# ---- one weight-buffer count -----------------------------------------------------------------

# G=2 (4-bit indices) x 9 tables x 4 columns = a 144-bit beat (tests/test_weight_buffer_resources).
SMALL = EngineConfig(group_size=2, tables_per_step=9, columns_per_cycle=4, accumulator_depth=4,
                     max_k=256)


@pytest.mark.parametrize("engine", [EngineConfig(), SMALL], ids=["kv260", "small"])
@pytest.mark.parametrize("tile_beats", [1, 512, 2048, 4096, 5000])
@pytest.mark.parametrize("one_memory", [False, True])
@pytest.mark.parametrize("uram", [True, False])
def test_config_count_is_the_weight_buffer_count(engine, tile_beats, one_memory, uram):
    from trilut.hdl.memory.weight_buffer import WeightBuffer
    buffer = WeightBuffer(engine, tile_beats=tile_beats, word_bits=128, one_memory=one_memory)
    blocks = weight_buffer_blocks(engine, tile_beats=tile_beats, uram=uram, one_memory=one_memory)
    assert blocks == buffer.memory_blocks(uram=uram)
    assert blocks["bram36" if uram else "uram"] == 0


def test_kv260_weight_buffer_counts():
    from trilut.hdl.memory.weight_buffer import WeightBuffer
    board = load_board("kv260")
    e, tile = board.engine, board.datapath.tile_beats
    no_uram = replace(board, resources=replace(board.resources, uram=0))
    assert weight_buffer_blocks(e, tile_beats=tile, uram=True) == {"uram": 64, "bram36": 0}
    assert weight_buffer_blocks(e, tile_beats=tile, uram=False) == {"uram": 0, "bram36": 498}
    buffer = WeightBuffer(e, tile_beats=tile, word_bits=128)
    assert buffer.memory_blocks(board) == {"uram": 64, "bram36": 0}
    assert buffer.memory_blocks(no_uram) == {"uram": 0, "bram36": 498}
    # The small engine: 2 URAM288 columns per bank, or 16 RAMB36E2 (4096 x 9) per bank.
    assert weight_buffer_blocks(SMALL, tile_beats=4096, uram=True) == {"uram": 4, "bram36": 0}
    assert weight_buffer_blocks(SMALL, tile_beats=4096, uram=False) == {"uram": 0, "bram36": 32}
