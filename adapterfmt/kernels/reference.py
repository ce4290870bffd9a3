"""Plain torch references that define every kernel's result.

Deliberately simple: everything is computed in fp32 (Python loops over rows or segments where that is the
clearest statement) and cast to the output dtype at the end. The fast paths and the Triton kernels are tested
against these functions.
"""

from __future__ import annotations

import torch

from .ternary_planes import unpack_ternary_planes


def lora_linear_ref(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + scale * (x A^T) B^T (+ bias)`` in x's dtype; A is [r, in], B is [out, r], x is [..., in]."""
    xf = x.float()
    out = xf @ weight.float().t() + float(scale) * ((xf @ A.float().t()) @ B.float().t())
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def lora_delta_ref(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """A new tensor ``out + scale * (x A^T) B^T`` in out's dtype; without ``out``, the delta alone in x's dtype."""
    delta = float(scale) * ((x.float() @ A.float().t()) @ B.float().t())
    return delta.to(x.dtype) if out is None else (out.float() + delta).to(out.dtype)


def multi_lora_rows_ref(x: torch.Tensor, y: torch.Tensor, A_pool: torch.Tensor, B_pool: torch.Tensor,
                        scales: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Row ``i`` of the result is ``y[i] + scales[a] * B_pool[a] @ (A_pool[a] @ x[i])`` with ``a = ids[i]``;
    rows with ``a == -1`` keep ``y[i]``."""
    out = y.float().clone()
    xf = x.float()
    for i, a in enumerate(ids.tolist()):
        if a >= 0:
            out[i] += float(scales[a]) * (B_pool[a].float() @ (A_pool[a].float() @ xf[i]))
    return out.to(y.dtype)


def multi_lora_segments_ref(x: torch.Tensor, y: torch.Tensor, A_pool: torch.Tensor, B_pool: torch.Tensor,
                            scales: torch.Tensor, seg_starts: torch.Tensor, seg_ids: torch.Tensor) -> torch.Tensor:
    """Rows ``seg_starts[s]:seg_starts[s+1]`` get adapter ``seg_ids[s]`` (-1: none); rows in no segment keep y."""
    out = y.float().clone()
    xf = x.float()
    starts = seg_starts.tolist()
    for s, a in enumerate(seg_ids.tolist()):
        lo, hi = starts[s], starts[s + 1]
        if a >= 0 and hi > lo:
            out[lo:hi] += float(scales[a]) * ((xf[lo:hi] @ A_pool[a].float().t()) @ B_pool[a].float().t())
    return out.to(y.dtype)


def sparse_dense_ref(indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The dense fp32 matrix S of a sparse delta (flat row-major indices); repeated indices add up."""
    dense = torch.zeros(shape[0] * shape[1], dtype=torch.float32, device=values.device)
    dense.index_put_((indices.long(),), values.float(), accumulate=True)
    return dense.reshape(shape)


def sparse_apply_ref(x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                     shape: tuple[int, int]) -> torch.Tensor:
    """``y + x S^T`` in y's dtype, S [out, in] given by flat row-major ``indices`` and ``values``."""
    return (y.float() + x.float() @ sparse_dense_ref(indices, values, shape).t()).to(y.dtype)


def sparse_merge_ref(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                     alpha: float = 1.0) -> torch.Tensor:
    """A new tensor ``weight + alpha * S`` (the result :func:`sparse_merge_` writes in place)."""
    s = sparse_dense_ref(indices, values, tuple(weight.shape))
    return (weight.float() + float(alpha) * s).to(weight.dtype)


def ternary_apply_ref(x: torch.Tensor, y: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, scale: torch.Tensor,
                      in_features: int) -> torch.Tensor:
    """``y + x T^T`` with ``T[o, i] = scale[o] * (pos - neg)[o, i]`` (planes as in :mod:`.ternary_planes`)."""
    t = unpack_ternary_planes(pos, neg, in_features).float()
    t = t * scale.float().reshape(-1, 1).expand(t.shape[0], 1)
    return (y.float() + x.float() @ t.t()).to(y.dtype)


def block_apply_ref(x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, block: torch.Tensor, scale: float,
                    axis: str) -> torch.Tensor:
    """``y + x dW^T`` in y's dtype, ``dW[indices[j], :] = scale * block[j, :]`` (rows, block [n, in]) or
    ``dW[:, indices[j]] = scale * block[:, j]`` (columns, block [out, n])."""
    d = torch.zeros(y.shape[-1], x.shape[-1], dtype=torch.float32, device=block.device)
    for j, i in enumerate(indices.tolist()):
        if axis == "rows":
            d[i, :] = float(scale) * block[j].float()
        else:
            d[:, i] = float(scale) * block[:, j].float()
    return (y.float() + x.float() @ d.t()).to(y.dtype)


__all__ = ["block_apply_ref", "lora_linear_ref", "lora_delta_ref", "multi_lora_rows_ref", "multi_lora_segments_ref", "sparse_dense_ref",
           "sparse_apply_ref", "sparse_merge_ref", "ternary_apply_ref"]
