"""Bit, nibble, varint and index-gap packing: round trips at every size, the documented byte layouts, and
refusal of malformed data."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterfmt.errors import FormatError
from adapterfmt.format import bitpack


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 15, 16, 17, 100])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_bits_round_trip_every_length_and_density(n, density):
    g = torch.Generator().manual_seed(n)
    bits = torch.rand(n, generator=g) < density
    packed = bitpack.pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(bitpack.unpack_bits(packed, n), bits)


def test_bit_order_is_least_significant_first():
    bits = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    assert bitpack.pack_bits(bits).tolist() == [0b00000001, 0b00000110]


def test_bits_refuse_wrong_length_and_set_padding():
    with pytest.raises(FormatError, match="expected 2 uint8 bytes"):
        bitpack.unpack_bits(torch.zeros(3, dtype=torch.uint8), 9)
    with pytest.raises(FormatError, match="padding bits"):
        bitpack.unpack_bits(torch.tensor([0, 0b10], dtype=torch.uint8), 9)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 31])
def test_nibbles_round_trip_and_layout(n):
    q = torch.arange(n) % 16
    packed = bitpack.pack_nibbles(q)
    assert packed.numel() == (n + 1) // 2
    assert torch.equal(bitpack.unpack_nibbles(packed, n), q.to(torch.uint8))
    if n >= 2:
        assert int(packed[0]) == 0x10  # element 0 low nibble, element 1 high nibble


def test_nibbles_refuse_a_set_unused_nibble():
    with pytest.raises(FormatError, match="unused last nibble"):
        bitpack.unpack_nibbles(torch.tensor([0xF1], dtype=torch.uint8), 1)


def test_varints_are_unsigned_leb128():
    values = torch.tensor([0, 1, 127, 128, 300, 16383, 16384, 2**62])
    data = bitpack.encode_varints(values)
    assert data[:7].tolist() == [0, 1, 127, 0x80, 0x01, 0xAC, 0x02]
    assert bitpack.varint_sizes(values).tolist() == [1, 1, 1, 2, 2, 2, 3, 9]
    assert torch.equal(bitpack.decode_varints(data, len(values)), values)


def test_varints_refuse_cut_off_or_miscounted_data():
    data = bitpack.encode_varints(torch.tensor([5, 300]))
    with pytest.raises(FormatError, match="cut-off"):
        bitpack.decode_varints(data[:-1], 2)
    with pytest.raises(FormatError, match="expected 3 complete"):
        bitpack.decode_varints(data, 3)
    with pytest.raises(FormatError, match="longer than"):
        bitpack.decode_varints(torch.tensor([0x80] * 9 + [1], dtype=torch.uint8), 1)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1)))))
def test_index_gaps_round_trip(case):
    n, chosen = case
    idx = torch.tensor(sorted(chosen), dtype=torch.int64)
    data = bitpack.encode_gaps(idx)
    assert data.numel() == bitpack.gaps_size(idx)
    assert torch.equal(bitpack.decode_gaps(data, idx.numel(), n), idx)


def test_gaps_are_zero_based():
    assert bitpack.encode_gaps(torch.tensor([0, 1, 2, 10, 200])).tolist() == [0, 0, 0, 7, 189, 1]


def test_gaps_refuse_an_index_past_the_end():
    with pytest.raises(FormatError, match="past the end"):
        bitpack.decode_gaps(bitpack.encode_gaps(torch.tensor([3, 9])), 2, 9)
