"""``dense``: a full tensor added to (mode ``add``) or replacing (mode ``replace``) a parameter."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from .base import DeltaKind, Entry, Tensors, fail

if TYPE_CHECKING:
    import torch
    from torch import nn


def _mode(entry: Entry) -> str:
    return entry.get("params", {}).get("mode", "add")


class Dense(DeltaKind):
    name = "dense"

    def roles(self, entry: Entry) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return (("value",), ("bias_value",)) if _mode(entry) == "replace" else (("delta",), ("bias_delta",))

    def is_additive(self, entry: Entry, roles: Collection[str]) -> bool:
        return _mode(entry) == "add"

    def check(self, module: str, entry: Entry, shapes: dict[str, tuple[int, ...]]) -> None:
        if _mode(entry) not in ("add", "replace"):
            raise fail(module, f"dense params.mode must be 'add' or 'replace', got {_mode(entry)!r}")
        main = "value" if _mode(entry) == "replace" else "delta"
        if list(shapes[main]) != list(entry["shape"]):
            raise fail(module, f"{main} has shape {list(shapes[main])}, expected {list(entry['shape'])}")
        for role in ("bias_value", "bias_delta"):
            if role in shapes and len(shapes[role]) != 1:
                raise fail(module, f"{role} must be 1-D, has shape {list(shapes[role])}")

    def delta(self, entry: Entry, t: Tensors) -> torch.Tensor:
        if _mode(entry) != "add":
            return super().delta(entry, t)
        return float(entry.get("params", {}).get("scale", 1.0)) * t["delta"].float()

    def forward(self, module: nn.Module, entry: Entry, t: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call

        pname = entry.get("parameter", "weight")
        if _mode(entry) == "replace":
            swap = {pname: t["value"]}
            if "bias_value" in t:
                swap["bias"] = t["bias_value"]
            return functional_call(module, swap, (x,))
        base = getattr(module, pname)
        scale = float(entry.get("params", {}).get("scale", 1.0))
        swap = {pname: base + scale * t["delta"].to(base.dtype)}
        if "bias_delta" in t:
            swap["bias"] = module.bias + scale * t["bias_delta"].to(base.dtype)
        return functional_call(module, swap, (x,))

    def merge(self, module: nn.Module, entry: Entry, t: Tensors) -> Any:
        import torch

        pname = entry.get("parameter", "weight")
        param = getattr(module, pname)
        with torch.no_grad():
            if _mode(entry) == "replace":
                saved = {pname: param.detach().clone()}
                param.copy_(t["value"].to(param.dtype))
                if "bias_value" in t:
                    saved["bias"] = module.bias.detach().clone()
                    module.bias.copy_(t["bias_value"].to(module.bias.dtype))
                return saved
            param.add_(self.delta(entry, t).to(param.dtype))
            if "bias_delta" in t:
                scale = float(entry.get("params", {}).get("scale", 1.0))
                module.bias.add_((scale * t["bias_delta"].float()).to(module.bias.dtype))
        return None

    def unmerge(self, module: nn.Module, entry: Entry, t: Tensors, state: Any) -> None:
        import torch

        with torch.no_grad():
            if _mode(entry) == "replace":
                for name, value in state.items():
                    getattr(module, name).copy_(value)
                return
            param = getattr(module, entry.get("parameter", "weight"))
            param.sub_(self.delta(entry, t).to(param.dtype))
            if "bias_delta" in t:
                scale = float(entry.get("params", {}).get("scale", 1.0))
                module.bias.sub_((scale * t["bias_delta"].float()).to(module.bias.dtype))


__all__ = ["Dense"]
