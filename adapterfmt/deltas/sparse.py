"""``sparse``: dW given as sorted flat row-major ``indices`` (int64) and ``values``, times ``scale``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .base import DeltaKind, Entry, Tensors, fail
from .modules import is_transposed, weight_function

if TYPE_CHECKING:
    import torch
    from torch import nn


class Sparse(DeltaKind):
    name = "sparse"
    required_roles = ("indices", "values")

    def check(self, module: str, entry: Entry, shapes: dict[str, tuple[int, ...]]) -> None:
        i, v = shapes["indices"], shapes["values"]
        if len(i) != 1 or len(v) != 1 or i[0] != v[0]:
            raise fail(module, f"indices {list(i)} and values {list(v)} must be 1-D of the same length")
        if i[0] > math.prod(entry["shape"]):
            raise fail(module, f"{i[0]} stored values for a parameter of {math.prod(entry['shape'])} elements")

    def check_data(self, module: str, entry: Entry, t: Tensors) -> None:
        import torch

        idx = t["indices"]
        if idx.dtype != torch.int64:
            raise fail(module, f"indices must be int64, got {idx.dtype}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= math.prod(entry["shape"])):
            raise fail(module, "indices out of range for the parameter's shape")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise fail(module, "indices must be strictly increasing")

    def param_count(self, entry: Entry, shapes: dict[str, tuple[int, ...]]) -> int:
        return shapes["values"][0]

    def delta(self, entry: Entry, t: Tensors) -> torch.Tensor:
        import torch

        shape = tuple(entry["shape"])
        flat = torch.zeros(math.prod(shape), dtype=torch.float32, device=t["values"].device)
        flat[t["indices"]] = t["values"].float()
        return (float(entry.get("params", {}).get("scale", 1.0)) * flat).reshape(shape)

    def bind(self, module: nn.Module, entry: Entry, t: Tensors) -> Tensors:
        """On a Linear layer, keep the CSR form (scale folded in) that the sparse apply kernel reads."""
        from torch import nn

        if not isinstance(module, nn.Linear):
            return t
        from ..kernels import to_csr

        scale = float(entry.get("params", {}).get("scale", 1.0))
        return {**t, "csr": to_csr(t["indices"], scale * t["values"], tuple(entry["shape"]))}

    def forward(self, module: nn.Module, entry: Entry, t: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if "csr" in t:
            from ..kernels import sparse_apply

            csr = t["csr"]
            return sparse_apply(x, y, t["indices"], csr.values, csr.shape, csr=csr._replace(values=csr.values.to(y.dtype)))
        d = self.delta(entry, t).to(y.dtype)
        return y + weight_function(module, x, d.t() if is_transposed(module) else d)

    def merge(self, module: nn.Module, entry: Entry, t: Tensors) -> None:
        import torch

        param = getattr(module, entry.get("parameter", "weight"))
        if not param.is_contiguous():
            return super().merge(module, entry, t)
        from ..kernels import sparse_merge_

        with torch.no_grad():
            sparse_merge_(param.data, t["indices"], t["values"], float(entry.get("params", {}).get("scale", 1.0)))
        return None
