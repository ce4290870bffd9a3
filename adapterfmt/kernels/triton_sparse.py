"""Triton kernels for sparse deltas: CSR apply ``y + x S^T`` and the in-place scatter-add merge.

Importing this module imports triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import interpreting
from .csr import CSR


@triton.jit
def _csr_apply_kernel(x_ptr, y_ptr, out_ptr, rowptr_ptr, cols_ptr, vals_ptr, M,
                      sxm, sxk, sym, syn, som, son, BM: tl.constexpr, BNZ: tl.constexpr):
    """One program per (output feature o, block of rows): out[:, o] = y[:, o] + x[:, cols] . vals (fp32)."""
    o = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    mask_m = rm < M
    start = tl.load(rowptr_ptr + o)
    end = tl.load(rowptr_ptr + o + 1)
    acc = tl.zeros((BM,), dtype=tl.float32)
    for j0 in range(start, end, BNZ):
        jj = j0 + tl.arange(0, BNZ)
        mask_j = jj < end
        cols = tl.load(cols_ptr + jj, mask=mask_j, other=0)
        vals = tl.load(vals_ptr + jj, mask=mask_j, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + rm[:, None] * sxm + cols[None, :] * sxk, mask=mask_m[:, None] & mask_j[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.sum(xv * vals[None, :], axis=1)
    y = tl.load(y_ptr + rm * sym + o * syn, mask=mask_m, other=0.0).to(tl.float32)
    tl.store(out_ptr + rm * som + o * son, (y + acc).to(out_ptr.dtype.element_ty), mask=mask_m)


@triton.jit
def _scatter_add_kernel(w_ptr, idx_ptr, vals_ptr, nnz, alpha, BLOCK: tl.constexpr):
    """w.flat[idx] = w.flat[idx] + alpha * vals, added in fp32 and rounded once; indices must be unique."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < nnz
    idx = tl.load(idx_ptr + offs, mask=mask, other=0)
    v = tl.load(vals_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(w_ptr + idx, (w + alpha * v).to(w_ptr.dtype.element_ty), mask=mask)


def sparse_apply(x: torch.Tensor, y: torch.Tensor, csr: CSR) -> torch.Tensor:
    """Triton path of :func:`adapterfmt.kernels.sparse_apply`."""
    x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    m = x2.shape[0]
    out = torch.empty_like(y2)
    bm = 16 if interpreting() or m <= 16 else 64
    bnz = 64 if interpreting() else 32
    _csr_apply_kernel[(csr.shape[0], triton.cdiv(m, bm))](
        x2, y2, out, csr.rowptr, csr.cols, csr.values, m,
        x2.stride(0), x2.stride(1), y2.stride(0), y2.stride(1), out.stride(0), out.stride(1), BM=bm, BNZ=bnz)
    return out.reshape(y.shape)


def sparse_merge_(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                  alpha: float = 1.0) -> torch.Tensor:
    """Triton path of :func:`adapterfmt.kernels.sparse_merge_` (weight must be contiguous)."""
    nnz = indices.shape[0]
    if nnz:
        block = 1024
        _scatter_add_kernel[(triton.cdiv(nnz, block),)](weight, indices.to(torch.int64), values, nnz, float(alpha),
                                                        BLOCK=block)
    return weight
