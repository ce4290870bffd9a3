"""Triton kernel for the ``block`` kind's unmerged apply: dense rows or columns of a delta, gathered / scattered.

One kernel serves both axes: ``out[:, n_cols] = y[:, n_cols] + scale * x[:, k_cols] @ W^T`` with W [N, K].
Rows (``block`` [n, in]): K runs over all input features and the N outputs are scattered to ``indices``.
Columns (``block`` [out, n]): K runs over the ``n`` gathered input features ``indices`` and N over all outputs.
fp32 accumulation, one rounding at the store. Importing this module imports triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import interpreting, precision_for, upcast_for


@triton.jit
def _block_kernel(x_ptr, w_ptr, idx_ptr, y_ptr, out_ptr, M, N, K, scale,
                  sxm, sxk, swn, swk, sym, syn, som, son,
                  GATHER_K: tl.constexpr, SCATTER_N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """One output tile. GATHER_K: x's K columns are ``idx``; SCATTER_N: the N outputs land at columns ``idx``
    (strictly increasing, so no two programs write one column). UPCAST (constexpr) turns 16-bit dot operands
    into fp32: needed for bf16 under the interpreter, whose bf16 ``tl.dot`` is broken; off on a GPU."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mask_m = rm < M
    mask_n = rn < N
    if SCATTER_N:
        cols_n = tl.load(idx_ptr + rn, mask=mask_n, other=0)
    else:
        cols_n = rn.to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        mask_k = kk < K
        if GATHER_K:
            cols_k = tl.load(idx_ptr + kk, mask=mask_k, other=0)
        else:
            cols_k = kk.to(tl.int64)
        xk = tl.load(x_ptr + rm[:, None] * sxm + cols_k[None, :] * sxk, mask=mask_m[:, None] & mask_k[None, :],
                     other=0.0)
        wk = tl.load(w_ptr + kk[:, None] * swk + rn[None, :] * swn, mask=mask_k[:, None] & mask_n[None, :],
                     other=0.0)
        if UPCAST:
            xk = xk.to(tl.float32)
            wk = wk.to(tl.float32)
        acc = tl.dot(xk, wk, acc, input_precision=PREC)
    mask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptr + rm[:, None] * sym + cols_n[None, :] * syn, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rm[:, None] * som + cols_n[None, :] * son, (y + scale * acc).to(out_ptr.dtype.element_ty),
             mask=mask)


def _tiles(m: int) -> tuple[int, int, int]:
    """(BM, BN, BK); the interpreter gets big tiles (fewer programs)."""
    if interpreting():
        return 16, 64, 64
    return (16, 64, 64) if m <= 16 else (64, 64, 32)


def block_apply(x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, block: torch.Tensor, scale: float,
                axis: str) -> torch.Tensor:
    """Triton path of :func:`adapterfmt.kernels.block_apply`."""
    x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    m, n = x2.shape[0], indices.shape[0]
    rows = axis == "rows"
    if m == 0 or n == 0:
        return y2.clone().reshape(y.shape)
    out = y2.clone() if rows else torch.empty_like(y2)  # rows: columns outside ``indices`` keep y
    w = block.to(x.dtype)
    idx = indices.to(device=x.device, dtype=torch.int64).contiguous()
    n_out = n if rows else y2.shape[1]
    k = x2.shape[1] if rows else n
    bm, bn, bk = _tiles(m)
    _block_kernel[(triton.cdiv(m, bm), triton.cdiv(n_out, bn))](
        x2, w, idx, y2, out, m, n_out, k, float(scale),
        x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), y2.stride(0), y2.stride(1), out.stride(0),
        out.stride(1), GATHER_K=not rows, SCATTER_N=rows, BM=bm, BN=bn, BK=bk, UPCAST=upcast_for(x.dtype),
        PREC=precision_for(x.dtype))
    return out.reshape(y.shape)
