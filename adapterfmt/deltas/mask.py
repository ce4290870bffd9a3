"""``mask``: structured pruning of a linear map: groups of its input or output channels removed (spec 6.13).

Removing attention heads is a mask on the attention output projection's input (one group of ``head_dim``
channels per head); removing FFN channels is a mask on the down projection's input (groups of 1). The
module computes what the pruned (smaller) module would; merged, the removed weights are zeroed.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from .base import Entry, RewritesWeight, Tensors, fail
from .lowrank import function_shape
from .modules import weight_function

if TYPE_CHECKING:
    import torch
    from torch import nn

SIDES = ("input", "output")


def _side_group(entry: Entry) -> tuple[str, int]:
    p = entry.get("params", {})
    return p.get("side", "input"), p.get("group", 1)


def channel_mask(entry: Entry, keep: torch.Tensor) -> torch.Tensor:
    """The per-channel 0/1 float32 vector of an entry: channel ``c`` is kept iff ``keep[c // group]`` is 1."""
    _, group = _side_group(entry)
    return keep.float().repeat_interleave(group)


class Mask(RewritesWeight):
    name = "mask"
    required_roles = ("keep",)
    layout_sensitive = True

    def is_additive(self, entry: Entry, roles: Collection[str]) -> bool:
        return False

    def check(self, module: str, entry: Entry, shapes: dict[str, tuple[int, ...]]) -> None:
        side, group = _side_group(entry)
        if side not in SIDES or not isinstance(group, int) or isinstance(group, bool) or group < 1:
            raise fail(module, f"mask params side={side!r} group={group!r}; side must be one of {SIDES}, group a "
                               "positive integer")
        fshape = function_shape(entry)
        if len(fshape) != 2:
            raise fail(module, f"a mask is defined for linear maps (2-D weights), shape is {list(entry['shape'])}")
        n = fshape[1] if side == "input" else fshape[0]
        got = shapes["keep"]
        if n % group or len(got) != 1 or got[0] != n // group:
            raise fail(module, f"keep has shape {list(got)}, expected [{n} / group {group}] ({side} side of "
                               f"{list(fshape)})")

    def check_data(self, module: str, entry: Entry, t: Tensors) -> None:
        import torch

        keep = t["keep"]
        if keep.dtype != torch.uint8:
            raise fail(module, f"keep must be uint8, got {keep.dtype}")
        if bool((keep > 1).any()):
            raise fail(module, "keep values must be 0 or 1")

    def param_count(self, entry: Entry, shapes: dict[str, tuple[int, ...]]) -> int:
        return 0

    def forward(self, module: nn.Module, entry: Entry, t: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        side, _ = _side_group(entry)
        m = channel_mask(entry, t["keep"]).to(device=y.device, dtype=y.dtype)
        if side == "output":
            return y * m
        return y - weight_function(module, x * (1 - m.to(x.dtype)), self._weight(module, entry).to(x.dtype))

    def merge(self, module: nn.Module, entry: Entry, t: Tensors) -> Any:
        import torch

        side, _ = _side_group(entry)
        w, bias = self._weight(module, entry), getattr(module, "bias", None)
        saved = self.original(module, entry)
        m = channel_mask(entry, t["keep"]).to(w.device)
        with torch.no_grad():
            if side == "input":
                w.mul_(m[None, :].to(w.dtype))
            else:
                w.mul_(m[:, None].to(w.dtype))
                if bias is not None:
                    bias.mul_(m.to(bias.dtype))
        return saved
