"""A base for additive kinds whose ``dW`` is built whole from their tensors (LoHa, LoKr, VeRA, FourierFT,
VB-LoRA, RandLoRA, C3A, MiSS ...): a subclass defines :meth:`WeightDeltaKind.function_delta`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .base import DeltaKind
from .modules import weight_function

if TYPE_CHECKING:
    import torch
    from torch import nn


def promoted(t: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating-point tensors in at least fp32 (fp64 stays fp64); others (indices) as they are."""
    import torch

    return {r: v.to(torch.promote_types(v.dtype, torch.float32)) if v.is_floating_point() else v
            for r, v in t.items()}


class WeightDeltaKind(DeltaKind):
    """Unmerged ``y + f(x; dW)``, merged ``W + dW``, with ``dW`` computed in at least fp32."""

    layout_sensitive = True

    def function_delta(self, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``dW`` in function layout (``[out, in, ...]``) from tensors already in at least fp32."""
        raise NotImplementedError

    @staticmethod
    def scale(entry: Mapping[str, Any]) -> float:
        """``params.scale`` (default 1)."""
        return float(entry.get("params", {}).get("scale", 1.0))

    def delta(self, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        fw = self.function_delta(entry, promoted(t))
        return fw.t() if self.transposed(entry) else fw

    def forward(self, module: nn.Module, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor],
                x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + weight_function(module, x, self.function_delta(entry, promoted(t)).to(y.dtype))
