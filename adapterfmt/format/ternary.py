"""The ``ternary`` encoding (spec 6.5, 6.9): a sparse sign pattern times one scale per tensor or per group (ComPEFT), bit-packed.

For a target of ``n`` elements (flat, row-major in the entry's stored ``shape``) of which ``k`` are kept:

- layout ``bitmap``: role ``mask`` = ``n`` bits, one per element (1 = kept);
- layout ``gaps``: role ``gaps`` = the kept flat indices as varint zero-based gaps (``k`` varints);
- role ``signs``: ``k`` bits, one per kept element in increasing index order (1 = negative);
- role ``scales``: float32 ``[G]``, ``G = 1`` (per tensor) or ``ceil(n / params.group_size)``; element ``i``
  uses ``scales[i // group_size]``.

``dW[i] = params.scale * (-1 if sign else +1) * scales[group(i)]`` for kept ``i``, 0 elsewhere. Bit and
varint layouts are those of :mod:`adapterfmt.format.bitpack`. ``params``: ``layout``, ``count`` (= k),
optional ``group_size`` and ``scale`` (default 1). The same encoding of any tensor is the ``ternary``
compression codec (:mod:`adapterfmt.format.codecs`), whose parts carry these role names; the ``ternary``
delta kind (:mod:`adapterfmt.deltas.ternary`) applies it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch

from ..errors import FormatError
from . import bitpack
from .limits import check_dense

Tensors = Mapping[str, torch.Tensor]

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


def group_count(n: int, group_size: object, what: str = "ternary") -> int:
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
    ngroups, group = group_count(n, group_size), torch.arange(n) // _group_size(n, group_size)
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


def layout_of(params: Mapping[str, Any]) -> str | None:
    """``params.layout`` when it is one of the layouts, else None."""
    layout = params.get("layout")
    return layout if isinstance(layout, str) and layout in LAYOUT_PART else None


def ternary_roles(params: Mapping[str, Any]) -> tuple[str, ...]:
    """Stored parts of a ternary encoding with these params."""
    return (LAYOUT_PART[layout_of(params) or "bitmap"], "signs", "scales")


def ternary_kept(parts: Tensors, params: Mapping[str, Any], numel: int, *,
                 what: str = "ternary") -> tuple[torch.Tensor, torch.Tensor]:
    """The kept flat indices (int64, increasing) and their signs (bool, True = negative), checking every part
    against the params; memory grows with the stored parts, never with ``numel``."""
    layout, k = layout_of(params), params.get("count")
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
    if s.numel() != group_count(numel, g, what):
        raise FormatError(f"{what}: scales has {s.numel()} values, expected {group_count(numel, g, what)}")
    return s.repeat_interleave(g)[:numel] if g < numel else s.expand(numel)


def ternary_decode(parts: Tensors, params: Mapping[str, Any], shape: tuple[int, ...] | list[int], *,
                   what: str = "ternary") -> torch.Tensor:
    """The dense fp32 tensor a ternary encoding stands for (without ``params.scale``); refuses a shape past
    the dense limit before allocating (:func:`adapterfmt.format.limits.check_dense`)."""
    check_dense(shape, what)
    n = math.prod(shape)
    signs = ternary_signs(parts, params, n, what=what).to(parts["scales"].device)
    return (signs.float() * ternary_scales(parts, params, n, what=what)).reshape(tuple(shape))
