"""Backend choice, lazy triton import, plugin backends, gradients through the torch path, split-K shrink."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import adapterfmt
from adapterfmt import kernels as K
from adapterfmt.kernels import reference as R
from adapterfmt.kernels._triton import interpreting, triton_available
from adapterfmt.plugin import registry


def test_auto_picks_torch_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERFMT_KERNELS", "auto")
    assert K.choose_backend("lora_linear", torch.zeros(2), torch.zeros(2)) == "torch"
    monkeypatch.setenv("ADAPTERFMT_KERNELS", "torch")
    assert K.choose_backend("lora_linear", torch.zeros(2)) == "torch"


def _run(code: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_import_is_lazy_and_works_without_triton() -> None:
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # as on macOS: import triton fails\n"
        "import torch, adapterfmt.kernels as K\n"
        "from adapterfmt.kernels._triton import triton_available\n"
        "assert not triton_available()\n"
        "x = torch.randn(3, 8); A = torch.randn(2, 8); B = torch.randn(5, 2)\n"
        "d = K.lora_delta(x, A, B, 1.0)\n"
        "assert torch.allclose(d, (x @ A.t()) @ B.t(), atol=1e-5)\n"
        "import os; os.environ['ADAPTERFMT_KERNELS'] = 'triton'\n"
        "try:\n    K.lora_delta(x, A, B, 1.0)\nexcept RuntimeError as e:\n    print('refused:', e)\n"
    )
    res = _run(code, {"ADAPTERFMT_KERNELS": "auto"})
    assert res.returncode == 0, res.stderr
    assert "refused: ADAPTERFMT_KERNELS=triton but triton is not installed" in res.stdout
    res = _run("import sys, adapterfmt.kernels\nassert 'triton' not in sys.modules", {})
    assert res.returncode == 0, res.stderr


def test_unknown_backend_name_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERFMT_KERNELS", "no-such-backend")
    with pytest.raises(ValueError, match="names no apply backend"):
        K.lora_delta(torch.randn(2, 4), torch.randn(1, 4), torch.randn(3, 1), 1.0)


class _Doubling:
    """A third-party backend implementing one op (lora_delta) as twice the reference, to see it is used."""

    name = "test-doubling"

    def supports(self, op: str, device: torch.device, dtype: torch.dtype) -> bool:
        return op == "lora_delta"

    def get(self, op: str):
        return lambda x, A, B, scale, out=None: R.lora_delta_ref(x, A, B, 2 * scale, out)


class _Plugin:
    @adapterfmt.hookimpl
    def adapterfmt_backends(self) -> list:
        return [_Doubling()]


def test_plugin_backend_is_used_where_it_supports_the_op(monkeypatch: pytest.MonkeyPatch) -> None:
    pm = registry.plugin_manager()
    plugin = _Plugin()
    pm.register(plugin, name="test-kernels-backend")
    registry._collect.cache_clear()
    try:
        monkeypatch.setenv("ADAPTERFMT_KERNELS", "test-doubling")
        x, A, B = torch.randn(3, 8), torch.randn(2, 8), torch.randn(5, 2)
        assert torch.allclose(K.lora_delta(x, A, B, 1.0), R.lora_delta_ref(x, A, B, 2.0), atol=1e-5)
        # an op it does not support falls back to the automatic choice (torch here)
        w = torch.randn(5, 8)
        assert torch.allclose(K.lora_linear(x, w, A, B, 1.0), R.lora_linear_ref(x, w, A, B, 1.0), atol=1e-5)
    finally:
        pm.unregister(plugin)
        registry._collect.cache_clear()


def test_torch_path_is_differentiable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERFMT_KERNELS", "auto")
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 9, generator=g), torch.randn(6, 9, generator=g)
    A = torch.randn(3, 9, generator=g, requires_grad=True)
    B = torch.randn(6, 3, generator=g, requires_grad=True)
    K.lora_linear(x, w, A, B, 0.5).square().sum().backward()
    ga, gb = A.grad.clone(), B.grad.clone()
    A.grad = B.grad = None
    R.lora_linear_ref(x, w, A, B, 0.5).square().sum().backward()
    assert torch.allclose(ga, A.grad, atol=1e-4) and torch.allclose(gb, B.grad, atol=1e-4)


def test_shape_errors_are_clear() -> None:
    pool = K.LoraPool.stack([(torch.randn(2, 8), torch.randn(5, 2), 1.0)])
    with pytest.raises(ValueError, match="ids must be"):
        pool.rows(torch.randn(3, 8), torch.randn(3, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="do not fit the pool"):
        pool.rows(torch.randn(3, 7), torch.randn(3, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"block has shape \[3, 8\], expected \[5, 2\]"):
        K.block_apply(torch.randn(1, 8), torch.randn(1, 5), torch.tensor([0, 1]), torch.randn(3, 8), 1.0, "columns")
    with pytest.raises(ValueError, match="axis must be"):
        K.block_apply(torch.randn(1, 8), torch.randn(1, 5), torch.tensor([0]), torch.randn(1, 8), 1.0, "row")
    with pytest.raises(ValueError, match="pos/neg"):
        K.ternary_apply(torch.randn(1, 9), torch.randn(1, 2), torch.zeros(2, 1, dtype=torch.uint8),
                        torch.zeros(2, 1, dtype=torch.uint8), 1.0, 9)


@pytest.mark.skipif(not (triton_available() and interpreting()), reason="needs the Triton interpreter")
def test_split_k_shrink_accumulates_atomically(monkeypatch: pytest.MonkeyPatch, pool_factory, matches) -> None:
    """The GPU config splits K across programs (atomic fp32 adds into t); check it under the interpreter too."""
    from adapterfmt.kernels import triton_multi

    monkeypatch.setattr(triton_multi, "_blocks", lambda m, k: (16, 32, 32, 3))
    pool = pool_factory([8, 16], 130, 33, torch.float32, "cpu")
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(6, 130, generator=g), torch.randn(6, 33, generator=g)
    ids = torch.tensor([0, 1, 1, -1, 0, 1])
    out = triton_multi.multi_lora_rows(x, y, pool.A, pool.B, pool.scales, ids)
    matches(out, R.multi_lora_rows_ref(x, y, pool.A, pool.B, pool.scales, ids), torch.float32)
