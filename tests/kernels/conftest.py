"""Kernel tests: Triton kernels through the CPU interpreter unless a GPU runs them natively.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` kernel is defined; the kernel modules import lazily,
so setting it here at import (as the top-level conftest also does) is early enough. The backend switch
(``ADAPTERFMT_KERNELS``) is set per test through monkeypatch, so nothing leaks into other test directories.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from adapterfmt.kernels._triton import interpreting, triton_available  # noqa: E402

#: Where the Triton tests put their tensors: the CPU under the interpreter, else the GPU.
DEVICE = "cpu" if interpreting() or not torch.cuda.is_available() else "cuda"

#: Relative tolerance (of the reference's largest magnitude) per dtype; 16-bit like Punica / vLLM's tests.
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def triton_backend(monkeypatch: pytest.MonkeyPatch) -> str:
    if not triton_available():
        pytest.skip("triton is not installed")
    if DEVICE == "cpu" and not interpreting():
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    monkeypatch.setenv("ADAPTERFMT_KERNELS", "triton")
    return DEVICE


@pytest.fixture
def torch_backend(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("ADAPTERFMT_KERNELS", "torch")
    return "cpu"


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, tol: float | None = None) -> None:
    """Same shape and dtype, and max |out - ref| within tol x max(|ref|, 1)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    tol = TOL[dtype] if tol is None else tol
    err = (out.float().cpu() - ref.float().cpu()).abs().max().item() if out.numel() else 0.0
    bound = tol * max(ref.float().abs().max().item() if ref.numel() else 0.0, 1.0)
    assert err <= bound, f"max error {err:.3g} > {bound:.3g} ({dtype})"


@pytest.fixture
def matches():
    return assert_matches


def make_pool(ranks: list[int], n_in: int, n_out: int, dtype: torch.dtype, device: str, seed: int = 0):
    from adapterfmt.kernels import LoraPool

    g = torch.Generator().manual_seed(seed)
    adapters = [(torch.randn(r, n_in, generator=g) / n_in ** 0.5, torch.randn(n_out, r, generator=g) / r ** 0.5,
                 0.5 + i / 4) for i, r in enumerate(ranks)]
    return LoraPool.stack(adapters, dtype=dtype, device=device)


def make_ids(t: int, n: int, popularity: str, seed: int = 0) -> torch.Tensor:
    """Row ids with ~1/8 base-only rows (-1); ``skewed``: adapter a drawn with weight 1/(a+1)^2."""
    g = torch.Generator().manual_seed(seed)
    w = torch.ones(n) if popularity == "uniform" else 1.0 / (torch.arange(n) + 1.0) ** 2
    ids = torch.multinomial(w, t, replacement=True, generator=g)
    ids[torch.rand(t, generator=g) < 0.125] = -1
    return ids


@pytest.fixture
def pool_factory():
    return make_pool


@pytest.fixture
def ids_factory():
    return make_ids
