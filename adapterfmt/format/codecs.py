"""Compression codecs: one logical tensor of a module stored as several parts.

A module entry's ``encoding`` maps a role to a codec spec, ``{"codec": name, ...}``; the role is then
stored as tensors ``<module>.<role>.<part>`` instead of ``<module>.<role>``. Codecs come from plugins
through the ``adapterfmt_codecs`` hook (objects following :class:`adapterfmt.TensorCodec`); the built-in
ones below are registered by ``adapterfmt.plugins.codecs`` exactly as a third party would register its own.

Built-in layouts (every spec also records ``shape`` and ``dtype``, the logical tensor's safetensors dtype):

- ``int8``: part ``q`` int8 of the tensor's shape and part ``scale`` float32 ``[C]``, ``C = shape[0]`` for
  tensors of 2+ dims (one scale per output channel / row) and 1 otherwise; ``x = q * scale[row]``.
  ``scale = max|row| / 127``, ``q = round(x / scale)``.
- ``int4``: part ``q`` uint8 ``[ceil(n / 2)]``: 4-bit codes ``c`` in 1..15 of the flat row-major tensor, two
  per byte, low nibble first (:mod:`adapterfmt.format.bitpack`); part ``scale`` float16 ``[ceil(n / group_size)]``
  (spec ``group_size``, default 64); ``x[i] = (c[i] - 8) * scale[i // group_size]``, ``scale = max|group| / 7``.
- ``nf4`` / ``fp4``: part ``q`` uint8 ``[ceil(n / 2)]``: 4-bit indices ``c`` into the code book
  (:data:`NF4_CODE`, :data:`FP4_CODE`), a nibble string; part ``absmax`` float32 ``[ceil(n / block_size)]``
  (spec ``block_size``, default 64); ``x[i] = code[c[i]] * absmax[i // block_size]``. ``absmax = max|block|``,
  ``c`` the nearest code to ``clamp(x * (1/absmax), -1, 1)`` (the lower index on a tie), as bitsandbytes does.
- ``ternary``: the ComPEFT sign pattern of :mod:`adapterfmt.deltas.ternary` (parts ``mask`` or ``gaps``,
  ``signs``, ``scales``; spec ``layout``, ``count``, optional ``group_size``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..errors import FormatError
from . import bitpack
from .limits import check_dense
from .safetensors_io import DTYPES, dtype_name
from .ternary import ternary_decode, ternary_encode, ternary_roles, top_k_mask

if TYPE_CHECKING:
    from ..plugin.protocols import TensorCodec
    from .adapter import Adapter


def get_codec(name: object, *, path: object = None) -> TensorCodec:
    """The installed codec called ``name``."""
    from ..plugin.registry import codecs

    found = codecs().get(name) if isinstance(name, str) else None
    if found is None:
        known = ", ".join(sorted(codecs())) or "none"
        raise FormatError(f"unknown compression codec {name!r}: no installed plugin provides it "
                          f"(installed: {known})", path=path)
    return found


def stored_parts(spec: dict[str, Any]) -> tuple[str, ...]:
    """Part names stored for a role encoded with ``spec`` (tensors ``<module>.<role>.<part>``)."""
    return tuple(get_codec(spec.get("codec")).parts(spec))


def encode(name: str, tensor: torch.Tensor, **options: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Encode ``tensor`` with codec ``name``; returns its parts and the spec (with ``codec``) to record."""
    parts, spec = get_codec(name).encode(tensor, **options)
    return parts, {"codec": name, **spec}


def decode(adapter: Adapter, module: str, role: str, spec: dict[str, Any]) -> torch.Tensor:
    """The logical tensor of ``module``'s ``role``, decoded from its stored parts."""
    codec = get_codec(spec.get("codec"), path=adapter.source)
    parts = {}
    for part in codec.parts(spec):
        name = f"{module}.{role}.{part}"
        if name not in adapter.tensor_names():
            raise FormatError(f"module {module!r}: tensor {name} ({spec['codec']} part) is missing", path=adapter.source)
        parts[part] = adapter.tensor(name)
    try:
        return codec.decode(parts, spec)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        msg, err = (e.message, type(e)) if isinstance(e, FormatError) else (str(e), FormatError)
        raise err(f"module {module!r}: {role} ({spec['codec']}): {msg}", path=adapter.source) from None


# ----- built-in codecs -----------------------------------------------------------------------------------
def _logical(spec: dict[str, Any]) -> tuple[tuple[int, ...], torch.dtype]:
    """The spec's logical shape and dtype, refused past the dense limit before anything is decoded."""
    shape, dtype = spec.get("shape"), spec.get("dtype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise FormatError(f"spec shape must be a list of sizes, got {str(shape)[:60]}")
    if not isinstance(dtype, str) or dtype not in DTYPES or not DTYPES[dtype].is_floating_point:
        raise FormatError(f"spec dtype must be a float safetensors dtype, got {str(dtype)[:40]!r}")
    check_dense(shape, "decoded tensor")
    return tuple(shape), DTYPES[dtype]


def _finite(t: torch.Tensor, part: str) -> torch.Tensor:
    if not bool(torch.isfinite(t).all()):
        raise FormatError(f"part {part!r} holds a non-finite scale")
    return t


def _expect(parts: dict[str, torch.Tensor], part: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    t = parts[part]
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise FormatError(f"part {part!r} must be {dtype_name(dtype)} {list(shape)}, got {dtype_name(t.dtype)} "
                         f"{list(t.shape)}")
    return t


def _head(t: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "dtype": dtype_name(t.dtype)}


class Int8Codec:
    """Symmetric int8 with one float32 scale per output channel (row)."""

    name = "int8"

    def encode(self, tensor: torch.Tensor, **options: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        x = tensor.detach().float().cpu()
        rows = x.reshape(x.shape[0] if x.dim() >= 2 else 1, -1)
        scale = rows.abs().amax(1) / 127 if rows.numel() else torch.zeros(rows.shape[0])
        inv = torch.where(scale > 0, 1 / scale, torch.zeros(()))
        q = (rows * inv[:, None]).round().clamp(-127, 127).to(torch.int8)
        return {"q": q.reshape(x.shape).contiguous(), "scale": scale.contiguous()}, _head(tensor)

    def decode(self, parts: dict[str, torch.Tensor], spec: dict[str, Any]) -> torch.Tensor:
        shape, dtype = _logical(spec)
        channels = shape[0] if len(shape) >= 2 else 1
        q = _expect(parts, "q", torch.int8, shape)
        scale = _finite(_expect(parts, "scale", torch.float32, (channels,)), "scale")
        return (q.reshape(channels, -1).float() * scale[:, None]).reshape(shape).to(dtype)

    def parts(self, spec: dict[str, Any]) -> tuple[str, ...]:
        return ("q", "scale")


class Int4Codec:
    """Symmetric 4-bit codes with one float16 scale per group of ``group_size`` flat elements."""

    name = "int4"
    default_group_size = 64

    def encode(self, tensor: torch.Tensor, *, group_size: int | None = None,
               **options: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        g = int(group_size or self.default_group_size)
        flat = tensor.detach().float().cpu().reshape(-1)
        n = flat.numel()
        padded = torch.cat([flat, flat.new_zeros((-n) % g)]).reshape(-1, g)
        scale = (padded.abs().amax(1) / 7).clamp(max=65504).to(torch.float16)
        s = scale.float()
        inv = torch.where(s > 0, 1 / s, torch.zeros(()))
        codes = ((padded * inv[:, None]).round().clamp(-7, 7) + 8).reshape(-1)[:n]
        return {"q": bitpack.pack_nibbles(codes), "scale": scale.contiguous()}, {**_head(tensor), "group_size": g}

    def decode(self, parts: dict[str, torch.Tensor], spec: dict[str, Any]) -> torch.Tensor:
        shape, dtype = _logical(spec)
        g = spec.get("group_size")
        if not isinstance(g, int) or isinstance(g, bool) or g < 1:
            raise FormatError(f"int4 group_size must be a positive integer, got {g!r}")
        n = math.prod(shape)
        q = _expect(parts, "q", torch.uint8, ((n + 1) // 2,))
        scale = _finite(_expect(parts, "scale", torch.float16, (-(-n // g),)), "scale")
        codes = bitpack.unpack_nibbles(q, n, what="int4 codes").float() - 8
        return (codes * scale.float().repeat_interleave(min(g, max(n, 1)))[:n]).reshape(shape).to(dtype)

    def parts(self, spec: dict[str, Any]) -> tuple[str, ...]:
        return ("q", "scale")


NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
"""QLoRA's NormalFloat4 code book, as bitsandbytes defines it (``get_4bit_type("nf4")``); float32 values."""
FP4_CODE = tuple(v / 12 for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                                  -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0))
"""bitsandbytes' FP4 (sign, 2 exponent bits, 1 mantissa bit) code book, normalised by its largest magnitude
(``get_4bit_type("fp4")``), taken as float32."""


class CodeBook4Codec:
    """4-bit indices into a fixed code book, with one float32 absmax per block of ``block_size`` flat elements
    (bitsandbytes' blockwise 4-bit quantisation): ``x[i] = code[c[i]] * absmax[i // block_size]``."""

    name = ""
    code: tuple[float, ...] = ()
    default_block_size = 64

    def encode(self, tensor: torch.Tensor, *, block_size: int | None = None,
               **options: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        g = int(block_size or self.default_block_size)
        flat = tensor.detach().float().cpu().reshape(-1)
        n = flat.numel()
        blocks = torch.cat([flat, flat.new_zeros((-n) % g)]).reshape(-1, g)
        absmax = blocks.abs().amax(1)
        inv = torch.where(absmax > 0, 1 / torch.where(absmax > 0, absmax, 1), torch.zeros(()))
        scaled = (blocks * inv[:, None]).clamp(-1, 1).reshape(-1)[:n]
        codes = (scaled[:, None] - torch.tensor(self.code)).abs().argmin(1)  # the first code on a tie
        return {"q": bitpack.pack_nibbles(codes), "absmax": absmax.contiguous()}, {**_head(tensor), "block_size": g}

    def decode(self, parts: dict[str, torch.Tensor], spec: dict[str, Any]) -> torch.Tensor:
        shape, dtype = _logical(spec)
        g = spec.get("block_size")
        if not isinstance(g, int) or isinstance(g, bool) or g < 1:
            raise FormatError(f"{self.name} block_size must be a positive integer, got {g!r}")
        n = math.prod(shape)
        q = _expect(parts, "q", torch.uint8, ((n + 1) // 2,))
        absmax = _finite(_expect(parts, "absmax", torch.float32, (-(-n // g),)), "absmax")
        values = torch.tensor(self.code)[bitpack.unpack_nibbles(q, n, what=f"{self.name} codes").long()]
        return (values * absmax.repeat_interleave(min(g, max(n, 1)))[:n]).reshape(shape).to(dtype)

    def parts(self, spec: dict[str, Any]) -> tuple[str, ...]:
        return ("q", "absmax")


class NF4Codec(CodeBook4Codec):
    """QLoRA's NormalFloat4 (:data:`NF4_CODE`), block-wise absmax."""

    name = "nf4"
    code = NF4_CODE


class FP4Codec(CodeBook4Codec):
    """bitsandbytes' FP4 (:data:`FP4_CODE`), block-wise absmax."""

    name = "fp4"
    code = FP4_CODE


class TernaryCodec:
    """ComPEFT: keep the top-k magnitudes' signs, one scale per tensor or group (see the ternary kind)."""

    name = "ternary"

    def encode(self, tensor: torch.Tensor, *, density: float | None = None, keep: torch.Tensor | None = None,
               scale: str | float = "mean", factor: float = 1.0, group_size: int | None = None,
               **options: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Keep ``keep`` (flat bool) if given, else the top ``ceil(density * n)`` magnitudes."""
        if keep is None:
            if density is None:
                raise ValueError("ternary encoding needs density= or keep=")
            keep = top_k_mask(tensor, math.ceil(density * tensor.numel()))
        parts, params = ternary_encode(tensor, keep, scale=scale, factor=factor, group_size=group_size)
        return parts, {**_head(tensor), **params}

    def decode(self, parts: dict[str, torch.Tensor], spec: dict[str, Any]) -> torch.Tensor:
        shape, dtype = _logical(spec)
        return ternary_decode(parts, spec, shape).to(dtype)

    def parts(self, spec: dict[str, Any]) -> tuple[str, ...]:
        return ternary_roles(spec)


BUILTIN_CODECS: tuple[TensorCodec, ...] = (Int8Codec(), Int4Codec(), NF4Codec(), FP4Codec(), TernaryCodec())
