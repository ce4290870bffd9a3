"""Reading and writing safetensors files safely and deterministically.

The header is parsed and checked here before any tensor is touched, so a truncated file, offsets past
the end or a header claiming petabytes give one clear :class:`FormatError` instead of a crash. Writing
is done by this module too (not by the safetensors library) so that output bytes depend only on the
tensors and metadata given: keys sorted, tensors laid out in name order, header padded to 8 bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import atomic_file
from .errors import FormatError, MissingFileError

MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
ITEMSIZE: dict[str, int] = {name: torch.empty((), dtype=dt).element_size() for name, dt in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """The parsed, checked header of a safetensors file."""

    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    data_start: int
    file_size: int


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.float32`` -> ``"F32"``)."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise FormatError(f"dtype {dtype} cannot be stored in safetensors") from None


def read_header(path: str | os.PathLike[str]) -> Header:
    """Parse and check the header of a safetensors file without reading tensor data."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("no such file", path=path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"truncated safetensors file ({size} bytes, no header length)", path=path)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise FormatError(f"header claims {n} bytes (limit {MAX_HEADER_BYTES}); file is corrupt", path=path)
        if 8 + n > size:
            raise FormatError(f"truncated safetensors file: header needs {8 + n} bytes, file has {size}", path=path)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise FormatError("safetensors header is not valid UTF-8", path=path) from None
    except json.JSONDecodeError as e:
        raise FormatError(f"safetensors header is not valid JSON ({e.msg} at byte {e.pos})", path=path) from None
    except RecursionError:
        raise FormatError("safetensors header is not valid JSON (nested too deeply)", path=path) from None
    if not isinstance(header, dict):
        raise FormatError("safetensors header is not a JSON object", path=path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise FormatError("safetensors __metadata__ must map strings to strings", path=path)
    data_start = 8 + n
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _check_entry(path, name, entry, data_start, data_len)
    _check_tiling(path, tensors, data_start, size)
    return Header(path, metadata, tensors, data_start, size)


def _check_tiling(path: Path, tensors: dict[str, TensorInfo], data_start: int, size: int) -> None:
    """Tensor data must cover the data region exactly: no overlap, no hole, nothing after the last tensor."""
    pos = data_start
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if t.start < pos:
            raise FormatError(f"tensor {t.name!r} overlaps the tensor before it", path=path)
        if t.start > pos:
            raise FormatError(f"{t.start - pos} bytes before tensor {t.name!r} belong to no tensor", path=path)
        pos = t.end
    if pos != size:
        raise FormatError(f"{size - pos} bytes after the last tensor belong to no tensor", path=path)


def _check_entry(path: Path, name: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise FormatError(f"tensor {name!r}: header entry is not an object", path=path)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        raise FormatError(f"tensor {name!r}: unknown dtype {dtype!r}", path=path)
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise FormatError(f"tensor {name!r}: shape must be a list of non-negative integers", path=path)
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        raise FormatError(f"tensor {name!r}: data_offsets must be [begin, end] with begin <= end", path=path)
    begin, end = offsets
    if end > data_len:
        raise FormatError(
            f"tensor {name!r}: data_offsets [{begin}, {end}] point past the end of the data ({data_len} bytes); "
            "file is truncated or corrupt", path=path)
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if end - begin != expected:
        raise FormatError(f"tensor {name!r}: {end - begin} bytes for shape {shape} of {dtype} (needs {expected})",
                          path=path)
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def data_sha256(path: str | os.PathLike[str], header: Header | None = None) -> str:
    """sha256 (hex) of a safetensors file's data region: every byte after the header."""
    header = header or read_header(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(header.data_start)
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def read_tensor(header: Header, name: str) -> torch.Tensor:
    """Read one tensor's bytes from disk into a new torch tensor."""
    info = header.tensors[name]
    with open(header.path, "rb") as f:
        f.seek(info.start)
        buf = bytearray(f.read(info.end - info.start))
    dtype = DTYPES[info.dtype]
    if not buf:
        return torch.empty(info.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The little-endian bytes of a tensor as safetensors stores them."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def encode_header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[bytes, list[str]]:
    """The header bytes (with its 8-byte length prefix) and the order tensor data follows it."""
    order = sorted(tensors)
    entries: dict[str, object] = {}
    offset = 0
    for name in order:
        t = tensors[name]
        n = t.numel() * t.element_size()
        entries[name] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        entries["__metadata__"] = dict(sorted(metadata.items()))
    raw = json.dumps(entries, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


def write_file(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
               metadata: Mapping[str, str] | None = None) -> str:
    """Write a safetensors file atomically; returns the sha256 of its data region."""
    head, order = encode_header(tensors, metadata)
    h = hashlib.sha256()
    with atomic_file(path) as f:
        f.write(head)
        for name in order:
            b = tensor_bytes(tensors[name])
            h.update(b)
            f.write(b)
    return h.hexdigest()


def iter_tensor_names(headers: Iterable[Header]) -> Iterable[str]:
    for header in headers:
        yield from header.tensors
