"""Public apply functions: each picks a backend, then runs the Triton kernel or the fast torch path.

Backend choice (``ADAPTERFMT_KERNELS``): ``auto`` (default) runs Triton when every tensor is on CUDA, triton
imports and no input needs a gradient, torch otherwise; ``torch`` and ``triton`` force one (``triton`` on CPU
tensors needs ``TRITON_INTERPRET=1``); any other value names an apply backend from a plugin
(``adapterfmt_backends`` hook), used where its ``supports(op, device, dtype)`` says yes.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

import torch

from . import torch_ops
from ._triton import triton_available
from .csr import CSR, to_csr

ENV = "ADAPTERFMT_KERNELS"
_TRITON_MODULES = {
    "block_apply": "triton_block",
    "lora_linear": "triton_lora",
    "lora_delta": "triton_multi",
    "multi_lora_rows": "triton_multi",
    "sparse_apply": "triton_sparse",
    "sparse_merge_": "triton_sparse",
    "ternary_apply": "triton_ternary",
}


def backend_setting() -> str:
    return os.environ.get(ENV, "auto").strip().lower() or "auto"


def _plugin_backend(name: str, op: str, t: torch.Tensor) -> Callable[..., Any] | None:
    from ..plugin import registry

    found = registry.backends()
    if name not in found:
        known = ", ".join(["auto", "torch", "triton", *sorted(found)])
        raise ValueError(f"{ENV}={name!r} names no apply backend (known: {known})")
    backend = found[name]
    return backend.get(op) if backend.supports(op, t.device, t.dtype) else None


def choose_backend(op: str, *tensors: torch.Tensor | None) -> str:
    """``"triton"`` or ``"torch"`` for ``op`` on these tensors (plugin backends are resolved in :func:`_impl`)."""
    setting = backend_setting()
    ts = [t for t in tensors if t is not None]
    if setting == "torch":
        return "torch"
    if setting == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV}=triton but triton is not installed")
        return "triton"
    cuda = all(t.is_cuda for t in ts)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in ts)
    return "triton" if cuda and not grad and triton_available() else "torch"


def _impl(op: str, *tensors: torch.Tensor | None) -> Callable[..., Any]:
    setting = backend_setting()
    if setting not in ("auto", "torch", "triton"):
        fn = _plugin_backend(setting, op, next(t for t in tensors if t is not None))
        if fn is not None:
            return fn
        backend = "triton" if all(t.is_cuda for t in tensors if t is not None) and triton_available() else "torch"
    else:
        backend = choose_backend(op, *tensors)
    if backend == "torch":
        return getattr(torch_ops, op)
    return getattr(importlib.import_module(f".{_TRITON_MODULES[op]}", __package__), op)


def _check_2d(name: str, t: torch.Tensor, shape: tuple[int | None, ...]) -> None:
    if t.dim() != len(shape) or any(s is not None and t.shape[i] != s for i, s in enumerate(shape)):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} has shape {list(t.shape)}, expected [{want}]")


def lora_linear(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + scale * (x A^T) B^T (+ bias)`` in x's dtype, fp32 accumulation; one fused kernel on GPU.

    x [..., in], weight [out, in], A [r, in], B [out, r], bias [out] or None.
    """
    out_f, in_f = weight.shape
    _check_2d("A", A, (None, in_f))
    _check_2d("B", B, (out_f, A.shape[0]))
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects {in_f}")
    return _impl("lora_linear", x, weight, A, B, bias)(x, weight, A, B, scale, bias)


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Adds ``scale * (x A^T) B^T`` into ``out`` in place and returns it; without ``out``, returns the delta."""
    _check_2d("B", B, (None, A.shape[0]))
    if x.shape[-1] != A.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, A expects {A.shape[1]}")
    return _impl("lora_delta", x, A, B, out)(x, A, B, scale, out)


def _check_pool(x: torch.Tensor, y: torch.Tensor, A_pool: torch.Tensor, B_pool: torch.Tensor,
                scales: torch.Tensor) -> None:
    if A_pool.dim() != 3 or B_pool.dim() != 3 or A_pool.shape[0] != B_pool.shape[0] or \
            A_pool.shape[1] != B_pool.shape[2]:
        raise ValueError(f"A_pool {list(A_pool.shape)} and B_pool {list(B_pool.shape)} must be [n, r, in] and "
                         "[n, out, r]")
    if x.shape[-1] != A_pool.shape[2] or y.shape[-1] != B_pool.shape[1] or x.shape[:-1] != y.shape[:-1]:
        raise ValueError(f"x {list(x.shape)} / y {list(y.shape)} do not fit the pool (in={A_pool.shape[2]}, "
                         f"out={B_pool.shape[1]})")
    if scales.shape != (A_pool.shape[0],):
        raise ValueError(f"scales has shape {list(scales.shape)}, expected [{A_pool.shape[0]}]")


def multi_lora_rows(x: torch.Tensor, y: torch.Tensor, A_pool: torch.Tensor, B_pool: torch.Tensor,
                    scales: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """A new tensor: ``y[i] + scales[a] * B_pool[a] (A_pool[a] x[i])`` with ``a = ids[i]``; ``-1`` keeps ``y[i]``.

    x [T, in] (or [T, ..., in], the id then covering all of row i), y [T, out] (or [T, ..., out]),
    A_pool [n, r_max, in], B_pool [n, out, r_max], scales [n] fp32, ids [T] integer in -1..n-1.
    """
    _check_pool(x, y, A_pool, B_pool, scales)
    if ids.dim() != 1 or (x.dim() > 1 and ids.shape[0] != x.shape[0]):
        raise ValueError(f"ids must be [T] with T = x.shape[0] = {x.shape[0]}, got {list(ids.shape)}")
    return _impl("multi_lora_rows", x, y, A_pool, B_pool)(x, y, A_pool, B_pool, scales, ids)


def multi_lora_segments(x: torch.Tensor, y: torch.Tensor, A_pool: torch.Tensor, B_pool: torch.Tensor,
                        scales: torch.Tensor, seg_starts: torch.Tensor, seg_ids: torch.Tensor) -> torch.Tensor:
    """A new tensor: rows ``seg_starts[s]:seg_starts[s+1]`` of ``y`` plus adapter ``seg_ids[s]``'s delta.

    x [T, in], y [T, out], seg_starts [S+1] non-decreasing, seg_ids [S] (-1: base only); rows outside every
    segment keep y. On the Triton path segments become per-row ids and share the rows kernels.
    """
    _check_pool(x, y, A_pool, B_pool, scales)
    if seg_starts.dim() != 1 or seg_ids.dim() != 1 or seg_starts.shape[0] != seg_ids.shape[0] + 1:
        raise ValueError(f"seg_starts must be [S+1] and seg_ids [S], got {list(seg_starts.shape)} and "
                         f"{list(seg_ids.shape)}")
    fn = _impl("multi_lora_rows", x, y, A_pool, B_pool)
    if fn is torch_ops.multi_lora_rows:
        return torch_ops.multi_lora_segments(x, y, A_pool, B_pool, scales, seg_starts, seg_ids)
    x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    ids = torch_ops.segment_row_ids(seg_starts.to(x.device), seg_ids.to(x.device), x2.shape[0])
    return fn(x2, y2, A_pool, B_pool, scales, ids).reshape(y.shape)


def block_apply(x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, block: torch.Tensor, scale: float,
                axis: str) -> torch.Tensor:
    """A new tensor ``y + x dW^T`` for a ``block`` delta, no weight-sized tensor formed.

    ``axis="rows"``: block [n, in], ``y[..., indices] += scale * x block^T``; ``"columns"``: block [out, n],
    ``y += scale * x[..., indices] block^T``. indices [n] int64, strictly increasing (not checked here: that needs
    a host synchronisation; the ``block`` kind checks it when the adapter loads).
    """
    if axis not in ("rows", "columns"):
        raise ValueError(f"axis must be 'rows' or 'columns', got {axis!r}")
    if indices.dim() != 1 or x.shape[:-1] != y.shape[:-1]:
        raise ValueError(f"indices must be [n] and x / y share leading dims, got {list(indices.shape)}, "
                         f"{list(x.shape)}, {list(y.shape)}")
    n = indices.shape[0]
    want = (n, x.shape[-1]) if axis == "rows" else (y.shape[-1], n)
    _check_2d("block", block, want)
    return _impl("block_apply", x, y, block, indices)(x, y, indices, block, scale, axis)


def sparse_apply(x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                 shape: tuple[int, int] | torch.Size, *, csr: CSR | None = None) -> torch.Tensor:
    """A new tensor ``y + x S^T``; S [out, in] is given by sorted flat row-major int64 ``indices`` + ``values``.

    The CSR form is built once per call (pass ``csr=to_csr(...)`` to reuse it across calls).
    """
    out_f, in_f = int(shape[0]), int(shape[1])
    if x.shape[-1] != in_f or y.shape[-1] != out_f:
        raise ValueError(f"x {list(x.shape)} / y {list(y.shape)} do not fit a sparse delta of shape {[out_f, in_f]}")
    csr = csr if csr is not None else to_csr(indices, values, (out_f, in_f))
    return _impl("sparse_apply", x, y, csr.values)(x, y, csr)


def sparse_merge_(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                  alpha: float = 1.0) -> torch.Tensor:
    """``weight.flat[indices] += alpha * values`` in place (fp32 add, one rounding); returns ``weight``.

    Indices must be unique (the format stores them sorted, strictly increasing); weight must be contiguous.
    """
    if not weight.is_contiguous():
        raise ValueError("sparse_merge_ needs a contiguous weight")
    if indices.shape != values.shape or indices.dim() != 1:
        raise ValueError("indices and values must be 1-D of equal length")
    return _impl("sparse_merge_", weight, values)(weight, indices, values, alpha)


def ternary_apply(x: torch.Tensor, y: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, scale: torch.Tensor | float,
                  in_features: int) -> torch.Tensor:
    """A new tensor ``y + x T^T``, ``T[o, i] = scale[o] * (pos - neg)[o, i]`` from uint8 bit planes
    [out, ceil(in/8)] (see :mod:`adapterfmt.kernels.ternary_planes`); scale is [out] or a scalar."""
    if pos.shape != neg.shape or pos.dim() != 2 or pos.shape[1] != (in_features + 7) // 8:
        raise ValueError(f"pos/neg must be [out, {(in_features + 7) // 8}] uint8 planes, got {list(pos.shape)} and "
                         f"{list(neg.shape)}")
    if x.shape[-1] != in_features or y.shape[-1] != pos.shape[0]:
        raise ValueError(f"x {list(x.shape)} / y {list(y.shape)} do not fit a ternary delta of shape "
                         f"{[pos.shape[0], in_features]}")
    s = scale if isinstance(scale, torch.Tensor) else torch.full((1,), float(scale), device=pos.device)
    s = s.reshape(-1).to(device=pos.device)
    if s.numel() not in (1, pos.shape[0]):
        raise ValueError(f"scale must have 1 or {pos.shape[0]} values, got {s.numel()}")
    s = s.float().expand(pos.shape[0])
    return _impl("ternary_apply", x, y, pos)(x, y, pos, neg, s, in_features)
