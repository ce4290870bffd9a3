"""Guarded, lazy access to Triton: nothing here imports triton until asked."""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    """True when ``triton`` imports (it is absent on macOS and Windows)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def upcast_for(dtype: torch.dtype) -> bool:
    """Whether a kernel should upcast its ``tl.dot`` operands to fp32.

    The interpreter's bf16 ``tl.dot`` returns garbage, so under ``TRITON_INTERPRET=1`` bf16 operands are upcast;
    on a GPU they stay bf16 (tensor cores).
    """
    return dtype == torch.bfloat16 and interpreting()


def precision_for(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: IEEE for fp32 inputs (no TF32 rounding), TF32 otherwise (ignored for 16-bit)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def next_pow2(n: int, minimum: int = 16) -> int:
    """The smallest power of two >= max(n, minimum) (``tl.arange`` sizes and ``tl.dot`` minimums)."""
    p = minimum
    while p < n:
        p *= 2
    return p
