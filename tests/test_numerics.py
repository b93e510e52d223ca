"""Numerics: quantizers, table codes, packing, exact matmul, widths."""

import numpy as np
import pytest
import torch

from trilut.models import numerics as nm

pytestmark = pytest.mark.fast


def test_ternary_quantize_matches_absmean_definition():
    torch.manual_seed(0)
    w = torch.randn(64, 48) * 0.02
    values, scale = nm.ternary_quantize(w)
    assert values.dtype == torch.int8
    assert set(values.unique().tolist()) <= {-1, 0, 1}
    assert torch.isclose(scale, w.abs().mean())
    # Independent formulation: round(W / mean|W|) clamped.
    expected = torch.clamp(torch.round(w / w.abs().mean()), -1, 1).to(torch.int8)
    assert (values != expected).sum() <= 1  # reciprocal-vs-division rounding may differ at ties


def test_int8_quantize_per_token_absmax():
    x = torch.tensor([[1.0, -2.0, 0.5], [100.0, 0.0, -50.0]])
    q, scale = nm.int8_quantize(x)
    assert q.tolist() == [[64, -127, 32], [127, 0, -64]]
    assert torch.allclose(scale[:, 0], torch.tensor([63.5, 1.27]))
    # All-zero rows do not divide by zero.
    q0, _ = nm.int8_quantize(torch.zeros(1, 4))
    assert q0.tolist() == [[0, 0, 0, 0]]


def test_check_ternary_names_the_bad_entry():
    with pytest.raises(ValueError, match=r"weight\[1, 2\] = 2"):
        nm.check_ternary(np.array([[0, 1, -1], [1, 0, 2]]))
    with pytest.raises(ValueError, match="outside int8"):
        nm.check_int8(np.array([0, 128]))


@pytest.mark.parametrize("group_size", [2, 3, 4, 5])
@pytest.mark.parametrize("mirror", [True, False])
def test_table_code_roundtrip_and_sizes(group_size, mirror):
    code = nm.TableCode(group_size, mirror)
    c = (3 ** group_size - 1) // 2
    assert code.entries == (c + 1 if mirror else 3 ** group_size)
    assert 3 ** group_size <= 1 << code.index_bits
    # Every pattern encodes to a distinct in-range index that decodes back.
    patterns = np.array(np.meshgrid(*[[-1, 0, 1]] * group_size, indexing="ij")).reshape(group_size, -1).T
    values = nm.group_values(patterns, group_size)[:, 0]
    index = code.encode(values)
    assert len(set(index.tolist())) == 3 ** group_size
    assert index.min() >= 0 and index.max() < 1 << code.index_bits
    assert np.array_equal(code.decode(index), values)
    # A lookup of a pattern's index in the tables of any activations is the dot product.
    rng = np.random.default_rng(group_size)
    acts = rng.integers(-128, 128, group_size)
    tables = nm.build_tables(acts, code)[0]
    got = nm.lookup(np.broadcast_to(tables, (len(index), code.entries)), index[:, None], code)[:, 0]
    assert np.array_equal(got, patterns @ acts)
    assert code.encode(np.array([0]))[0] == code.zero_index


def test_g3_matches_tellme_index_width():
    # TeLLMe: 27 patterns in 5 bits; 14 stored entries with the sign mirror.
    assert nm.TableCode(3, True).index_bits == 5
    assert nm.TableCode(3, True).entries == 14
    assert nm.TableCode(3, False).entries == 27
    assert nm.table_entry_width(3) == 10


def test_widths_are_tight():
    for k in (1, 7, 84, 1536, 8640):
        w = nm.accumulator_width(k)
        assert -(1 << (w - 1)) <= -128 * k and 128 * k <= (1 << (w - 1)) - 1
        assert 128 * k > (1 << (w - 2)) - 1  # one bit fewer would not hold +-128K
    for g in (2, 3, 4):
        w = nm.table_entry_width(g)
        assert -(1 << (w - 1)) <= -128 * g


@pytest.mark.parametrize("group_size,tables", [(2, 3), (3, 2), (4, 1)])
@pytest.mark.parametrize("mirror", [True, False])
def test_tlmm_matmul_equals_exact_matmul(group_size, tables, mirror):
    rng = np.random.default_rng(7)
    x = rng.integers(-128, 128, (3, 29))       # K not a multiple of G or G*T
    w = rng.integers(-1, 2, (10, 29))
    code = nm.TableCode(group_size, mirror)
    assert np.array_equal(nm.tlmm_matmul(x, w, code, tables), x @ w.T)
    assert np.array_equal(nm.ternary_matmul(x, w), x @ w.T)


def test_packing_roundtrip():
    rng = np.random.default_rng(3)
    fields = rng.integers(0, 32, (4, 17))
    rows = nm.pack_rows(fields, 5)
    assert rows == [nm.pack_fields(r, 5) for r in fields]
    for r, packed in zip(fields, rows):
        assert np.array_equal(nm.unpack_fields(packed, 5, 17), r)
    words = nm.pack_words(fields[0], 5, 72)   # 85 bits -> 2 words of 72
    assert len(words) == 2 and words[0] | words[1] << 72 == rows[0]
    with pytest.raises(ValueError, match="does not fit"):
        nm.pack_fields([32], 5)


def test_result_beats_roundtrip():
    rng = np.random.default_rng(5)
    r = rng.integers(-5000, 5000, (3, 11))
    beats = nm.tlmm_result_beats(r, 4, 14)
    assert np.array_equal(nm.tlmm_unpack_results(beats, 3, 11, 4, 14), r)
