"""The reference round-to-nearest (RTN) weight quantiser of spec 6.12 and the base quantisation record.

A weight is seen in function layout as ``[out, n]`` (trailing dimensions flattened) and split along ``n``
into groups of ``group_size`` consecutive elements (``None``: one group per row, "per channel"). Each group
gets a float32 scale ``s`` (and, asymmetric, an offset ``m``); every computation is float32:

- ``symmetric``, ``Q = 2^(bits-1) - 1``: ``s = max|w| / Q``; ``q = clamp(round(w * (1/s)), -Q, Q)`` with
  ``round`` half away from zero; ``w^ = q * s``. (bits 8, group 32: llama.cpp's Q8_0 codes.)
- ``asymmetric``, ``L = 2^bits - 1``: ``s = (max w - min w) / L``, ``m = min w``;
  ``q = clamp(floor((w - m) * (1/s) + 1/2), 0, L)``; ``w^ = q * s + m``. (bits 4 / 5, group 32: Q4_1 / Q5_1.)
  In PEQA's notation ``w^ = s (q - z)`` with ``z = -m / s``.
- ``integer`` (GPTQ's asymmetric grid, an integer zero point), ``L = 2^bits - 1``: ``lo = min(min w, 0)``,
  ``hi = max(max w, 0)`` (``-1`` and ``1`` when both are 0); ``s = (hi - lo) / L``, ``z = round(-lo / s)``;
  ``q = clamp(round(w / s) + z, 0, L)``; ``w^ = s (q - z)``, ``round`` with ties to even and a true division,
  as GPTQ's quantiser (and torchao's integer zero-point domain) computes them. ``offset`` holds ``z``.

``1/s`` is 0 where ``s`` is 0 (a constant group decodes to its value exactly).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import FormatError

ZERO_POINTS = ("symmetric", "asymmetric", "integer")
BITS = range(2, 9)
GRID_TOLERANCE = 1e-2
"""A weight lies on a grid when re-quantising it moves no element by more than this fraction of its group's
step (plus the rounding of the weight's own dtype): an unquantised weight moves by up to half a step."""


@dataclass(frozen=True)
class QuantSpec:
    """The quantisation of a weight grid: ``bits`` (2-8), ``group_size`` (None: per channel), ``zero_point``."""

    bits: int
    group_size: int | None = None
    zero_point: str = "symmetric"
    ZERO_POINTS: ClassVar[tuple[str, ...]] = ZERO_POINTS

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or self.bits not in BITS:
            raise FormatError(f"quantization bits must be an integer 2-8, got {self.bits!r}")
        g = self.group_size
        if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 1):
            raise FormatError(f"quantization group_size must be a positive integer or null, got {g!r}")
        if self.zero_point not in ZERO_POINTS:
            raise FormatError(f"quantization zero_point must be one of {', '.join(ZERO_POINTS)}, "
                              f"got {str(self.zero_point)[:40]!r}")

    def to_json(self) -> dict[str, Any]:
        """The record of spec 6.12 (``base.quantization``, a ``qscale`` entry's ``params.quant``)."""
        return {"method": "rtn", "bits": self.bits, "group_size": self.group_size, "zero_point": self.zero_point}

    @classmethod
    def from_json(cls, obj: object, *, path: object = None, what: str = "quantization") -> QuantSpec:
        """Read a record, refusing unknown keys and methods other than ``rtn`` (naming ``what``)."""
        if not isinstance(obj, Mapping):
            raise FormatError(f"{what} must be an object", path=path)
        extra = sorted(set(obj) - {"method", "bits", "group_size", "zero_point"})
        if extra or obj.get("method") != "rtn" or "bits" not in obj:
            why = f"unknown key {extra[0]!r}" if extra else "method must be 'rtn' and bits given"
            raise FormatError(f"{what}: {why}", path=path)
        try:
            return cls(obj["bits"], obj.get("group_size"), obj.get("zero_point", "symmetric"))
        except FormatError as e:
            raise FormatError(f"{what}: {e.message}", path=path) from None

    @property
    def symmetric(self) -> bool:
        return self.zero_point == "symmetric"

    @property
    def integer_zero(self) -> bool:
        """GPTQ's convention: ``offset`` is the integer zero point ``z`` (``w^ = s (q - z)``), not the minimum."""
        return self.zero_point == "integer"

    @property
    def levels(self) -> tuple[int, int]:
        """The smallest and largest code."""
        q = 2 ** (self.bits - 1) - 1
        return (-q, q) if self.symmetric else (0, 2 ** self.bits - 1)

    def groups(self, shape: tuple[int, ...] | torch.Size) -> tuple[int, int, int]:
        """``(out, groups, group_size)`` of a weight of function shape ``shape``; refuses a misfit."""
        if len(shape) < 2:
            raise FormatError(f"only weights of 2+ dimensions are quantised, got shape {list(shape)}")
        out, n = int(shape[0]), math.prod(shape[1:])
        g = self.group_size or n
        if n % g:
            raise FormatError(f"quantization group_size {g} does not divide the {n} inputs of a weight "
                              f"{list(shape)}")
        return out, n // g, g


@dataclass
class Quantized:
    """A quantised weight: integer ``codes`` ``[out, n]``, float32 ``scale`` and ``offset`` ``[out, groups]``
    (``offset`` None when symmetric; the minimum ``m``, or with ``integer`` the zero point ``z``), and the
    function ``shape`` it came from."""

    spec: QuantSpec
    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    shape: tuple[int, ...]


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero, exactly (``floor(|x| + 0.5)`` misrounds 0.49999997)."""
    a = x.abs()
    f = a.floor()
    return torch.sign(x) * (f + (2 * (a - f)).floor())


def _inverse(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s == 0, torch.zeros((), dtype=s.dtype), 1 / torch.where(s == 0, 1, s))


def quantize(w: torch.Tensor, spec: QuantSpec) -> Quantized:
    """RTN-quantise a weight in function layout (see the module docstring); differentiable in nothing."""
    out, groups, g = spec.groups(w.shape)
    x = w.detach().to(torch.float32).reshape(out, groups, g)
    lo, hi = spec.levels
    if spec.symmetric:
        scale = x.abs().amax(-1) / hi
        codes = round_half_away(x * _inverse(scale)[..., None]).clamp(lo, hi)
        offset = None
    elif spec.integer_zero:
        low, high = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
        empty = (low == 0) & (high == 0)
        low, high = torch.where(empty, -1.0, low), torch.where(empty, 1.0, high)
        scale = (high - low) / hi
        offset = torch.round(-low / scale)
        codes = (torch.round(x / scale[..., None]) + offset[..., None]).clamp(lo, hi)
    else:
        offset = x.amin(-1)
        scale = (x.amax(-1) - offset) / hi
        codes = ((x - offset[..., None]) * _inverse(scale)[..., None] + 0.5).floor().clamp(lo, hi)
    dtype = torch.int8 if spec.symmetric else torch.uint8
    return Quantized(spec, codes.reshape(out, -1).to(dtype), scale, offset, tuple(w.shape))


def dequantize(q: Quantized, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``w^`` in float32 and the original shape; ``scale`` replaces the stored scales (PEQA: the offset then
    scales with it, ``w^ = s' (q - z)`` with ``z`` fixed)."""
    out, groups, g = q.spec.groups(q.shape)
    s = q.scale if scale is None else scale
    if q.spec.integer_zero:
        return ((q.codes.reshape(out, groups, g).to(s.dtype) - q.offset[..., None]) * s[..., None]).reshape(q.shape)
    w = q.codes.reshape(out, groups, g).to(s.dtype) * s[..., None]
    if q.offset is not None:
        ratio = s / torch.where(q.scale == 0, 1, q.scale) if scale is not None else 1
        w = w + (q.offset * ratio)[..., None]
    return w.reshape(q.shape)


def requantize(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, offset: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Round ``x`` (function layout) onto the grid of the given per-group ``scale`` (and, asymmetric,
    ``offset``) by the rules of ``spec``: returns the codes (float, ``[out, n]``, no gradient) and the values
    ``s * q (+ m)`` (``integer``: ``s (q - z)``) in ``x``'s shape. The rounding is straight-through (its gradient
    is the identity, as in LSQ / L4Q training); clamping passes none outside the range; the values are exact
    either way."""
    out, groups, g = spec.groups(x.shape)
    lo, hi = spec.levels
    v = x.float().reshape(out, groups, g)
    if spec.integer_zero:
        u = v / scale[..., None]
        q = (u + (torch.round(u) - u).detach() + offset[..., None]).clamp(lo, hi)
        return q.detach().reshape(out, -1), ((q - offset[..., None]) * scale[..., None]).reshape(x.shape)
    if offset is not None:
        v = v - offset[..., None]
    u = v * _inverse(scale)[..., None]
    r = round_half_away(u) if spec.symmetric else (u + 0.5).floor()
    q = (u + (r - u).detach()).clamp(lo, hi)
    w = q * scale[..., None] + (0 if offset is None else offset[..., None])
    return q.detach().reshape(out, -1), w.reshape(x.shape)


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``dequantize(quantize(w))`` in ``w``'s dtype: the weight a dequantised base holds."""
    return dequantize(quantize(w, spec)).to(w.dtype)


def fits_grid(w: torch.Tensor, spec: QuantSpec) -> bool:
    """Whether ``w`` (function layout) already lies on ``spec``'s grid (see :data:`GRID_TOLERANCE`)."""
    q = quantize(w, spec)
    out, groups, g = spec.groups(w.shape)
    err = (dequantize(q) - w.float()).abs().reshape(out, groups, g).amax(-1)
    eps = torch.finfo(w.dtype).eps if w.is_floating_point() else 0.0
    big = w.float().abs().reshape(out, groups, g).amax(-1)
    return bool((err <= GRID_TOLERANCE * q.scale + 2 * eps * big).all())


__all__ = ["QuantSpec", "Quantized", "dequantize", "fake_quantize", "fits_grid", "quantize", "round_half_away"]
