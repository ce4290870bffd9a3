"""``vector``: a per-channel vector that scales (IA3) or offsets (LoFiT-style) a module's input or output."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedError
from .base import Entry, RewritesWeight, Tensors, fail
from .lowrank import channel_view, function_shape
from .modules import weight_function

if TYPE_CHECKING:
    import torch
    from torch import nn

OPS = ("scale", "offset")
SIDES = ("output", "input")


def _op_side(entry: Entry) -> tuple[str, str]:
    p = entry.get("params", {})
    return p.get("op", "scale"), p.get("side", "output")


class Vector(RewritesWeight):
    name = "vector"
    required_roles = ("vector",)
    layout_sensitive = True

    def is_additive(self, entry: Entry, roles: Collection[str]) -> bool:
        return False

    def check(self, module: str, entry: Entry, shapes: dict[str, tuple[int, ...]]) -> None:
        op, side = _op_side(entry)
        if op not in OPS or side not in SIDES:
            raise fail(module, f"vector params op={op!r} side={side!r}; op must be one of {OPS}, side one of {SIDES}")
        fshape = function_shape(entry)
        if op == "offset" and side == "input" and len(fshape) != 2:
            raise fail(module, f"an input-side offset is defined for linear maps (2-D weights), shape is {list(fshape)}")
        n = fshape[0] if side == "output" else (fshape[1] if len(fshape) > 1 else None)
        if n == 0:
            raise fail(module, f"shape {list(entry['shape'])} leaves the {side} dimension the vector spans unknown")
        got = shapes["vector"]
        if n is None or len(got) != 1 or got[0] != n:
            raise fail(module, f"vector has shape {list(got)}, expected [{n}] ({side} side of {list(fshape)})")

    def forward(self, module: nn.Module, entry: Entry, t: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import torch

        op, side = _op_side(entry)
        v = t["vector"].to(y.dtype)
        if side == "output":
            v = channel_view(v, y, module)
            return y * v if op == "scale" else y + v
        w = self._weight(module, entry)
        if op == "scale":
            return y + weight_function(module, x * (channel_view(v, x, module) - 1), w.to(x.dtype))
        ones = torch.ones_like(x[..., :1]) if x.dim() > 1 else x.new_ones(1)
        return y + weight_function(module, ones * v, w.to(x.dtype))

    def merge(self, module: nn.Module, entry: Entry, t: Tensors) -> Any:
        import torch

        op, side = _op_side(entry)
        w = self._weight(module, entry)
        bias = getattr(module, "bias", None)
        saved = self.original(module, entry)
        v = t["vector"].float()
        with torch.no_grad():
            if op == "scale" and side == "output":
                w.copy_((w.float() * v.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
                if bias is not None:
                    bias.copy_((bias.float() * v).to(bias.dtype))
            elif op == "scale":
                w.copy_((w.float() * v.reshape(1, -1, *([1] * (w.dim() - 2)))).to(w.dtype))
            else:
                if bias is None:
                    raise UnsupportedError(f"cannot merge an offset into {type(module).__name__} without a bias")
                add = v if side == "output" else w.float().reshape(w.shape[0], -1) @ v
                bias.add_(add.to(bias.dtype))
        return saved
