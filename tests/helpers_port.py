"""Shared by test_extract.py and test_port.py: tiny checkpoints with known changes."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from adapterfmt.tiny import build_tiny, save_tiny

TRUE_RANK = 3
CHANGED = ("model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")


def lowrank_change(shape: tuple[int, ...], gen: torch.Generator, rank: int = TRUE_RANK) -> torch.Tensor:
    return 0.05 * torch.randn(shape[0], rank, generator=gen) @ torch.randn(rank, shape[1], generator=gen)


def tuned_copy(model: nn.Module, seed: int = 1, modules: tuple[str, ...] = CHANGED) -> tuple[nn.Module, dict]:
    """A copy of ``model`` with a known rank-3 change added to ``modules``' weights; returns it and the changes."""
    gen = torch.Generator().manual_seed(seed)
    tuned = copy.deepcopy(model)
    changes = {}
    with torch.no_grad():
        for m in modules:
            w = tuned.get_submodule(m).weight
            changes[m] = lowrank_change(tuple(w.shape), gen)
            w.add_(changes[m])
    return tuned, changes


def tiny_pair(tmp: Path, seed: int = 1) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(base dir, fine-tuned dir, {module: true change}) of the tiny model."""
    base = build_tiny(0)
    tuned, changes = tuned_copy(base, seed)
    return save_tiny(base, tmp / "base"), save_tiny(tuned, tmp / "tuned"), changes


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())
