"""Bit-level packing used by the compressed layouts (spec section "Compressed storage").

- Bits: element ``i`` of a bit string is bit ``i % 8`` (least significant first) of byte ``i // 8``;
  the unused high bits of the last byte are zero. ``n`` bits take ``ceil(n / 8)`` bytes.
- Nibbles: element ``i`` of a 4-bit string is the low nibble of byte ``i // 2`` when ``i`` is even, the
  high nibble when odd; an unused last high nibble is zero.
- Varints (unsigned LEB128): a value is written 7 bits at a time, least significant group first; every
  byte but the last of a value has its high bit (0x80) set. A value takes ``max(1, ceil(bits / 7))`` bytes.
- Index gaps: sorted distinct flat indices ``i_0 < i_1 < ...`` are stored as the varints of
  ``i_0, i_1 - i_0 - 1, i_2 - i_1 - 1, ...`` (zero-based gaps: adjacent indices give 0).

Every function is vectorised in torch and works on CPU uint8 tensors; decoders check their input and
raise :class:`~adapterfmt.errors.FormatError` on malformed data.
"""

from __future__ import annotations

import torch

from ..errors import FormatError

_SHIFTS = torch.arange(8, dtype=torch.uint8)
MAX_VARINT_BYTES = 9
"""Longest varint accepted (63-bit values: indices of any tensor safetensors can hold)."""


def packed_bits_size(n: int) -> int:
    return (n + 7) // 8


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a 1-D bool tensor into uint8 bytes, least significant bit first."""
    bits = bits.reshape(-1).to(torch.uint8).cpu()
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    return (bits.view(-1, 8) << _SHIFTS).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int, *, what: str = "bit string") -> torch.Tensor:
    """The first ``n`` bits of ``packed`` as a bool tensor; refuses a wrong length or set padding bits."""
    packed = packed.reshape(-1)
    if packed.dtype != torch.uint8 or packed.numel() != packed_bits_size(n):
        raise FormatError(f"{what}: expected {packed_bits_size(n)} uint8 bytes for {n} bits, "
                          f"got {packed.numel()} {packed.dtype}")
    bits = ((packed.cpu()[:, None] >> _SHIFTS) & 1).reshape(-1).bool()
    if bits[n:].any():
        raise FormatError(f"{what}: padding bits after bit {n} must be zero")
    return bits[:n]


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Pack 1-D values in 0..15 (any integer dtype) two to a byte, low nibble first."""
    q = q.reshape(-1).to(torch.uint8).cpu()
    if q.numel() % 2:
        q = torch.cat([q, q.new_zeros(1)])
    return q[0::2] | (q[1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, n: int, *, what: str = "nibble string") -> torch.Tensor:
    """The first ``n`` nibbles of ``packed`` as uint8 values 0..15."""
    packed = packed.reshape(-1)
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise FormatError(f"{what}: expected {(n + 1) // 2} uint8 bytes for {n} nibbles, "
                          f"got {packed.numel()} {packed.dtype}")
    out = torch.stack([packed & 0x0F, packed >> 4], 1).reshape(-1)
    if n % 2 and out[n]:
        raise FormatError(f"{what}: the unused last nibble must be zero")
    return out[:n]


def varint_sizes(values: torch.Tensor) -> torch.Tensor:
    """Bytes each non-negative int64 value takes as a varint."""
    v = values.reshape(-1).to(torch.int64)
    n = torch.ones_like(v)
    for j in range(1, MAX_VARINT_BYTES):
        n += (v >= (1 << (7 * j))).to(torch.int64)
    return n


def encode_varints(values: torch.Tensor) -> torch.Tensor:
    """Unsigned LEB128 bytes of 1-D non-negative int64 ``values``, concatenated."""
    v = values.reshape(-1).to(torch.int64).cpu()
    if v.numel() and int(v.min()) < 0:
        raise ValueError("varints are unsigned; got a negative value")
    sizes = varint_sizes(v)
    starts = sizes.cumsum(0) - sizes
    out = torch.zeros(int(sizes.sum()), dtype=torch.uint8)
    for j in range(int(sizes.max()) if v.numel() else 0):
        live = sizes > j
        byte = (v[live] >> (7 * j)) & 0x7F
        more = (sizes[live] - 1 > j).to(torch.int64) << 7
        out[starts[live] + j] = (byte | more).to(torch.uint8)
    return out


def decode_varints(data: torch.Tensor, count: int, *, what: str = "varints") -> torch.Tensor:
    """Exactly ``count`` int64 values from concatenated LEB128 bytes (the whole of ``data``)."""
    data = data.reshape(-1)
    if data.dtype != torch.uint8:
        raise FormatError(f"{what}: must be uint8, got {data.dtype}")
    data = data.cpu().to(torch.int64)
    last = (data & 0x80) == 0
    ends = last.nonzero().flatten()
    if ends.numel() != count or (data.numel() and not bool(last[-1])):
        raise FormatError(f"{what}: expected {count} complete varints in {data.numel()} bytes, "
                          f"found {ends.numel()}" + ("" if not data.numel() or bool(last[-1]) else " and a cut-off one"))
    if not count:
        return torch.zeros(0, dtype=torch.int64)
    starts = torch.cat([ends.new_zeros(1), ends[:-1] + 1])
    lengths = ends - starts + 1
    if int(lengths.max()) > MAX_VARINT_BYTES:
        raise FormatError(f"{what}: a varint longer than {MAX_VARINT_BYTES} bytes")
    group = torch.repeat_interleave(torch.arange(count), lengths)
    pos = torch.arange(data.numel()) - starts[group]
    return torch.zeros(count, dtype=torch.int64).index_add_(0, group, (data & 0x7F) << (7 * pos))


def index_gaps(indices: torch.Tensor) -> torch.Tensor:
    """Zero-based gaps of sorted distinct indices: ``i_0, i_1 - i_0 - 1, ...``."""
    idx = indices.reshape(-1).to(torch.int64)
    if not idx.numel():
        return idx
    return torch.cat([idx[:1], idx[1:] - idx[:-1] - 1])


def encode_gaps(indices: torch.Tensor) -> torch.Tensor:
    """Sorted distinct flat indices as varint-coded zero-based gaps."""
    return encode_varints(index_gaps(indices))


def decode_gaps(data: torch.Tensor, count: int, numel: int, *, what: str = "index gaps") -> torch.Tensor:
    """Sorted flat indices from varint gaps; refuses indices at or past ``numel``."""
    gaps = decode_varints(data, count, what=what)
    if count and int(gaps.max()) >= numel:
        raise FormatError(f"{what}: index past the end of a tensor of {numel} elements")
    idx = (gaps + 1).cumsum(0) - 1
    if count and int(idx[-1]) >= numel:
        raise FormatError(f"{what}: index past the end of a tensor of {numel} elements")
    return idx


def gaps_size(indices: torch.Tensor) -> int:
    """Bytes :func:`encode_gaps` would write for ``indices``."""
    return int(varint_sizes(index_gaps(indices)).sum())
