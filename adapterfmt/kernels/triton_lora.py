"""Triton kernel: fused single-adapter LoRA linear, ``x W^T + scale * (x A^T) B^T (+ bias)`` in one pass.

One program computes an output tile: while its K loop streams x and W for the base GEMM it also accumulates the
shrink ``x A^T`` (the rank is tiny next to the tile), then adds the expand ``t B^T`` and the bias before the
single store. fp32 accumulation throughout. Importing this module imports triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import interpreting, next_pow2, precision_for, upcast_for


@triton.jit
def _lora_linear_kernel(x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, out_ptr, M, N, K, R, scale,
                        sxm, sxk, swn, swk, sar, sak, sbn, sbr, som, son,
                        HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        RP: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """UPCAST (constexpr) turns 16-bit dot operands into fp32: needed for bf16 under the interpreter, whose bf16
    ``tl.dot`` is broken; leave it off on a GPU so bf16/fp16 use tensor cores."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rr = tl.arange(0, RP)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    t = tl.zeros((BM, RP), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        xk = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk, mask=(rm[:, None] < M) & (kk[None, :] < K),
                     other=0.0)
        wk = tl.load(w_ptr + kk[:, None] * swk + rn[None, :] * swn, mask=(kk[:, None] < K) & (rn[None, :] < N),
                     other=0.0)
        ak = tl.load(a_ptr + kk[:, None] * sak + rr[None, :] * sar, mask=(kk[:, None] < K) & (rr[None, :] < R),
                     other=0.0)
        if UPCAST:
            xk = xk.to(tl.float32)
            wk = wk.to(tl.float32)
            ak = ak.to(tl.float32)
        acc = tl.dot(xk, wk, acc, input_precision=PREC)
        t = tl.dot(xk, ak, t, input_precision=PREC)
    bt = tl.load(b_ptr + rr[:, None] * sbr + rn[None, :] * sbn, mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
    if UPCAST:
        bt = bt.to(tl.float32)
    acc += scale * tl.dot(t.to(bt.dtype), bt, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * som + rn[None, :] * son, acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _config(m: int) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, num_warps, num_stages) by batch size; the interpreter gets big tiles (fewer programs)."""
    if interpreting():
        return 16, 64, 64, 4, 1
    if m <= 16:
        return 16, 32, 128, 4, 4
    if m <= 64:
        return 64, 64, 64, 4, 4
    return 128, 128, 32, 8, 3


def lora_linear(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton path of :func:`adapterfmt.kernels.lora_linear`."""
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    n, r = weight.shape[0], A.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bm, bn, bk, warps, stages = _config(m)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _lora_linear_kernel[grid](
        x2, weight, A, B, bias if bias is not None else out, out, m, n, k, r, float(scale),
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), A.stride(0), A.stride(1),
        B.stride(0), B.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=bk, RP=next_pow2(r), UPCAST=upcast_for(x.dtype),
        PREC=precision_for(x.dtype), num_warps=warps, num_stages=stages)
    return out.reshape(*x.shape[:-1], n)
