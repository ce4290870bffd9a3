"""Triton kernels: many LoRA adapters in one batch (shrink then expand), grouped by adapter.

Rows are sorted by adapter id once (``argsort``); adapter ``a`` owns the sorted rows
``offsets[a+1]:offsets[a+2]`` (slot 0 holds the base-only rows, id -1). The grid is
(row blocks, K splits or N blocks, adapters); a program whose row block lies past its adapter's row count exits at
once, so no host synchronisation is needed and one kernel pair serves decode (per-row ids, BGMV-like) and prefill
(segments, SGMV-like; segments become per-row ids). Importing this module imports triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import interpreting, next_pow2, precision_for, upcast_for


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, scales_ptr, order_ptr, offsets_ptr, t_ptr, K, R,
                   sxm, sxk, san, sar, sak, stm,
                   BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, SPLIT_K: tl.constexpr,
                   UPCAST: tl.constexpr, PREC: tl.constexpr):
    """t[row, :] (+)= scale[a] * x[row] @ A[a]^T for the rows of adapter a; fp32 t. UPCAST: fp32 dot operands
    (bf16 under the interpreter only)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    a = tl.program_id(2)
    start = tl.load(offsets_ptr + a + 1)
    count = tl.load(offsets_ptr + a + 2) - start
    if pid_m * BM >= count:
        return
    local = pid_m * BM + tl.arange(0, BM)
    mask_m = local < count
    rows = tl.load(order_ptr + start + local, mask=mask_m, other=0)
    rr = tl.arange(0, RP)
    rk = tl.arange(0, BK)
    a_base = a_ptr + a.to(tl.int64) * san
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for k0 in range(pid_k * BK, K, BK * SPLIT_K):
        kk = k0 + rk
        xk = tl.load(x_ptr + rows[:, None] * sxm + kk[None, :] * sxk, mask=mask_m[:, None] & (kk[None, :] < K),
                     other=0.0)
        ak = tl.load(a_base + kk[:, None] * sak + rr[None, :] * sar, mask=(kk[:, None] < K) & (rr[None, :] < R),
                     other=0.0)
        if UPCAST:
            xk = xk.to(tl.float32)
            ak = ak.to(tl.float32)
        acc = tl.dot(xk, ak, acc, input_precision=PREC)
    acc = acc * tl.load(scales_ptr + a).to(tl.float32)
    t_ptrs = t_ptr + rows[:, None] * stm + rr[None, :]
    mask = mask_m[:, None] & (rr[None, :] < RP)
    if SPLIT_K == 1:
        tl.store(t_ptrs, acc, mask=mask)
    else:
        tl.atomic_add(t_ptrs, acc, mask=mask)


@triton.jit
def _expand_kernel(t_ptr, b_ptr, order_ptr, offsets_ptr, out_ptr, N, R,
                   stm, sbn, sbo, sbr, som, son,
                   BM: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """out[row, n-block] += t[row] @ B[a]^T for the rows of adapter a (out already holds y)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    a = tl.program_id(2)
    start = tl.load(offsets_ptr + a + 1)
    count = tl.load(offsets_ptr + a + 2) - start
    if pid_m * BM >= count:
        return
    local = pid_m * BM + tl.arange(0, BM)
    mask_m = local < count
    rows = tl.load(order_ptr + start + local, mask=mask_m, other=0)
    rr = tl.arange(0, RP)
    rn = pid_n * BN + tl.arange(0, BN)
    t = tl.load(t_ptr + rows[:, None] * stm + rr[None, :], mask=mask_m[:, None], other=0.0)
    bt = tl.load(b_ptr + a.to(tl.int64) * sbn + rr[:, None] * sbr + rn[None, :] * sbo,
                 mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
    if UPCAST:
        bt = bt.to(tl.float32)
    delta = tl.dot(t.to(bt.dtype), bt, input_precision=PREC)
    o_ptrs = out_ptr + rows[:, None] * som + rn[None, :] * son
    mask = mask_m[:, None] & (rn[None, :] < N)
    y = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptrs, (y + delta).to(out_ptr.dtype.element_ty), mask=mask)


def _blocks(m: int, k: int) -> tuple[int, int, int, int]:
    """(BM, BK, BN, SPLIT_K) for the shrink/expand pair; the interpreter gets big tiles and no split."""
    if interpreting():
        return 16, 64, 64, 1
    bm = 16 if m <= 64 else 64
    split = 8 if m <= 64 and k >= 2048 else 1
    return bm, 64, 64, split


def grouped_apply(x: torch.Tensor, y: torch.Tensor, A_pool: torch.Tensor, B_pool: torch.Tensor,
                  scales: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, *,
                  inplace: bool = False) -> torch.Tensor:
    """``y`` plus, for every adapter a, the delta of rows ``order[offsets[a+1]:offsets[a+2]]``.

    ``x`` [T, in], ``y`` [T, out]; ``order`` [T] int64 row numbers sorted by adapter; ``offsets`` [n+2] int64.
    """
    m, k = x.shape
    n_ad, r, _ = A_pool.shape
    n_out = B_pool.shape[1]
    dtype = x.dtype
    A_pool, B_pool = A_pool.to(dtype), B_pool.to(dtype)
    out = y if inplace else y.clone()
    if m == 0 or n_ad == 0:
        return out
    rp = next_pow2(r)
    bm, bk, bn, split = _blocks(m, k)
    t = (torch.zeros if split > 1 else torch.empty)(m, rp, dtype=torch.float32, device=x.device)
    up, prec = upcast_for(dtype), precision_for(dtype)
    _shrink_kernel[(triton.cdiv(m, bm), split, n_ad)](
        x, A_pool, scales, order, offsets, t, k, r,
        x.stride(0), x.stride(1), A_pool.stride(0), A_pool.stride(1), A_pool.stride(2), t.stride(0),
        BM=bm, BK=bk, RP=rp, SPLIT_K=split, UPCAST=up, PREC=prec)
    _expand_kernel[(triton.cdiv(m, bm), triton.cdiv(n_out, bn), n_ad)](
        t, B_pool, order, offsets, out, n_out, r,
        t.stride(0), B_pool.stride(0), B_pool.stride(1), B_pool.stride(2), out.stride(0), out.stride(1),
        BM=bm, BN=bn, RP=rp, UPCAST=up, PREC=prec)
    return out


def group_rows(ids: torch.Tensor, n_adapters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, offsets)`` for :func:`grouped_apply`: rows sorted by id (-1 first) and the group bounds.

    Ids must lie in -1..n_adapters-1 (not checked: that would need a host synchronisation)."""
    ids = ids.to(torch.int64)
    order = torch.argsort(ids, stable=True)
    counts = torch.zeros(n_adapters + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, ids + 1, torch.ones_like(ids))  # not bincount: no host sync, CUDA-graph safe
    offsets = torch.zeros(n_adapters + 2, dtype=torch.int64, device=ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return order, offsets


def multi_lora_rows(x: torch.Tensor, y: torch.Tensor, A_pool: torch.Tensor, B_pool: torch.Tensor,
                    scales: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Triton path of :func:`adapterfmt.kernels.multi_lora_rows` (x [T, in] or [T, ..., in], ids [T])."""
    x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    ids = ids.reshape(-1)
    if ids.shape[0] != x2.shape[0]:
        ids = ids.repeat_interleave(x2.shape[0] // ids.shape[0])
    order, offsets = group_rows(ids, A_pool.shape[0])
    return grouped_apply(x2, y2, A_pool, B_pool, scales.float(), order, offsets).reshape(y.shape)


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton path of :func:`adapterfmt.kernels.lora_delta` (one adapter: no sort)."""
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    target = out if out is not None else torch.zeros(*x.shape[:-1], B.shape[0], dtype=x.dtype, device=x.device)
    t2 = target.view(-1, target.shape[-1])
    order = torch.arange(m, device=x.device)
    offsets = torch.zeros(3, dtype=torch.int64, device=x.device)
    offsets[2:] = m  # fills, no host-to-device copy: CUDA-graph safe
    scales = torch.full((1,), float(scale), dtype=torch.float32, device=x.device)
    grouped_apply(x2, t2, A.unsqueeze(0), B.unsqueeze(0), scales, order, offsets, inplace=True)
    return target
