"""The ``ternary`` delta kind: a sparse sign pattern times one scale per tensor or per group (ComPEFT),
bit-packed; the encoding itself is :mod:`adapterfmt.format.ternary`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .base import DeltaKind, Entry, Tensors, fail
from .modules import is_transposed, weight_function

if TYPE_CHECKING:
    import torch
    from torch import nn


def _kernels() -> Any:
    """The kernels package when it provides the packed ternary apply, else None (dense torch path)."""
    try:
        from .. import kernels
    except ImportError:
        return None
    return kernels if hasattr(kernels, "ternary_apply") and hasattr(kernels, "pack_ternary_planes") else None


class Ternary(DeltaKind):
    name = "ternary"

    def roles(self, entry: Entry) -> tuple[tuple[str, ...], tuple[str, ...]]:
        from ..format.ternary import ternary_roles

        return ternary_roles(entry.get("params", {})), ()

    def check(self, module: str, entry: Entry, shapes: Mapping[str, tuple[int, ...]]) -> None:
        from ..format import bitpack
        from ..format.ternary import group_count, layout_of

        p = entry.get("params", {})
        n = math.prod(entry["shape"])
        k = p.get("count")
        if layout_of(p) is None:
            raise fail(module, f"ternary params.layout must be 'bitmap' or 'gaps', got {p.get('layout')!r}")
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= n:
            raise fail(module, f"ternary params.count must be an integer in 0..{n}, got {k!r}")
        g = p.get("group_size")
        if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 1):
            raise fail(module, f"ternary params.group_size must be a positive integer, got {g!r}")
        expect = {"signs": (bitpack.packed_bits_size(k),), "scales": (group_count(n, g),)}
        if p["layout"] == "bitmap":
            expect["mask"] = (bitpack.packed_bits_size(n),)
        for role, shape in expect.items():
            if tuple(shapes[role]) != shape:
                raise fail(module, f"ternary {role} has shape {list(shapes[role])}, expected {list(shape)}")
        if p["layout"] == "gaps" and not (len(shapes["gaps"]) == 1 and k <= shapes["gaps"][0] <= 9 * k):
            raise fail(module, f"ternary gaps has shape {list(shapes['gaps'])}, expected {k}..{9 * k} bytes")

    def check_data(self, module: str, entry: Entry, t: Tensors) -> None:
        import torch

        from ..format.ternary import ternary_kept

        try:
            ternary_kept(t, entry["params"], math.prod(entry["shape"]), what=f"module {module!r}")
        except ValueError as e:
            raise fail(module, str(e).removeprefix(f"module {module!r}: ")) from None
        if t["scales"].dtype != torch.float32 or not bool(torch.isfinite(t["scales"]).all()):
            raise fail(module, "ternary scales must be finite float32")

    def param_count(self, entry: Entry, shapes: Mapping[str, tuple[int, ...]]) -> int:
        return int(entry.get("params", {}).get("count", 0))

    @staticmethod
    def _scale(entry: Entry) -> float:
        return float(entry.get("params", {}).get("scale", 1.0))

    def delta(self, entry: Entry, t: Tensors) -> torch.Tensor:
        from ..format.ternary import ternary_decode

        if "delta" in t:  # the dense bound form (see bind)
            return t["delta"].float()
        return self._scale(entry) * ternary_decode(t, entry["params"], entry["shape"])

    def bind(self, module: nn.Module, entry: Entry, t: Tensors) -> dict[str, torch.Tensor]:
        """The form kept while attached. With the packed kernel (a Linear, per-tensor or per-row scales):
        the stored parts plus sign planes ``pos``/``neg`` and ``row_scales``; otherwise the dense dW."""
        from torch import nn

        from ..format.ternary import ternary_scales, ternary_signs

        k = _kernels()
        shape = tuple(entry["shape"])
        g = entry["params"].get("group_size")
        if k is None or not isinstance(module, nn.Linear) or len(shape) != 2 or g not in (None, shape[1]):
            return {"delta": self.delta(entry, t).to(t["scales"].device)}
        n = math.prod(shape)
        signs = ternary_signs(t, entry["params"], n).reshape(shape).to(t["scales"].device)
        pos, neg = k.pack_ternary_planes(signs)
        row_scales = self._scale(entry) * ternary_scales(t, entry["params"], n).reshape(shape)[:, 0]
        return {**t, "pos": pos, "neg": neg, "row_scales": row_scales.contiguous()}

    def forward(self, module: nn.Module, entry: Entry, t: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if "pos" in t:
            from ..kernels import ternary_apply

            return ternary_apply(x, y, t["pos"], t["neg"], t["row_scales"].to(x.dtype), entry["shape"][1])
        d = self.delta(entry, t).to(y.dtype)  # y's dtype: x holds token ids for an Embedding
        return y + weight_function(module, x, d.t() if is_transposed(module) else d)


__all__ = ["Ternary"]
