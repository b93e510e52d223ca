"""The configuration tree refuses bad values when it is built, naming value and limit."""

import json

import pytest

from trilut.config import EngineConfig, design_for_board, load_board
from trilut.generate import generate


def test_kv260_defaults_follow_tellme():
    design = design_for_board("kv260")
    e = design.engine
    assert (e.group_size, e.tables_per_step, e.columns_per_cycle) == (3, 28, 16)
    assert e.block_k == 84 and e.index_vector_bits == 140
    assert e.weight_buffer_urams() <= design.board.resources.uram


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
    with pytest.raises(ValueError, match=r"bad.toml: missing key 'resources'"):
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


def test_a_board_without_uram_counts_bram36_at_512_deep(tmp_path):
    from trilut import boards
    from trilut.config import DesignConfig
    path = tmp_path / "no_uram.toml"
    path.write_text(boards.board_text("kv260").replace("uram = 64", "uram = 0"))
    board = load_board(str(path))          # the board alone is fine; its kv260 engine is not
    with pytest.raises(ValueError, match="needs 512 BRAM36 but the board has 144"):
        DesignConfig(board=board, engine=board.engine)


def test_generate_with_the_datapath_writes_every_block(tmp_path):
    design = design_for_board("kv260", tables_per_step=2, columns_per_cycle=2, accumulator_depth=4,
                              max_k=64)
    manifest = generate(design, tmp_path, datapath=True)
    assert set(manifest["modules"]) == {"tlmm_engine", "axi_read_master", "weight_buffer",
                                        "rms_norm", "act_quantizer", "dequantizer",
                                        "gated_activation", "residual_add"}
    ports = {name: {p["name"]: p["width"] for p in plist}
             for name, plist in manifest["ports"].items()}
    # The blocks agree on the widths where they meet.
    assert ports["weight_buffer"]["beats__payload"] == ports["tlmm_engine"]["weights__payload"]
    assert ports["act_quantizer"]["acts__payload"] == ports["tlmm_engine"]["acts__payload"]
    assert ports["dequantizer"]["acc__payload"] == ports["tlmm_engine"]["results__payload"]
    assert ports["weight_buffer"]["fill__payload"] == ports["axi_read_master"]["data__payload"]
    for name in manifest["modules"]:
        assert (tmp_path / f"{name}.v").read_text().count(f"module {name}(") == 1
