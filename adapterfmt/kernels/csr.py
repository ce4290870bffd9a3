"""Sparse deltas: from sorted flat row-major indices to CSR, the form the sparse apply kernel reads."""

from __future__ import annotations

from typing import NamedTuple

import torch


class CSR(NamedTuple):
    """Compressed sparse rows of an [out, in] matrix: ``rowptr`` [out+1] int64, ``cols`` [nnz] int64, ``values``."""

    rowptr: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]


def to_csr(indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int] | torch.Size) -> CSR:
    """CSR of a sparse delta given as sorted flat row-major ``indices`` (int64) and ``values``.

    Row pointers come from one ``searchsorted`` over the row numbers; no Python loop.
    """
    out_f, in_f = int(shape[0]), int(shape[1])
    if indices.dim() != 1 or values.dim() != 1 or indices.shape[0] != values.shape[0]:
        raise ValueError(f"indices and values must be 1-D of equal length, got {list(indices.shape)} and "
                         f"{list(values.shape)}")
    idx = indices.to(torch.int64)
    rows = torch.div(idx, in_f, rounding_mode="floor")
    bounds = torch.arange(out_f + 1, dtype=torch.int64, device=idx.device)
    rowptr = torch.searchsorted(rows, bounds)
    return CSR(rowptr, idx - rows * in_f, values, (out_f, in_f))


__all__ = ["CSR", "to_csr"]
