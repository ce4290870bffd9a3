"""Triton kernel: ternary delta apply ``y + x T^T`` reading the packed sign planes directly.

The [out, in] sign matrix is never materialised: each K step loads the plane bytes under the tile, pulls out
bit ``k % 8`` of byte ``k // 8``, forms ``pos - neg`` in the input dtype and feeds ``tl.dot``; the per-row scale
is applied once to the fp32 accumulator. Importing this module imports triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import interpreting, precision_for, upcast_for


@triton.jit
def _ternary_kernel(x_ptr, y_ptr, out_ptr, pos_ptr, neg_ptr, scale_ptr, M, N, K,
                    sxm, sxk, sym, syn, som, son, spn, snn,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr,
                    PREC: tl.constexpr):
    """UPCAST (constexpr): fp32 dot operands, for bf16 under the interpreter (its bf16 ``tl.dot`` is broken)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        mask_k = kk < K
        xk = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk, mask=(rm[:, None] < M) & mask_k[None, :],
                     other=0.0)
        byte = (kk // 8)[:, None]
        bit = (kk % 8)[:, None]
        mask_w = mask_k[:, None] & (rn[None, :] < N)
        p = tl.load(pos_ptr + rn[None, :] * spn + byte, mask=mask_w, other=0).to(tl.int32)
        q = tl.load(neg_ptr + rn[None, :] * snn + byte, mask=mask_w, other=0).to(tl.int32)
        w = ((p >> bit) & 1) - ((q >> bit) & 1)  # [BK, BN] in {-1, 0, 1}
        if UPCAST:
            xk = xk.to(tl.float32)
        acc = tl.dot(xk, w.to(xk.dtype), acc, input_precision=PREC)
    s = tl.load(scale_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    y = tl.load(y_ptr + rm[:, None] * sym + rn[None, :] * syn, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rm[:, None] * som + rn[None, :] * son, (y + acc * s[None, :]).to(out_ptr.dtype.element_ty),
             mask=mask)


def ternary_apply(x: torch.Tensor, y: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, scale: torch.Tensor,
                  in_features: int) -> torch.Tensor:
    """Triton path of :func:`adapterfmt.kernels.ternary_apply`."""
    x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    m, n = x2.shape[0], pos.shape[0]
    out = torch.empty_like(y2)
    scale = scale.reshape(-1).float().expand(n).contiguous()
    if interpreting():
        bm, bn, bk, warps = 16, 64, 64, 4
    else:
        bm, bn, bk, warps = (16, 64, 128, 4) if m <= 16 else (64, 64, 64, 4)
    _ternary_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        x2, y2, out, pos, neg, scale, m, n, in_features,
        x2.stride(0), x2.stride(1), y2.stride(0), y2.stride(1), out.stride(0), out.stride(1),
        pos.stride(0), neg.stride(0), BM=bm, BN=bn, BK=bk, UPCAST=upcast_for(x.dtype),
        PREC=precision_for(x.dtype), num_warps=warps)
    return out.reshape(y.shape)
