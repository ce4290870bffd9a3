"""Bit planes for ternary deltas: the layout the ternary apply kernel reads.

Two uint8 planes ``pos`` and ``neg`` of shape [out, ceil(in / 8)]: bit ``j`` (``(byte >> j) & 1``, little-endian)
of byte ``k`` in row ``o`` stands for element ``(o, 8k + j)``. Element value = ``scale[o] * (pos - neg)``; padding
bits past ``in`` are zero. These torch functions are the reference for the layout.
"""

from __future__ import annotations

import torch


def _bit_weights(device: torch.device) -> torch.Tensor:
    return torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32, device=device)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    out_f, in_f = bits.shape
    nbytes = (in_f + 7) // 8
    padded = torch.zeros(out_f, nbytes * 8, dtype=torch.int32, device=bits.device)
    padded[:, :in_f] = bits
    return (padded.reshape(out_f, nbytes, 8) * _bit_weights(bits.device)).sum(-1).to(torch.uint8)


def pack_ternary_planes(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pos, neg)`` bit planes of a [out, in] tensor whose non-zero entries are +-s (or a sign tensor).

    Only the sign of each element is kept; the magnitude belongs in the separate ``scale``.
    """
    if t.dim() != 2:
        raise ValueError(f"pack_ternary_planes expects a 2-D [out, in] tensor, got shape {list(t.shape)}")
    return _pack_bits((t > 0).to(torch.int32)), _pack_bits((t < 0).to(torch.int32))


def unpack_bits(plane: torch.Tensor, in_features: int) -> torch.Tensor:
    """The 0/1 uint8 matrix [out, in_features] stored in one plane."""
    shifts = torch.arange(8, dtype=torch.uint8, device=plane.device)
    bits = (plane.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(plane.shape[0], -1)[:, :in_features]


def unpack_ternary_planes(pos: torch.Tensor, neg: torch.Tensor, in_features: int) -> torch.Tensor:
    """The int8 sign matrix [out, in_features] (values -1, 0, +1) stored in two planes."""
    if pos.shape != neg.shape or pos.dtype != torch.uint8 or neg.dtype != torch.uint8:
        raise ValueError("pos and neg must be uint8 planes of the same shape")
    if pos.shape[-1] != (in_features + 7) // 8:
        raise ValueError(f"planes have {pos.shape[-1]} bytes per row, expected {(in_features + 7) // 8} "
                         f"for in_features={in_features}")
    return unpack_bits(pos, in_features).to(torch.int8) - unpack_bits(neg, in_features).to(torch.int8)


__all__ = ["pack_ternary_planes", "unpack_ternary_planes", "unpack_bits"]
