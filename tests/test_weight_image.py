"""The DDR weight image (``trilut.host.weight_image``): compiled from the tiny checkpoint,
read back equal to the numerics module's packing, and refused with a clear message when
anything about it is wrong."""

import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from trilut.config import EngineConfig, design_for_board
from trilut.host import weight_image as wi
from trilut.host.weight_image import (
    HEADER_FIELD_OFFSETS, SECTION_ALIGNMENT, WeightImageError, compile_weight_image,
    load_weight_image, weight_image_layout, write_weight_image,
)
from trilut.models import numerics
from trilut.models.bitnet import LINEAR_NAMES, BitNetConfig
from trilut.models.checkpoint import build_tiny_checkpoint, load_checkpoint

pytestmark = pytest.mark.fast

ENGINES = {
    "kv260": design_for_board("kv260").engine,
    "small": EngineConfig(group_size=3, tables_per_step=2, columns_per_cycle=2,
                          accumulator_depth=4, max_k=1024),
}
NORMS = ("input_layernorm", "self_attn.attn_sub_norm", "post_attention_layernorm",
         "mlp.ffn_sub_norm")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("wi") / "tiny")


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def images(model):
    return {name: compile_weight_image(model, engine) for name, engine in ENGINES.items()}


@pytest.fixture
def kv260_bytes(images):
    return bytearray(images["kv260"].to_bytes())


def _refused(data, match, **expected):
    with pytest.raises(WeightImageError, match=match) as info:
        load_weight_image(bytes(data), **expected)
    return str(info.value)


def _reseal(data: bytearray) -> bytearray:
    """Recompute both header CRCs, as a forger (or a buggy writer) would."""
    lo, hi = HEADER_FIELD_OFFSETS["header_crc32"], HEADER_FIELD_OFFSETS["image_crc32"] + 4
    header_bytes = struct.unpack_from("<I", data, HEADER_FIELD_OFFSETS["header_bytes"])[0]

    def crc(end):
        return zlib.crc32(data[hi:end], zlib.crc32(bytes(8), zlib.crc32(data[:lo])))
    struct.pack_into("<I", data, lo, crc(header_bytes))
    struct.pack_into("<I", data, lo + 4, crc(len(data)))
    return data


# --------------------------------------------------------------------------------------------
# Round trip.


@pytest.mark.parametrize("engine_name", ENGINES)
def test_beats_scales_and_norms_read_back(model, images, engine_name):
    engine, image = ENGINES[engine_name], images[engine_name]
    reloaded = load_weight_image(image.to_bytes(), engine=engine, model_config=model.config,
                                 ddr_word_bits=128)
    linears = model.linear_weights()
    assert reloaded.layer_names() == list(linears)
    word_bits, wpb = 128, -(-engine.weight_beat_bits // 128)
    assert reloaded.words_per_beat == wpb
    for name, (values, scale) in linears.items():
        # Stored rows: checkpoint order, but RoPE pair order for Q and K (stored_row_order).
        order = reloaded.row_order(name)
        beats = numerics.tlmm_weight_beats(values.numpy()[order], engine.code, engine.tables_per_step,
                                           engine.columns_per_cycle, engine.accumulator_depth)
        assert reloaded.layer_beats(name) == beats, name
        words = reloaded.layer_words(name)
        assert len(words) == len(beats) * wpb
        assert [sum(w << (word_bits * i) for i, w in enumerate(words[b * wpb:(b + 1) * wpb]))
                for b in range(len(beats))] == beats
        if name.endswith(("q_proj", "k_proj")):
            assert not np.array_equal(order, np.arange(len(order)))
        else:
            np.testing.assert_array_equal(order, np.arange(len(order)))
        np.testing.assert_array_equal(reloaded.layer_values(name), values.numpy()[order])
        linear = model.linear(name)
        record = reloaded.scale_record(name)
        assert reloaded.scale(name) == scale == record.scale
        assert record.weight_scale == float(linear.weight_scale)
        assert record.float_order == linear.float_order
        assert record.scale_fp16 == np.float16(np.float32(scale))
    norm_names = [f"layers.{i}.{n}" for i in range(model.config.num_hidden_layers)
                  for n in NORMS] + ["norm"]
    assert sorted(reloaded.norm_names()) == sorted(norm_names)
    for name in norm_names:
        half = reloaded.norm(name)
        assert half.dtype == np.float16
        np.testing.assert_array_equal(
            half, model.get_submodule(name).weight.numpy().astype(np.float16))


def test_layout_alignment_spans_and_execution_order(model, images):
    image = images["kv260"]
    data = image.to_bytes()
    layout = weight_image_layout(model.config, ENGINES["kv260"])
    assert len(data) == layout.image_bytes and len(data) % SECTION_ALIGNMENT == 0
    previous_end = layout.header_bytes
    for planned, section in zip(layout.sections, image.sections.values(), strict=True):
        assert replace(section, crc32=0) == planned
        assert section.offset % SECTION_ALIGNMENT == 0 and section.offset >= previous_end
        previous_end = section.end
    # The order a decoder layer consumes them in.
    first_layer = [s.name for s in layout.sections][:18]
    assert first_layer == [
        "layers.0.input_layernorm.weight",
        "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.q_proj.weight_scale",
        "layers.0.self_attn.k_proj.weight", "layers.0.self_attn.k_proj.weight_scale",
        "layers.0.self_attn.v_proj.weight", "layers.0.self_attn.v_proj.weight_scale",
        "layers.0.self_attn.attn_sub_norm.weight",
        "layers.0.self_attn.o_proj.weight", "layers.0.self_attn.o_proj.weight_scale",
        "layers.0.post_attention_layernorm.weight",
        "layers.0.mlp.gate_proj.weight", "layers.0.mlp.gate_proj.weight_scale",
        "layers.0.mlp.up_proj.weight", "layers.0.mlp.up_proj.weight_scale",
        "layers.0.mlp.ffn_sub_norm.weight",
        "layers.0.mlp.down_proj.weight", "layers.0.mlp.down_proj.weight_scale"]
    assert layout.sections[-1].name == "norm.weight"
    # What the read master is programmed with: base address + length in words.
    base = 0x6000_0000
    for short in LINEAR_NAMES:
        name = f"layers.1.{short}"
        span = image.ddr_span(name, base_address=base)
        section = image.section(name + ".weight")
        assert span.address == base + section.offset and span.address % SECTION_ALIGNMENT == 0
        assert span.first_word == span.address // 16
        assert span.words == len(image.layer_words(name)) == section.items * 18
        at = span.address - base
        words = [int.from_bytes(data[at + 16 * i:at + 16 * i + 16], "little")
                 for i in range(span.words)]
        assert words == image.layer_words(name)
    assert image.ddr_span("norm.weight").words == -(-model.config.hidden_size * 2 // 16)
    with pytest.raises(ValueError, match="base_address must be a non-negative multiple of 4096"):
        image.ddr_span("layers.0.mlp.up_proj", base_address=0x100)
    with pytest.raises(KeyError, match="no tlmm_weights section for 'layers.9.mlp.up_proj'"):
        image.layer_beats("layers.9.mlp.up_proj")


def test_kv260_beat_padding_and_word_widths(model, images):
    engine = ENGINES["kv260"]
    # 2240-bit beats: 18 x 128-bit words (64 bits, 2.8 %, wasted) or exactly 35 x 64-bit.
    assert images["kv260"].words_per_beat == 18
    narrow = compile_weight_image(model, engine, ddr_word_bits=64)
    assert narrow.words_per_beat == 35 and narrow.ddr_word_bits == 64
    name = "layers.0.mlp.down_proj"
    assert narrow.layer_beats(name) == images["kv260"].layer_beats(name)
    with pytest.raises(WeightImageError, match="ddr_word_bits must be an AXI data width"):
        compile_weight_image(model, engine, ddr_word_bits=100)


def test_deterministic_bytes(model, images, tmp_path):
    again = compile_weight_image(model, ENGINES["kv260"])
    assert again.to_bytes() == images["kv260"].to_bytes()
    # A fresh checkpoint from the same seed, compiled from its path, written to a file.
    other = build_tiny_checkpoint(tmp_path / "again")
    written = write_weight_image(tmp_path / "tiny.twi", other, ENGINES["kv260"])
    assert (tmp_path / "tiny.twi").read_bytes() == images["kv260"].to_bytes()
    assert load_weight_image(tmp_path / "tiny.twi").to_bytes() == written.to_bytes()


def test_compile_refuses_a_layer_wider_than_max_k(model):
    with pytest.raises(WeightImageError, match=r"mlp.down_proj \[256 x 640\] does not fit "
                                               r"the engine: K = 640 exceeds"):
        compile_weight_image(model, EngineConfig(max_k=512))


# --------------------------------------------------------------------------------------------
# Refusals.


def test_refuses_wrong_magic(kv260_bytes):
    kv260_bytes[:8] = b"GGUF\0\0\0\0"
    _refused(kv260_bytes, r"not a trilut weight image: magic at offset 0 is b'GGUF")


def test_refuses_newer_format_version(kv260_bytes):
    struct.pack_into("<I", kv260_bytes, HEADER_FIELD_OFFSETS["format_version"], 3)
    _refused(kv260_bytes, "format_version 3 is newer than this reader supports; this trilut "
                          "reads version 2")


def test_refuses_truncated_files(images):
    data = images["kv260"].to_bytes()
    header_bytes = images["kv260"].header["header_bytes"]
    first = next(iter(images["kv260"].sections.values())).offset
    for cut in (0, 5, 100, wi.HEADER_BYTES, header_bytes - 1, header_bytes, first + 10,
                len(data) // 2, len(data) - 1):
        _refused(data[:cut], rf"truncated: {cut} bytes")
    message = _refused(data[:first + 10], "truncated")
    assert f"image_bytes says {len(data)}" in message
    _refused(data + bytes(16), f"16 unexpected bytes after the image's end at offset {len(data)}")


def test_refuses_a_flipped_payload_byte(images, kv260_bytes):
    section = images["kv260"].section("layers.1.mlp.up_proj.weight")
    kv260_bytes[section.offset + section.length // 2] ^= 0x10
    _refused(kv260_bytes, rf"section layers\.1\.mlp\.up_proj\.weight \(bytes "
                          rf"\[{section.offset}, {section.end}\)\) is corrupted")
    # A norm, flipped in its last byte.
    data = bytearray(images["kv260"].to_bytes())
    norm = images["kv260"].section("norm.weight")
    data[norm.end - 1] ^= 0x01
    _refused(data, r"section norm\.weight .* is corrupted: its CRC-32 is 0x[0-9a-f]{8} in the "
                   r"table but the bytes give 0x[0-9a-f]{8}")


def test_refuses_dirty_padding_with_its_offset(images, kv260_bytes):
    section = images["kv260"].section("layers.0.self_attn.q_proj.weight_scale")
    at = section.end + 100                 # alignment padding after the scale record
    kv260_bytes[at] = 0xAB
    _refused(kv260_bytes, rf"non-zero byte 0xab at offset {at} in the padding after section "
                          rf"layers\.0\.self_attn\.q_proj\.weight_scale")


def test_refuses_a_flipped_header_byte(images, kv260_bytes):
    for at in (HEADER_FIELD_OFFSETS["hidden_size"] + 1,           # model field
               HEADER_FIELD_OFFSETS["columns_per_cycle"],          # engine field
               wi.HEADER_BYTES + 5 * wi.SECTION_ENTRY_BYTES + 73):  # a section's offset
        data = bytearray(images["kv260"].to_bytes())
        data[at] ^= 0x04
        _refused(data, r"header checksum mismatch: header_crc32 holds 0x[0-9a-f]{8} but bytes "
                       r"\[0, \d+\) give 0x[0-9a-f]{8}; the header is corrupted")


def test_refuses_a_resealed_header_that_disagrees_with_itself(kv260_bytes):
    # A writer that changed C without repacking: the derived fields give it away.
    struct.pack_into("<I", kv260_bytes, HEADER_FIELD_OFFSETS["columns_per_cycle"], 8)
    _refused(_reseal(kv260_bytes), "engine field weight_beat_bits = 2240 disagrees with the "
                                   "engine's parameters, which give 1120")
    # A model field changed: the section table no longer matches the shapes.
    data = bytearray(kv260_bytes)
    struct.pack_into("<I", data, HEADER_FIELD_OFFSETS["columns_per_cycle"], 16)
    struct.pack_into("<I", data, HEADER_FIELD_OFFSETS["intermediate_size"], 672)
    _refused(_reseal(data), r"section 11 \('layers.0.mlp.gate_proj.weight'\): shape is "
                            r"\(640, 256\), expected \(672, 256\)")


def test_refuses_an_engine_mismatch(kv260_bytes):
    kv260 = ENGINES["kv260"]
    _refused(kv260_bytes, "engine mismatch: engine.tables_per_step expected 2, the image was "
                          "compiled for 28", engine=ENGINES["small"])
    _refused(kv260_bytes, "engine mismatch: engine.accumulator_depth expected 128, the image "
                          "was compiled for 256", engine=replace(kv260, accumulator_depth=128))
    _refused(kv260_bytes, "ddr_word_bits mismatch: expected 64, the image has 128",
             ddr_word_bits=64)
    assert load_weight_image(bytes(kv260_bytes), engine=kv260).engine == kv260


def test_refuses_a_model_mismatch(model, kv260_bytes):
    _refused(kv260_bytes, "model mismatch: intermediate_size expected 768, the image holds a "
                          "model with 640",
             model_config=BitNetConfig.tiny(intermediate_size=768))
    _refused(kv260_bytes, "model mismatch: hidden_act expected 'silu', the image holds a model "
                          "with 'relu2'", model_config=BitNetConfig.tiny(hidden_act="silu"))
    assert load_weight_image(bytes(kv260_bytes), model_config=model).model_config.hidden_size \
        == 256


def test_load_names_the_file(tmp_path, kv260_bytes):
    path = tmp_path / "broken.twi"
    path.write_bytes(bytes(kv260_bytes[:300]))
    with pytest.raises(WeightImageError, match=rf"weight image {path}: truncated: 300 bytes"):
        load_weight_image(path)


def test_docs_hold_the_generated_layout_tables():
    doc = (Path(__file__).parent.parent / "docs" / "weight_image.md").read_text()
    assert wi.header_layout_markdown() in doc
    assert wi.section_entry_markdown() in doc
