"""``ternary``: a sparse sign pattern times one scale per tensor or per group (ComPEFT), bit-packed.

For a target of ``n`` elements (flat, row-major in the entry's stored ``shape``) of which ``k`` are kept:

- layout ``bitmap``: role ``mask`` = ``n`` bits, one per element (1 = kept);
- layout ``gaps``: role ``gaps`` = the kept flat indices as varint zero-based gaps (``k`` varints);
- role ``signs``: ``k`` bits, one per kept element in increasing index order (1 = negative);
- role ``scales``: float32 ``[G]``, ``G = 1`` (per tensor) or ``ceil(n / params.group_size)``; element ``i``
  uses ``scales[i // group_size]``.

``dW[i] = params.scale * (-1 if sign else +1) * scales[group(i)]`` for kept ``i``, 0 elsewhere. Bit and
varint layouts are those of :mod:`adapterfmt.bitpack`. ``params``: ``layout``, ``count`` (= k),
optional ``group_size`` and ``scale`` (default 1). The same encoding of any tensor is the ``ternary``
compression codec (:mod:`adapterfmt.codecs`), whose parts carry these role names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from .. import bitpack
from ..modules import is_transposed, weight_function
from ..errors import FormatError
from ..limits import check_dense
from .base import DeltaKind, Entry, Tensors, fail

Layout = Literal["bitmap", "gaps"]
ScaleRule = Literal["mean", "std"]
LAYOUT_PART = {"bitmap": "mask", "gaps": "gaps"}


def top_k_mask(t: torch.Tensor, k: int) -> torch.Tensor:
    """Flat bool mask of the ``k`` largest magnitudes of ``t`` (ties broken by position, deterministic)."""
    flat = t.reshape(-1).float().abs()
    k = max(0, min(k, flat.numel()))
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    if k:
        order = torch.sort(flat, descending=True, stable=True).indices
        mask[order[:k]] = True
    return mask


def _group_size(n: int, group_size: object, what: str = "ternary") -> int:
    """Elements per scale group: ``group_size``, or all ``n`` (at least 1) without one."""
    if group_size is None:
        return max(n, 1)
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise FormatError(f"{what}: group_size must be a positive integer, got {group_size!r}")
    return group_size


def _ngroups(n: int, group_size: object, what: str = "ternary") -> int:
    """Number of scale groups, counted without touching the elements."""
    return max(1, -(-n // _group_size(n, group_size, what)))


def ternary_encode(t: torch.Tensor, keep: torch.Tensor, *, scale: ScaleRule | float = "mean", factor: float = 1.0,
                   group_size: int | None = None, layout: Layout | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Encode the signs of ``t`` where ``keep`` (flat bool) is set, with one scale per tensor or group.

    ``scale="mean"``: a group's scale is the mean magnitude of its kept elements (STC); ``"std"``: ``factor``
    times the sample standard deviation (``torch.std``; 0 for a one-element group) of all the group's elements
    of ``t``, ComPEFT's rule; a number: that scale for every group (``factor`` unused). ``layout`` None picks
    the smaller of ``bitmap`` and ``gaps``. Returns the parts and the params (``layout``, ``count``,
    ``group_size`` when grouped).
    """
    flat = t.reshape(-1).float().cpu()
    keep = keep.reshape(-1).cpu()
    n = flat.numel()
    idx = keep.nonzero().flatten()
    ngroups, group = _ngroups(n, group_size), torch.arange(n) // _group_size(n, group_size)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        scales = torch.full((ngroups,), float(scale))
    elif scale == "mean":
        total = torch.zeros(ngroups).index_add_(0, group[idx], flat[idx].abs())
        count = torch.zeros(ngroups).index_add_(0, group[idx], torch.ones(idx.numel()))
        scales = torch.where(count > 0, total / count.clamp(min=1), torch.zeros(()))
    elif scale == "std":
        count = torch.zeros(ngroups).index_add_(0, group, torch.ones(n))
        mean = torch.zeros(ngroups).index_add_(0, group, flat) / count.clamp(min=1)
        var = torch.zeros(ngroups).index_add_(0, group, (flat - mean[group]) ** 2) / (count - 1).clamp(min=1)
        scales = factor * var.sqrt()
    else:
        raise ValueError(f"unknown ternary scale rule {scale!r} (use 'mean', 'std' or a number)")
    if layout is None:
        layout = "gaps" if bitpack.gaps_size(idx) < bitpack.packed_bits_size(n) else "bitmap"
    where = bitpack.pack_bits(keep) if layout == "bitmap" else bitpack.encode_gaps(idx)
    parts = {LAYOUT_PART[layout]: where, "signs": bitpack.pack_bits(flat[idx] < 0),
             "scales": scales.to(torch.float32).contiguous()}
    params: dict[str, Any] = {"layout": layout, "count": int(idx.numel())}
    if group_size:
        params["group_size"] = int(group_size)
    return parts, params


def _layout(params: Mapping[str, Any]) -> str | None:
    """``params.layout`` when it is one of the layouts, else None."""
    layout = params.get("layout")
    return layout if isinstance(layout, str) and layout in LAYOUT_PART else None


def ternary_roles(params: Mapping[str, Any]) -> tuple[str, ...]:
    """Stored parts of a ternary encoding with these params."""
    return (LAYOUT_PART[_layout(params) or "bitmap"], "signs", "scales")


def ternary_kept(parts: Tensors, params: Mapping[str, Any], numel: int, *,
                 what: str = "ternary") -> tuple[torch.Tensor, torch.Tensor]:
    """The kept flat indices (int64, increasing) and their signs (bool, True = negative), checking every part
    against the params; memory grows with the stored parts, never with ``numel``."""
    layout, k = _layout(params), params.get("count")
    if layout is None:
        raise FormatError(f"{what}: layout must be 'bitmap' or 'gaps', got {params.get('layout')!r}")
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= numel:
        raise FormatError(f"{what}: count must be an integer in 0..{numel}, got {k!r}")
    if layout == "bitmap":
        keep = bitpack.unpack_bits(parts["mask"], numel, what=f"{what} mask")
        if int(keep.sum()) != k:
            raise FormatError(f"{what}: mask has {int(keep.sum())} bits set, count says {k}")
        idx = keep.nonzero().flatten()
    else:
        idx = bitpack.decode_gaps(parts["gaps"], k, numel, what=f"{what} gaps")
    return idx, bitpack.unpack_bits(parts["signs"], k, what=f"{what} signs")


def ternary_signs(parts: Tensors, params: Mapping[str, Any], numel: int, *, what: str = "ternary") -> torch.Tensor:
    """The stored pattern as a flat int8 tensor of -1 / 0 / +1 (checks every part's size)."""
    idx, neg = ternary_kept(parts, params, numel, what=what)
    out = torch.zeros(numel, dtype=torch.int8)
    out[idx] = 1 - 2 * neg.to(torch.int8)
    return out


def ternary_scales(parts: Tensors, params: Mapping[str, Any], numel: int, *, what: str = "ternary") -> torch.Tensor:
    """The per-element scale (flat fp32) from the ``scales`` part."""
    g = _group_size(numel, params.get("group_size"), what)
    s = parts["scales"].reshape(-1).float()
    if s.numel() != _ngroups(numel, g, what):
        raise FormatError(f"{what}: scales has {s.numel()} values, expected {_ngroups(numel, g, what)}")
    return s.repeat_interleave(g)[:numel] if g < numel else s.expand(numel)


def ternary_decode(parts: Tensors, params: Mapping[str, Any], shape: tuple[int, ...] | list[int], *,
                   what: str = "ternary") -> torch.Tensor:
    """The dense fp32 tensor a ternary encoding stands for (without ``params.scale``); refuses a shape past
    the dense limit before allocating (:func:`adapterfmt.limits.check_dense`)."""
    check_dense(shape, what)
    n = math.prod(shape)
    signs = ternary_signs(parts, params, n, what=what).to(parts["scales"].device)
    return (signs.float() * ternary_scales(parts, params, n, what=what)).reshape(tuple(shape))


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
        return ternary_roles(entry.get("params", {})), ()

    def check(self, module: str, entry: Entry, shapes: Mapping[str, tuple[int, ...]]) -> None:
        p = entry.get("params", {})
        n = math.prod(entry["shape"])
        k = p.get("count")
        if _layout(p) is None:
            raise fail(module, f"ternary params.layout must be 'bitmap' or 'gaps', got {p.get('layout')!r}")
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= n:
            raise fail(module, f"ternary params.count must be an integer in 0..{n}, got {k!r}")
        g = p.get("group_size")
        if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 1):
            raise fail(module, f"ternary params.group_size must be a positive integer, got {g!r}")
        expect = {"signs": (bitpack.packed_bits_size(k),), "scales": (_ngroups(n, g),)}
        if p["layout"] == "bitmap":
            expect["mask"] = (bitpack.packed_bits_size(n),)
        for role, shape in expect.items():
            if tuple(shapes[role]) != shape:
                raise fail(module, f"ternary {role} has shape {list(shapes[role])}, expected {list(shape)}")
        if p["layout"] == "gaps" and not (len(shapes["gaps"]) == 1 and k <= shapes["gaps"][0] <= 9 * k):
            raise fail(module, f"ternary gaps has shape {list(shapes['gaps'])}, expected {k}..{9 * k} bytes")

    def check_data(self, module: str, entry: Entry, t: Tensors) -> None:
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
        if "delta" in t:  # the dense bound form (see bind)
            return t["delta"].float()
        return self._scale(entry) * ternary_decode(t, entry["params"], entry["shape"])

    def bind(self, module: nn.Module, entry: Entry, t: Tensors) -> dict[str, torch.Tensor]:
        """The form kept while attached. With the packed kernel (a Linear, per-tensor or per-row scales):
        the stored parts plus sign planes ``pos``/``neg`` and ``row_scales``; otherwise the dense dW."""
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


__all__ = ["Ternary", "ternary_encode", "ternary_decode", "ternary_kept", "ternary_signs", "ternary_roles", "top_k_mask"]
