"""Session-wide test settings: no network to the real Hub, Triton kernels through the CPU interpreter."""

from __future__ import annotations

import os

# Must be set before triton is imported anywhere in the test process.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every test away from ~/.cache/huggingface."""
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))


@pytest.fixture
def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
