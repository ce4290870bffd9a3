"""Fast torch implementations of the apply paths (CPU, and any device without Triton).

Batched throughout: gathers, ``bmm``/``addmm``, and grouping rows by adapter with ``index_add``; the only Python
loops run over the adapters (or segments) present in a batch, never over rows. Results match
:mod:`.reference` within the dtype's tolerance (16-bit inputs multiply in their own dtype here).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .csr import CSR
from .ternary_planes import unpack_bits

#: Batches of at most this many rows always use the gathered-pool ``bmm`` path in :func:`multi_lora_rows`, and
#: batches of up to ``GATHER_MAX_ROWS`` rows do when the pool has at least as many adapters; larger batches are
#: grouped by adapter (the gather copies r x (in + out) values per row; grouping costs a few ops per adapter).
#: Measured on 2 CPU cores, 1024 -> 2816, r=16.
GATHER_ALWAYS_ROWS = 8
GATHER_MAX_ROWS = 64


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def lora_linear(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    x2 = _flat(x)
    base = F.linear(x2, weight, bias)
    out = torch.addmm(base, x2 @ A.t(), B.t(), alpha=float(scale))
    return out.reshape(*x.shape[:-1], weight.shape[0])


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
               out: torch.Tensor | None = None) -> torch.Tensor:
    x2 = _flat(x)
    if out is None:
        return (torch.mm(x2 @ A.t(), B.t()) * float(scale)).reshape(*x.shape[:-1], B.shape[0])
    o2 = out.view(-1, out.shape[-1])
    if o2.dtype == x.dtype:
        o2.addmm_(x2 @ A.t(), B.t(), alpha=float(scale))
    else:
        o2.add_((torch.mm(x2 @ A.t(), B.t()) * float(scale)).to(o2.dtype))
    return out


def _rows_gather(x2: torch.Tensor, y2: torch.Tensor, A_pool: torch.Tensor, B_pool: torch.Tensor,
                 scales: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    idx = ids.clamp(min=0)
    row_scale = torch.where(ids >= 0, scales[idx], 0.0).to(x2.dtype)
    mid = torch.bmm(x2.unsqueeze(1), A_pool[idx].transpose(1, 2)) * row_scale.view(-1, 1, 1)
    delta = torch.bmm(mid, B_pool[idx].transpose(1, 2)).squeeze(1)
    return y2 + delta.to(y2.dtype)


def _rows_grouped(x2: torch.Tensor, y2: torch.Tensor, A_pool: torch.Tensor, B_pool: torch.Tensor,
                  scales: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    n = A_pool.shape[0]
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids + 1, minlength=n + 1).tolist()  # slot 0: base-only rows (-1)
    out = y2.clone()
    start = counts[0]
    for a in range(n):
        c = counts[a + 1]
        if c == 0:
            continue
        rows = order[start:start + c]
        start += c
        delta = torch.mm(x2[rows] @ A_pool[a].t(), B_pool[a].t()) * scales[a].to(x2.dtype)
        out.index_add_(0, rows, delta.to(out.dtype))
    return out


def multi_lora_rows(x: torch.Tensor, y: torch.Tensor, A_pool: torch.Tensor, B_pool: torch.Tensor,
                    scales: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    x2, y2, ids = _flat(x), _flat(y), ids.reshape(-1).to(torch.int64)
    if ids.shape[0] != x2.shape[0]:  # x [T, ..., in] with one id per leading index
        ids = ids.repeat_interleave(x2.shape[0] // ids.shape[0])
    t = x2.shape[0]
    gather = t <= GATHER_ALWAYS_ROWS or t <= min(A_pool.shape[0], GATHER_MAX_ROWS)
    fn = _rows_gather if gather else _rows_grouped
    return fn(x2, y2, A_pool, B_pool, scales, ids).reshape(y.shape)


def segment_row_ids(seg_starts: torch.Tensor, seg_ids: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Per-row adapter ids (-1 outside every segment) from segment bounds ``seg_starts`` [S+1] and ``seg_ids`` [S]."""
    device = seg_ids.device
    n_seg = seg_ids.shape[0]
    if n_seg == 0:
        return torch.full((n_rows,), -1, dtype=torch.int64, device=device)
    starts = seg_starts.to(device=device, dtype=torch.int64)
    rows = torch.arange(n_rows, device=device)
    seg = torch.searchsorted(starts[1:], rows, right=True)  # first segment whose end is past the row
    seg_c = seg.clamp(max=n_seg - 1)
    inside = (seg < n_seg) & (rows >= starts[seg_c])
    return torch.where(inside, seg_ids.to(torch.int64)[seg_c], -1)


def multi_lora_segments(x: torch.Tensor, y: torch.Tensor, A_pool: torch.Tensor, B_pool: torch.Tensor,
                        scales: torch.Tensor, seg_starts: torch.Tensor, seg_ids: torch.Tensor) -> torch.Tensor:
    x2, y2 = _flat(x), _flat(y)
    if seg_ids.shape[0] <= 64:  # few segments: slices, no gather
        out = y2.clone()
        starts = seg_starts.tolist()
        for s, a in enumerate(seg_ids.tolist()):
            lo, hi = starts[s], starts[s + 1]
            if a < 0 or hi <= lo:
                continue
            d = torch.mm(x2[lo:hi] @ A_pool[a].t(), B_pool[a].t()) * scales[a].to(x2.dtype)
            out[lo:hi] += d.to(out.dtype)
        return out.reshape(y.shape)
    ids = segment_row_ids(seg_starts, seg_ids, x2.shape[0])
    return _rows_grouped(x2, y2, A_pool, B_pool, scales, ids).reshape(y.shape)


def sparse_apply(x: torch.Tensor, y: torch.Tensor, csr: CSR) -> torch.Tensor:
    x2 = _flat(x)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        s = torch.sparse_csr_tensor(csr.rowptr, csr.cols, csr.values.float(), size=csr.shape,
                                    check_invariants=False)
    delta = (s @ x2.float().t()).t()
    return (_flat(y) + delta.to(y.dtype)).reshape(y.shape)


def sparse_merge_(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                  alpha: float = 1.0) -> torch.Tensor:
    flat = weight.view(-1)
    idx = indices.to(torch.int64)
    if weight.dtype in (torch.float32, torch.float64):
        flat.index_add_(0, idx, values.to(weight.dtype), alpha=float(alpha))
    else:  # unique indices: add in fp32, round once
        flat[idx] = (flat[idx].float() + float(alpha) * values.float()).to(weight.dtype)
    return weight


def ternary_apply(x: torch.Tensor, y: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, scale: torch.Tensor,
                  in_features: int) -> torch.Tensor:
    signs = unpack_bits(pos, in_features).to(x.dtype) - unpack_bits(neg, in_features).to(x.dtype)
    delta = F.linear(_flat(x), signs) * scale.reshape(1, -1).to(x.dtype)
    return (_flat(y) + delta.to(y.dtype)).reshape(y.shape)


def block_apply(x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, block: torch.Tensor, scale: float,
                axis: str) -> torch.Tensor:
    blk = block.to(x.dtype)
    if axis == "rows":  # one GEMM whose n outputs are added at indices
        return y.index_add(-1, indices, (float(scale) * F.linear(x, blk)).to(y.dtype))
    return y + (float(scale) * F.linear(x.index_select(-1, indices), blk)).to(y.dtype)
