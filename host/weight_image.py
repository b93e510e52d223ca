"""The DDR weight image: what the accelerator reads from DDR, compiled from a model, and its
validating loader.

An image is one byte string, laid out as ``docs/weight_image.md`` describes:

* a fixed 256-byte header (magic, format version, lengths, CRC-32s, the model and engine
  parameters the hardware is built for, the DDR word width) followed by a section table of
  128-byte entries;
* one section per tensor the fabric reads, in the order a decoder layer consumes them:
  the TLMM weight-beat stream of every ternary linear (``numerics.tlmm_weight_beats``, each
  beat zero-padded to whole DDR words, little-endian), its weight scale, and the RMSNorm
  weights as IEEE fp16 (the element-wise datapath's number format);
* every section starts on a 4 KiB boundary and the image ends on one.

Why 4 KiB: an AXI4 burst may not cross a 4 KiB address boundary, and the longest INCR burst
of the KV260's 128-bit HP ports (256 beats x 16 bytes) is exactly 4 KiB. A section that starts
on a 4 KiB boundary is therefore read in full-length bursts that never need splitting, and
4 KiB is also the host's page size, so a section maps (``mmap``, ``/dev/mem``, a DMA buffer)
without straddling a page.

The embedding table and the LM head are not in the image: the host embeds tokens and runs
the LM head (DESIGN.md section 5). ``load_weight_image`` trusts nothing: it checks the magic,
the version, every length and bound, both header CRC-32s and every section's CRC-32, that
all padding is zero, and, when given them, that the engine, the model and the DDR word
width are the expected ones. Every failure is a ``WeightImageError`` naming what mismatched.
"""

from __future__ import annotations

import os
import struct
import types
import zlib
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from trilut.config import EngineConfig
from trilut.models import numerics
from trilut.models.bitnet import FLOAT_ORDERS, HIDDEN_ACTS, LINEAR_NAMES, BitNetConfig, BitNetModel

__all__ = [
    "WeightImageError", "WeightImage", "Section", "DdrSpan", "WeightScale", "ImageLayout",
    "compile_weight_image", "write_weight_image", "load_weight_image", "weight_image_layout",
    "MAGIC", "FORMAT_VERSION", "SECTION_ALIGNMENT", "DEFAULT_DDR_WORD_BITS",
    "header_layout_markdown", "section_entry_markdown", "HEADER_FIELD_OFFSETS", "HEADER_BYTES",
    "SECTION_ENTRY_BYTES", "stored_row_order", "ROPE_PROJECTIONS",
]

MAGIC = b"TRILUTWI"
#: 2: the Q and K projection rows are stored in RoPE pair-consecutive order
#: (:func:`stored_row_order`); 1 stored every linear in checkpoint order.
FORMAT_VERSION = 2
#: See the module docstring: the AXI4 4 KiB burst boundary and the host page size.
SECTION_ALIGNMENT = 4096
#: One AXI4 beat of the KV260's (Zynq UltraScale+) 128-bit HP ports.
DEFAULT_DDR_WORD_BITS = 128


class WeightImageError(ValueError):
    """A weight image that cannot be compiled or loaded; the message names the field or
    section, the expected and the found value, or the byte offset."""


# --------------------------------------------------------------------------------------------
# Binary layout. Each table below is the single description of its record: the struct format,
# the offsets and the documentation table (``header_layout_markdown``) are all derived from it.

#: (field, struct code, meaning). ``None`` fields are reserved zero bytes.
_HEADER_FIELDS = (
    ("magic", "8s", 'b"TRILUTWI"'),
    ("format_version", "I", f"{FORMAT_VERSION}; a reader refuses any other version"),
    ("header_bytes", "I", "fixed header + section table (256 + 128 x section_count)"),
    ("image_bytes", "Q", "total image length, a multiple of section_alignment"),
    ("header_crc32", "I", "CRC-32 of bytes [0, header_bytes), both CRC fields read as zero"),
    ("image_crc32", "I", "CRC-32 of bytes [0, image_bytes), both CRC fields read as zero"),
    ("ddr_word_bits", "I", "DDR / AXI data word width (128: KV260 HP port)"),
    ("section_alignment", "I", "every section offset is a multiple of this (4096)"),
    ("section_count", "I", "entries in the section table"),
    ("section_entry_bytes", "I", "128"),
    ("section_table_offset", "I", "256"),
    (None, "12x", "reserved, zero"),
    # model (BitNetConfig), bytes 64..127
    ("num_hidden_layers", "I", "model: decoder layers"),
    ("hidden_size", "I", "model"),
    ("intermediate_size", "I", "model: FFN width"),
    ("num_attention_heads", "I", "model"),
    ("num_key_value_heads", "I", "model (GQA when below num_attention_heads)"),
    ("head_dim", "I", "model"),
    ("vocab_size", "I", "model"),
    ("max_position_embeddings", "I", "model"),
    ("hidden_act", "I", "model: " + ", ".join(f"{i} = {a}" for i, a in enumerate(HIDDEN_ACTS))),
    (None, "4x", "reserved, zero"),
    ("rms_norm_eps", "d", "model (float64)"),
    ("rope_theta", "d", "model (float64)"),
    (None, "8x", "reserved, zero"),
    # engine (EngineConfig), bytes 128..191
    ("group_size", "I", "engine G"),
    ("tables_per_step", "I", "engine T"),
    ("columns_per_cycle", "I", "engine C"),
    ("mirror", "I", "engine: 1 = sign-mirror tables, 0 = full"),
    ("accumulator_depth", "I", "engine D (sets the beat order: tiles of C x D columns)"),
    ("max_k", "I", "engine"),
    ("act_bits", "I", "engine (8)"),
    ("index_bits", "I", "derived: bits per table index"),
    ("block_k", "I", "derived: G x T activations per K block"),
    ("weight_beat_bits", "I", "derived: C x T x index_bits"),
    ("words_per_beat", "I", "derived: ceil(weight_beat_bits / ddr_word_bits)"),
    ("acc_width", "I", "derived: accumulator bits"),
    ("table_entries", "I", "derived: entries per table"),
    (None, "76x", "reserved, zero"),
)

_SECTION_FIELDS = (
    ("name", "64s", "UTF-8, NUL-padded: the checkpoint tensor name without `model.`"),
    ("kind", "I", "1 = tlmm_weights, 2 = weight_scale, 3 = norm"),
    ("encoding", "I", "1 = tlmm_beats_le, 2 = scale_record, 3 = f16_le"),
    ("offset", "Q", "byte offset in the image, a multiple of section_alignment"),
    ("length", "Q", "payload bytes (items x item_bytes), without the alignment padding"),
    ("rank", "I", "dimensions used in shape"),
    ("shape", "4I", "logical shape: [N, K] for weights, [size] for norms, [] for scales"),
    ("items", "I", "weight beats, norm elements, or 1 scale record"),
    ("item_bytes", "I", "bytes per item: words_per_beat x ddr_word_bits / 8, 2, or 16"),
    ("crc32", "I", "CRC-32 of the section's payload (its `length` bytes)"),
    (None, "8x", "reserved, zero"),
)


def _layout(spec, total: int):
    codes, offsets, at = [], {}, 0
    for name, code, _ in spec:
        if name is not None:
            offsets[name] = at
        codes.append(code)
        at += struct.calcsize("<" + code)
    assert at == total, (at, total)
    return struct.Struct("<" + "".join(codes)), offsets


_HEADER, _HEADER_OFFSETS = _layout(_HEADER_FIELDS, 256)
_ENTRY, _ENTRY_OFFSETS = _layout(_SECTION_FIELDS, 128)
_HEADER_NAMES = [name for name, _, _ in _HEADER_FIELDS if name is not None]
#: Byte offset of every header field (``header_crc32``, ``hidden_size``, ...).
HEADER_FIELD_OFFSETS = types.MappingProxyType(dict(_HEADER_OFFSETS))
#: Size of the fixed header and of one section-table entry.
HEADER_BYTES, SECTION_ENTRY_BYTES = _HEADER.size, _ENTRY.size
_CRC_FIELDS = (_HEADER_OFFSETS["header_crc32"], _HEADER_OFFSETS["image_crc32"] + 4)
assert _CRC_FIELDS[1] - _CRC_FIELDS[0] == 8

_TYPE_NAMES = {"8s": "bytes[8]", "64s": "bytes[64]", "I": "u32", "Q": "u64", "d": "f64",
               "4I": "u32[4]"}


def _markdown(spec) -> str:
    rows, at = ["| offset | type | field | meaning |", "|---|---|---|---|"], 0
    for name, code, meaning in spec:
        size = struct.calcsize("<" + code)
        kind = _TYPE_NAMES.get(code, f"{size} bytes")
        rows.append(f"| {at} | {kind} | {name or '(reserved)'} | {meaning} |")
        at += size
    return "\n".join(rows)


def header_layout_markdown() -> str:
    """The fixed header's field table, as in ``docs/weight_image.md`` (generated from code)."""
    return _markdown(_HEADER_FIELDS)


def section_entry_markdown() -> str:
    """The section-table entry's field table, as in ``docs/weight_image.md``."""
    return _markdown(_SECTION_FIELDS)


_KINDS = {"tlmm_weights": 1, "weight_scale": 2, "norm": 3}
_ENCODINGS = {"tlmm_beats_le": 1, "scale_record": 2, "f16_le": 3}
_KIND_ENCODING = {"tlmm_weights": "tlmm_beats_le", "weight_scale": "scale_record",
                  "norm": "f16_le"}
_SUFFIX = {"tlmm_weights": ".weight", "weight_scale": ".weight_scale", "norm": ".weight"}

#: One weight scale, 16 bytes. ``scale`` multiplies (W ~= values x scale, what
#: ``BitNetModel.linear_weights`` gives); ``weight_scale`` and ``float_order`` are the
#: checkpoint's own form (BitLinear stores 1 / scale) so the host can rebuild the golden
#: model's linear exactly; ``scale_fp16`` is the form the fp16 element-wise datapath
#: multiplies the accumulator by.
_SCALE_RECORD = np.dtype([("scale", "<f4"), ("weight_scale", "<f4"), ("scale_fp16", "<f2"),
                          ("float_order", "u1"), ("reserved", "u1", (5,))])
assert _SCALE_RECORD.itemsize == 16

_ENGINE_FIELDS = tuple(f.name for f in fields(EngineConfig))
_ENGINE_DERIVED = ("index_bits", "block_k", "weight_beat_bits", "words_per_beat", "acc_width",
                   "table_entries")
_MODEL_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                 "hidden_act", "rms_norm_eps", "rope_theta")


def _align(n: int, to: int = SECTION_ALIGNMENT) -> int:
    return -(-n // to) * to


def _check_word_bits(word_bits) -> int:
    if (isinstance(word_bits, bool) or not isinstance(word_bits, int) or word_bits < 8
            or word_bits > 1024 or word_bits & (word_bits - 1)):
        raise WeightImageError(f"ddr_word_bits must be an AXI data width (a power of two from "
                               f"8 to 1024), not {word_bits!r}")
    return word_bits


def _words_per_beat(engine: EngineConfig, word_bits: int) -> int:
    return -(-engine.weight_beat_bits // word_bits)


def _engine_header(engine: EngineConfig, word_bits: int) -> dict:
    values = {name: int(getattr(engine, name)) for name in _ENGINE_FIELDS}
    values.update(index_bits=engine.index_bits, block_k=engine.block_k,
                  weight_beat_bits=engine.weight_beat_bits,
                  words_per_beat=_words_per_beat(engine, word_bits),
                  acc_width=engine.acc_width, table_entries=engine.table_entries)
    return values


def _model_header(config: BitNetConfig) -> dict:
    values = {name: getattr(config, name) for name in _MODEL_FIELDS}
    values["hidden_act"] = HIDDEN_ACTS.index(config.hidden_act)
    return values


# --------------------------------------------------------------------------------------------
# Records.


@dataclass(frozen=True)
class Section:
    """One section-table entry. ``offset`` and ``length`` are bytes within the image."""

    name: str
    kind: str
    encoding: str
    offset: int
    length: int
    shape: tuple[int, ...]
    items: int
    item_bytes: int
    crc32: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class DdrSpan:
    """Where a section sits in DDR once the image is loaded at ``base_address``: what the
    read master is programmed with."""

    name: str
    address: int        # byte address of the first word
    length: int         # bytes (whole words)
    word_bits: int

    @property
    def first_word(self) -> int:
        """``address`` in DDR words (the word index the read master starts at)."""
        return self.address // (self.word_bits // 8)

    @property
    def words(self) -> int:
        return self.length // (self.word_bits // 8)


@dataclass(frozen=True)
class WeightScale:
    """A ternary linear's scale as the image holds it (see ``_SCALE_RECORD``)."""

    scale: float            # float32 multiplier: W ~= values x scale
    weight_scale: float     # float32, the checkpoint's form (1 / scale for BitLinear)
    float_order: str        # bitnet.FLOAT_ORDERS
    scale_fp16: np.float16  # what the fp16 datapath multiplies by


@dataclass(frozen=True)
class ImageLayout:
    """Where everything goes, from the shapes alone (no weights needed)."""

    sections: tuple[Section, ...]
    header_bytes: int
    image_bytes: int
    ddr_word_bits: int
    words_per_beat: int

    @property
    def payload_bytes(self) -> int:
        """Bytes of section payload, without header and alignment padding."""
        return sum(s.length for s in self.sections)

    def bytes_of(self, kind: str) -> int:
        return sum(s.length for s in self.sections if s.kind == kind)


def weight_image_layout(config: BitNetConfig, engine: EngineConfig, *,
                        ddr_word_bits: int = DEFAULT_DDR_WORD_BITS) -> ImageLayout:
    """The image's section table (offsets, lengths, shapes; CRCs zero) for ``config`` on
    ``engine``. ``compile_weight_image`` fills exactly this layout, and the loader refuses an
    image whose table differs from it."""
    if isinstance(config, BitNetModel):
        config = config.config
    word_bits = _check_word_bits(ddr_word_bits)
    words_per_beat = _words_per_beat(engine, word_bits)
    beat_bytes = words_per_beat * word_bits // 8
    shapes = config.linear_shapes()
    planned: list[tuple[str, str, tuple[int, ...]]] = []

    def linear(short):
        planned.append((f"{prefix}{short}", "tlmm_weights", shapes[short]))
        planned.append((f"{prefix}{short}", "weight_scale", ()))

    def norm(short, size):
        planned.append((f"{prefix}{short}", "norm", (size,)))

    h, i = config.hidden_size, config.intermediate_size
    for layer in range(config.num_hidden_layers):
        prefix = f"layers.{layer}."
        norm("input_layernorm", h)
        for short in LINEAR_NAMES[:3]:
            linear(short)
        norm("self_attn.attn_sub_norm", h)
        linear("self_attn.o_proj")
        norm("post_attention_layernorm", h)
        linear("mlp.gate_proj")
        linear("mlp.up_proj")
        norm("mlp.ffn_sub_norm", i)
        linear("mlp.down_proj")
    prefix = ""
    norm("norm", h)

    header_bytes = _HEADER.size + _ENTRY.size * len(planned)
    offset = _align(header_bytes)
    sections = []
    for module, kind, shape in planned:
        if kind == "tlmm_weights":
            n, k = shape
            items = (engine.padded_k(k) // engine.block_k) * \
                (engine.padded_n(n) // engine.columns_per_cycle)
            item_bytes = beat_bytes
        elif kind == "weight_scale":
            items, item_bytes = 1, _SCALE_RECORD.itemsize
        else:
            items, item_bytes = shape[0], 2
        section = Section(module + _SUFFIX[kind], kind, _KIND_ENCODING[kind], offset,
                          items * item_bytes, tuple(shape), items, item_bytes)
        sections.append(section)
        offset = _align(section.end)
    return ImageLayout(tuple(sections), header_bytes, offset, word_bits, words_per_beat)


# --------------------------------------------------------------------------------------------
# The image.


class WeightImage:
    """A parsed, validated weight image. Build one with ``compile_weight_image`` or
    ``load_weight_image``; ``to_bytes()`` is the exact DDR content."""

    def __init__(self, data: bytes, header: dict, engine: EngineConfig, model: BitNetConfig,
                 sections: dict[str, Section]):
        self._data = data
        self.header = header
        #: The engine the weight beats are packed for.
        self.engine = engine
        #: The model's shape (tokens and tying are not stored: the image does not need them).
        self.model_config = model
        self.sections = sections

    def __repr__(self):
        return (f"WeightImage({len(self._data)} bytes, {len(self.sections)} sections, "
                f"G={self.engine.group_size} T={self.engine.tables_per_step} "
                f"C={self.engine.columns_per_cycle}, {self.ddr_word_bits}-bit words)")

    # -- whole image ----------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        return self._data

    def __len__(self):
        return len(self._data)

    @property
    def ddr_word_bits(self) -> int:
        return self.header["ddr_word_bits"]

    @property
    def words_per_beat(self) -> int:
        return self.header["words_per_beat"]

    @property
    def format_version(self) -> int:
        return self.header["format_version"]

    def layer_names(self) -> list[str]:
        """Every ternary linear, in image order (``layers.0.self_attn.q_proj``, ...)."""
        return [s.name.removesuffix(".weight") for s in self.sections.values()
                if s.kind == "tlmm_weights"]

    def norm_names(self) -> list[str]:
        return [s.name.removesuffix(".weight") for s in self.sections.values()
                if s.kind == "norm"]

    # -- sections -------------------------------------------------------------------------

    def section(self, name: str) -> Section:
        """A section by its name (``layers.0.mlp.up_proj.weight``, ``norm.weight``, ...)."""
        if name not in self.sections:
            raise KeyError(f"the image has no section {name!r}; names look like "
                           f"{next(iter(self.sections))!r}")
        return self.sections[name]

    def _find(self, name: str, kind: str) -> Section:
        for candidate in (name + _SUFFIX[kind], name):
            section = self.sections.get(candidate)
            if section is not None and section.kind == kind:
                return section
        examples = [s.name.removesuffix(_SUFFIX[kind]) for s in self.sections.values()
                    if s.kind == kind][:2]
        raise KeyError(f"the image has no {kind} section for {name!r}; names look like "
                       f"{', '.join(map(repr, examples))}")

    def payload(self, name: str) -> bytes:
        """A section's payload bytes (without alignment padding)."""
        s = self.section(name)
        return self._data[s.offset:s.end]

    def _items(self, section: Section) -> np.ndarray:
        return np.frombuffer(self._data, np.uint8, section.length,
                             section.offset).reshape(section.items, section.item_bytes)

    def layer_beats(self, name: str) -> list[int]:
        """The weight beats of ternary linear ``name`` as integers, word padding removed:
        equal to ``numerics.tlmm_weight_beats(values, engine.code, T, C, D)``."""
        rows = self._items(self._find(name, "tlmm_weights"))
        beat_bytes = -(-self.engine.weight_beat_bits // 8)
        return [int.from_bytes(row.tobytes(), "little") for row in rows[:, :beat_bytes]]

    def layer_words(self, name: str) -> list[int]:
        """The DDR words of ternary linear ``name`` in address order (word ``w`` of beat ``b``
        is bits ``128 w .. 128 w + 127`` of the beat, for 128-bit words)."""
        section = self._find(name, "tlmm_weights")
        word_bytes = self.ddr_word_bits // 8
        rows = np.frombuffer(self._data, np.uint8, section.length,
                             section.offset).reshape(-1, word_bytes)
        return [int.from_bytes(row.tobytes(), "little") for row in rows]

    def layer_values(self, name: str) -> np.ndarray:
        """Ternary int8 ``[N, K]`` decoded back from the beats (the inverse of the packing),
        rows in stored order (:meth:`row_order`: Q and K in RoPE pair order)."""
        section = self._find(name, "tlmm_weights")
        return _decode_beats(self._items(section), section.shape, self.engine)

    def row_order(self, name: str) -> np.ndarray:
        """``stored = original[order]`` for the rows of linear ``name`` (the identity except
        for the Q and K projections, :func:`stored_row_order`)."""
        order = stored_row_order(self.model_config, name)
        n = self._find(name, "tlmm_weights").shape[0]
        return np.arange(n) if order is None else order

    def scale(self, name: str) -> float:
        """The float32 multiplier of linear ``name`` (``W ~= values x scale``), exactly as
        ``BitNetModel.linear_weights()`` gives it."""
        return self.scale_record(name).scale

    def scale_record(self, name: str) -> WeightScale:
        record = np.frombuffer(self.payload(self._find(name, "weight_scale").name),
                               _SCALE_RECORD)[0]
        return WeightScale(float(record["scale"]), float(record["weight_scale"]),
                           FLOAT_ORDERS[int(record["float_order"])],
                           np.float16(record["scale_fp16"]))

    def norm(self, name: str) -> np.ndarray:
        """A norm's weight as fp16 (``layers.0.input_layernorm``, ``norm``, ...)."""
        return np.frombuffer(self.payload(self._find(name, "norm").name), "<f2").copy()

    def ddr_span(self, name: str, *, base_address: int = 0) -> DdrSpan:
        """Address and length in DDR of a linear's weight beats (``name`` is the linear) or of
        any section (its full name), for an image loaded at ``base_address``.

        ``base_address`` must be 4 KiB aligned: the burst argument of the alignment holds only
        then. The length is rounded up to whole words (norms and scales may end mid-word)."""
        if not isinstance(base_address, int) or base_address < 0 \
                or base_address % SECTION_ALIGNMENT:
            raise ValueError(f"base_address must be a non-negative multiple of "
                             f"{SECTION_ALIGNMENT}, not {base_address!r}")
        try:
            section = self._find(name, "tlmm_weights")
        except KeyError:
            section = self.section(name)
        word_bytes = self.ddr_word_bits // 8
        return DdrSpan(section.name, base_address + section.offset,
                       _align(section.length, word_bytes), self.ddr_word_bits)


def _decode_beats(rows: np.ndarray, shape: tuple[int, int], engine: EngineConfig) -> np.ndarray:
    n, k = shape
    code, t, c, d = engine.code, engine.tables_per_step, engine.columns_per_cycle, \
        engine.accumulator_depth
    bits = code.index_bits
    beat_bits = engine.weight_beat_bits
    bitarr = np.unpackbits(rows, axis=-1, bitorder="little")[:, :beat_bits]
    fields = (bitarr.reshape(len(rows), c * t, bits).astype(np.int64)
              << np.arange(bits, dtype=np.int64)).sum(-1)
    k_blocks = engine.padded_k(k) // engine.block_k
    n_groups = engine.padded_n(n) // c
    index = np.empty((n_groups, c, k_blocks, t), dtype=np.int64)
    at = 0
    for start in range(0, n_groups, d):
        tile = min(d, n_groups - start)
        chunk = fields[at:at + k_blocks * tile].reshape(k_blocks, tile, c, t)
        index[start:start + tile] = chunk.transpose(1, 2, 0, 3)
        at += k_blocks * tile
    values = code.decode(index.reshape(n_groups * c, k_blocks * t))
    digits = np.stack([((values + code.center) // 3 ** g) % 3 - 1
                       for g in range(code.group_size)], axis=-1)
    return digits.reshape(n_groups * c, -1)[:n, :k].astype(np.int8)


# --------------------------------------------------------------------------------------------
# Compiling.


def _as_model(model) -> BitNetModel:
    if isinstance(model, BitNetModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        from trilut.models.checkpoint import load_checkpoint
        return load_checkpoint(model)
    raise TypeError(f"model must be a BitNetModel or a checkpoint directory, "
                    f"not {type(model).__name__}")


def _fp16(values: np.ndarray, what: str) -> np.ndarray:
    f32 = np.asarray(values, dtype=np.float32)
    with np.errstate(over="ignore"):
        half = f32.astype("<f2")
    bad = ~np.isfinite(half)
    if bad.any():
        i = int(np.argmax(bad.ravel()))
        raise WeightImageError(f"{what}[{i}] = {f32.ravel()[i]!r} does not fit fp16 "
                               f"(largest finite fp16 is 65504)")
    return half


#: The projections whose output rows RoPE rotates in pairs.
ROPE_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj")


def stored_row_order(config: BitNetConfig, name: str) -> np.ndarray | None:
    """How the image orders the output rows of linear ``name``: ``stored = original[order]``,
    or ``None`` for checkpoint order. Q and K projections store each head's rows in RoPE's
    pair-consecutive order (``trilut.models.attention.rope_permutation``), so the hardware
    rotates adjacent elements; the dot products of Q with K are unchanged (both permuted
    alike), and V, O and the FFN keep checkpoint order (docs/attention.md)."""
    if not name.endswith(ROPE_PROJECTIONS):
        return None
    from trilut.models.attention import rope_permutation
    d = config.head_dim
    heads = (config.num_attention_heads if name.endswith("q_proj")
             else config.num_key_value_heads)
    perm = rope_permutation(d)
    return np.concatenate([h * d + perm for h in range(heads)])


def _section_payload(section: Section, model: BitNetModel, engine: EngineConfig) -> bytes:
    module = section.name.removesuffix(_SUFFIX[section.kind])
    if section.kind == "tlmm_weights":
        values = model.linear(module).values.numpy()
        order = stored_row_order(model.config, module)
        if order is not None:
            values = values[order]
        beats = numerics.tlmm_weight_beats(values, engine.code, engine.tables_per_step,
                                           engine.columns_per_cycle, engine.accumulator_depth)
        return b"".join(beat.to_bytes(section.item_bytes, "little") for beat in beats)
    if section.kind == "weight_scale":
        linear = model.linear(module)
        record = np.zeros(1, _SCALE_RECORD)
        record["scale"] = np.float32(linear.scale)
        record["weight_scale"] = np.float32(linear.weight_scale)
        record["float_order"] = FLOAT_ORDERS.index(linear.float_order)
        record["scale_fp16"] = _fp16(record["scale"], f"{module} weight scale")
        if record["scale_fp16"][0] == 0:
            raise WeightImageError(f"{module} weight scale {float(record['scale'][0])!r} "
                                   f"underflows fp16 to zero")
        return record.tobytes()
    weight = model.get_submodule(module).weight.detach().numpy()
    return _fp16(weight, section.name).tobytes()


def compile_weight_image(model, engine: EngineConfig, *,
                         ddr_word_bits: int = DEFAULT_DDR_WORD_BITS) -> WeightImage:
    """The DDR weight image of ``model`` (a ``BitNetModel`` or a checkpoint directory) for
    ``engine``, validated by the same parser as ``load_weight_image``. Deterministic: the
    same model and engine give the same bytes."""
    model = _as_model(model)
    if not isinstance(engine, EngineConfig):
        raise TypeError(f"engine must be an EngineConfig, not {type(engine).__name__}")
    config = model.config
    for name, (n, k) in config.linear_shapes().items():
        try:
            engine.check_shape(k, n)
        except ValueError as e:
            raise WeightImageError(f"{name} [{n} x {k}] does not fit the engine: {e}") from None
    layout = weight_image_layout(config, engine, ddr_word_bits=ddr_word_bits)
    image = bytearray(layout.image_bytes)
    entries = []
    for section in layout.sections:
        if len(section.name.encode()) >= 64:
            raise WeightImageError(f"section name {section.name!r} is longer than 63 bytes")
        payload = _section_payload(section, model, engine)
        assert len(payload) == section.length, (section.name, len(payload), section.length)
        image[section.offset:section.end] = payload
        entries.append(_pack_entry(section, zlib.crc32(payload)))
    header = dict(magic=MAGIC, format_version=FORMAT_VERSION, header_bytes=layout.header_bytes,
                  image_bytes=layout.image_bytes, header_crc32=0, image_crc32=0,
                  ddr_word_bits=layout.ddr_word_bits, section_alignment=SECTION_ALIGNMENT,
                  section_count=len(entries), section_entry_bytes=_ENTRY.size,
                  section_table_offset=_HEADER.size)
    header.update(_model_header(config))
    header.update(_engine_header(engine, layout.ddr_word_bits))
    image[:layout.header_bytes] = _HEADER.pack(*(header[n] for n in _HEADER_NAMES)) + \
        b"".join(entries)
    header_crc = _crc(image, layout.header_bytes)
    struct.pack_into("<I", image, _HEADER_OFFSETS["header_crc32"], header_crc)
    struct.pack_into("<I", image, _HEADER_OFFSETS["image_crc32"], _crc(image, len(image)))
    return _parse(bytes(image))


def write_weight_image(path, model, engine: EngineConfig, *,
                       ddr_word_bits: int = DEFAULT_DDR_WORD_BITS) -> WeightImage:
    """Compile the image and write it to ``path``; returns the image."""
    image = compile_weight_image(model, engine, ddr_word_bits=ddr_word_bits)
    Path(path).write_bytes(image.to_bytes())
    return image


def _pack_entry(s: Section, crc: int) -> bytes:
    shape = list(s.shape) + [0] * (4 - len(s.shape))
    return _ENTRY.pack(s.name.encode(), _KINDS[s.kind], _ENCODINGS[s.encoding], s.offset,
                       s.length, len(s.shape), *shape, s.items, s.item_bytes, crc)


def _crc(data, end: int) -> int:
    """CRC-32 of ``data[:end]`` with the two CRC fields read as zero."""
    lo, hi = _CRC_FIELDS
    view = memoryview(data)
    crc = zlib.crc32(view[:lo])
    crc = zlib.crc32(bytes(hi - lo), crc)
    return zlib.crc32(view[hi:end], crc)


# --------------------------------------------------------------------------------------------
# Loading and validating.


def load_weight_image(source, *, engine: EngineConfig | None = None, model_config=None,
                      ddr_word_bits: int | None = None) -> WeightImage:
    """Parse and validate a weight image (a path, or the bytes themselves).

    Checks the magic, the format version, the header and section bounds, the total length,
    the header, section and image CRC-32s, that every padding byte and bit is zero, and that
    the section table is the one the header's model and engine imply. With ``engine``,
    ``model_config`` (a ``BitNetConfig`` or ``BitNetModel``) or ``ddr_word_bits``, the image
    must have been compiled for exactly those. Any failure raises ``WeightImageError``.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, origin = bytes(source), "weight image"
    elif isinstance(source, (str, os.PathLike)):
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise WeightImageError(f"cannot read weight image {source}: {e}") from None
        origin = f"weight image {source}"
    else:
        raise TypeError(f"source must be a path or bytes, not {type(source).__name__}")
    try:
        return _parse(data, engine=engine, model_config=model_config,
                      ddr_word_bits=ddr_word_bits)
    except WeightImageError as e:
        raise WeightImageError(f"{origin}: {e}") from None


def _parse(data: bytes, *, engine=None, model_config=None, ddr_word_bits=None) -> WeightImage:
    size = len(data)
    if size < len(MAGIC) and MAGIC.startswith(data):
        raise WeightImageError(f"truncated: {size} bytes, shorter than the {len(MAGIC)}-byte "
                               f"magic")
    if data[:len(MAGIC)] != MAGIC:
        found = data[:len(MAGIC)]
        raise WeightImageError(f"not a trilut weight image: magic at offset 0 is {found!r}, "
                               f"expected {MAGIC!r}")
    if size < _HEADER.size:
        raise WeightImageError(f"truncated: {size} bytes, but the fixed header alone is "
                               f"{_HEADER.size} bytes")
    header = dict(zip(_HEADER_NAMES, _HEADER.unpack_from(data)))
    version = header["format_version"]
    if version != FORMAT_VERSION:
        newer = "newer than this reader supports" if version > FORMAT_VERSION else "unsupported"
        raise WeightImageError(f"format_version {version} is {newer}; this trilut reads "
                               f"version {FORMAT_VERSION}")

    # The header's own framing, before anything in it is trusted.
    count = header["section_count"]
    for name, expected in (("section_entry_bytes", _ENTRY.size),
                           ("section_table_offset", _HEADER.size),
                           ("header_bytes", _HEADER.size + _ENTRY.size * count)):
        if header[name] != expected:
            raise WeightImageError(f"header field {name} = {header[name]} but it must be "
                                   f"{expected} (offset {_HEADER_OFFSETS[name]}); the header "
                                   f"is corrupted")
    header_bytes = header["header_bytes"]
    if size < header_bytes:
        raise WeightImageError(f"truncated: {size} bytes, but the header and its section table "
                               f"({count} sections) take {header_bytes} bytes")
    crc = _crc(data, header_bytes)
    if crc != header["header_crc32"]:
        raise WeightImageError(f"header checksum mismatch: header_crc32 holds "
                               f"0x{header['header_crc32']:08x} but bytes [0, {header_bytes}) "
                               f"give 0x{crc:08x}; the header is corrupted")
    if size != header["image_bytes"]:
        if size < header["image_bytes"]:
            raise WeightImageError(f"truncated: {size} bytes, but image_bytes says "
                                   f"{header['image_bytes']} ({header['image_bytes'] - size} "
                                   f"bytes missing from offset {size})")
        raise WeightImageError(f"{size - header['image_bytes']} unexpected bytes after the "
                               f"image's end at offset {header['image_bytes']}")

    # What the hardware was built for: header fields -> config objects.
    word_bits = _check_word_bits(header["ddr_word_bits"])
    if header["section_alignment"] != SECTION_ALIGNMENT:
        raise WeightImageError(f"section_alignment is {header['section_alignment']}, "
                               f"expected {SECTION_ALIGNMENT}")
    try:
        image_engine = EngineConfig(**{n: header[n] for n in _ENGINE_FIELDS
                                       if n != "mirror"}, mirror=bool(header["mirror"]))
    except ValueError as e:
        raise WeightImageError(f"the image's engine parameters are invalid: {e}") from None
    derived = _engine_header(image_engine, word_bits)
    for name in ("mirror", *_ENGINE_DERIVED):
        if header[name] != derived[name]:
            raise WeightImageError(f"engine field {name} = {header[name]} disagrees with the "
                                   f"engine's parameters, which give {derived[name]}")
    act = header["hidden_act"]
    if act >= len(HIDDEN_ACTS):
        raise WeightImageError(f"model field hidden_act = {act} is not a known activation "
                               f"code (0..{len(HIDDEN_ACTS) - 1})")
    try:
        image_model = BitNetConfig(**{n: header[n] for n in _MODEL_FIELDS if n != "hidden_act"},
                                   hidden_act=HIDDEN_ACTS[act])
    except ValueError as e:
        raise WeightImageError(f"the image's model parameters are invalid: {e}") from None

    _check_expected(header, image_engine, image_model, engine, model_config, ddr_word_bits)

    # The section table must be the layout the header's model and engine imply.
    layout = weight_image_layout(image_model, image_engine, ddr_word_bits=word_bits)
    if header["image_bytes"] != layout.image_bytes:
        raise WeightImageError(f"image_bytes = {header['image_bytes']} but the layout of this "
                               f"model and engine takes {layout.image_bytes}")
    if count != len(layout.sections):
        raise WeightImageError(f"section_count = {count} but this model needs "
                               f"{len(layout.sections)} sections")
    sections = {}
    for i, planned in enumerate(layout.sections):
        section = _unpack_entry(data, _HEADER.size + i * _ENTRY.size, i)
        for f in ("name", "kind", "encoding", "shape", "items", "item_bytes", "offset",
                  "length"):
            if getattr(section, f) != getattr(planned, f):
                raise WeightImageError(
                    f"section {i} ({section.name!r}): {f} is {getattr(section, f)!r}, "
                    f"expected {getattr(planned, f)!r}")
        sections[section.name] = section

    _check_payload(data, sections, header_bytes, image_engine)
    crc = _crc(data, size)
    if crc != header["image_crc32"]:
        raise WeightImageError(f"image checksum mismatch: image_crc32 holds "
                               f"0x{header['image_crc32']:08x} but the {size} bytes give "
                               f"0x{crc:08x}")
    return WeightImage(data, header, image_engine, image_model, sections)


def _unpack_entry(data: bytes, at: int, index: int) -> Section:
    (raw_name, kind, encoding, offset, length, rank, *rest) = _ENTRY.unpack_from(data, at)
    dims, (items, item_bytes, crc) = rest[:4], rest[4:]
    try:
        name = raw_name.rstrip(b"\0").decode()
    except UnicodeDecodeError:
        raise WeightImageError(f"section {index}: name {raw_name!r} is not UTF-8") from None
    kinds = {v: k for k, v in _KINDS.items()}
    encodings = {v: k for k, v in _ENCODINGS.items()}
    if kind not in kinds or encoding not in encodings or rank > 4:
        raise WeightImageError(f"section {index} ({name!r}): unknown kind {kind}, encoding "
                               f"{encoding} or rank {rank}")
    return Section(name, kinds[kind], encodings[encoding], offset, length,
                   tuple(dims[:rank]), items, item_bytes, crc)


def _check_expected(header, image_engine, image_model, engine, model_config, word_bits):
    if word_bits is not None and header["ddr_word_bits"] != word_bits:
        raise WeightImageError(f"ddr_word_bits mismatch: expected {word_bits}, the image has "
                               f"{header['ddr_word_bits']}")
    if engine is not None:
        for name in _ENGINE_FIELDS:
            want, have = getattr(engine, name), getattr(image_engine, name)
            if want != have:
                raise WeightImageError(f"engine mismatch: engine.{name} expected {want!r}, "
                                       f"the image was compiled for {have!r}")
    if model_config is not None:
        if isinstance(model_config, BitNetModel):
            model_config = model_config.config
        for name in _MODEL_FIELDS:
            want, have = getattr(model_config, name), getattr(image_model, name)
            if want != have:
                raise WeightImageError(f"model mismatch: {name} expected {want!r}, the image "
                                       f"holds a model with {have!r}")


def _check_payload(data: bytes, sections: dict[str, Section], header_bytes: int,
                   engine: EngineConfig):
    raw = np.frombuffer(data, np.uint8)
    previous, gap_start = "the section table", header_bytes
    for section in sections.values():
        _check_zero(raw, gap_start, section.offset, f"the padding after {previous}")
        crc = zlib.crc32(memoryview(data)[section.offset:section.end])
        if crc != section.crc32:
            raise WeightImageError(
                f"section {section.name} (bytes [{section.offset}, {section.end})) is "
                f"corrupted: its CRC-32 is 0x{section.crc32:08x} in the table but the bytes "
                f"give 0x{crc:08x}")
        if section.kind == "tlmm_weights":
            _check_beat_padding(raw, section, engine)
        previous, gap_start = f"section {section.name}", section.end
    _check_zero(raw, gap_start, len(data), f"the padding after {previous}")


def _check_zero(raw: np.ndarray, start: int, end: int, where: str):
    nonzero = np.flatnonzero(raw[start:end])
    if nonzero.size:
        at = start + int(nonzero[0])
        raise WeightImageError(f"non-zero byte 0x{raw[at]:02x} at offset {at} in {where} "
                               f"(padding must be zero)")


def _check_beat_padding(raw: np.ndarray, section: Section, engine: EngineConfig):
    """The bits of each beat's last word above ``weight_beat_bits`` must be zero."""
    rows = raw[section.offset:section.end].reshape(section.items, section.item_bytes)
    full, partial = divmod(engine.weight_beat_bits, 8)
    bad = rows[:, full + bool(partial):] != 0
    if partial:
        bad = np.concatenate([(rows[:, full:full + 1] >> partial) != 0, bad], axis=1)
    if bad.any():
        beat, col = (int(x) for x in np.argwhere(bad)[0])
        at = section.offset + beat * section.item_bytes + full + col
        raise WeightImageError(f"section {section.name}: beat {beat} has non-zero padding above "
                               f"bit {engine.weight_beat_bits} (byte offset {at})")
