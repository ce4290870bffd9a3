"""``prompt``: virtual token embeddings prepended to the output of the input embedding module."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedError
from .base import DeltaKind, Entry, Tensors, fail

if TYPE_CHECKING:
    import torch
    from torch import nn


class Prompt(DeltaKind):
    name = "prompt"
    required_roles = ("embeddings",)

    def is_additive(self, entry: Entry, roles: Collection[str]) -> bool:
        return False

    def check(self, module: str, entry: Entry, shapes: dict[str, tuple[int, ...]]) -> None:
        pos = entry.get("params", {}).get("position", "prefix")
        if pos != "prefix":
            raise fail(module, f"prompt params.position must be 'prefix', got {pos!r}")
        e, shape = shapes["embeddings"], entry["shape"]
        if len(e) != 2 or len(shape) != 2 or e[1] != shape[1]:
            raise fail(module, f"embeddings has shape {list(e)}, expected [n_tokens, {shape[-1]}]")

    def forward(self, module: nn.Module, entry: Entry, t: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import torch

        emb = t["embeddings"].to(y.dtype)
        if y.dim() == 2:
            return torch.cat([emb, y], dim=0)
        return torch.cat([emb.expand(y.shape[0], *emb.shape), y], dim=1)

    def merge(self, module: nn.Module, entry: Entry, t: Tensors) -> Any:
        raise UnsupportedError("a prompt adapter cannot be merged into weights; attach it unmerged")
