"""Reading and writing safetensors files safely and deterministically.

The header is parsed and checked here before any tensor is touched, so a truncated file, offsets past
the end or a header claiming petabytes give one clear :class:`FormatError` instead of a crash. Writing
is done by this module too (not by the safetensors library) so that output bytes depend only on the
tensors and metadata given: keys sorted, tensors laid out in name order, header padded to 8 bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ..errors import FormatError, MissingFileError
from .atomic import atomic_file
from .jsontext import parse_json
from .limits import HEADER_BYTES, TENSORS, check_name

if TYPE_CHECKING:
    import torch

ITEMSIZE: dict[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                            "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
"""Bytes per element of each safetensors dtype: all a header check needs (no torch)."""


@cache
def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
            "U8": torch.uint8, "BOOL": torch.bool,
            "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
            "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}


@cache
def _dtype_names() -> dict[torch.dtype, str]:
    return {v: k for k, v in _torch_dtypes().items()}


def __getattr__(name: str) -> Any:
    """``DTYPES`` (safetensors dtype name -> torch dtype) and ``DTYPE_NAMES`` (torch dtype -> name), made on
    first use so that reading a header does not import torch (PEP 562)."""
    if name == "DTYPES":
        return _torch_dtypes()
    if name == "DTYPE_NAMES":
        return _dtype_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        return _dtype_names()[dtype]
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
        if 8 + n > size and f.read(1) != b"{":  # no JSON header follows: some other kind of file
            raise FormatError("not a safetensors file (no header length and JSON header at its start)", path=path)
        f.seek(8)
        if 8 + n > size and n > HEADER_BYTES.value():
            raise FormatError(f"header claims {n} bytes, more than the file's {size}; file is corrupt", path=path)
        if 8 + n > size:
            raise FormatError(f"truncated safetensors file: header needs {8 + n} bytes, file has {size}", path=path)
        HEADER_BYTES.check(n, "header claims", path=path)
        raw = f.read(n)
    header = parse_json(raw, "safetensors header", path=path, limit=HEADER_BYTES, objects=(TENSORS, 2))
    if not isinstance(header, dict):
        raise FormatError("safetensors header is not a JSON object", path=path)
    TENSORS.check(len(header) - ("__metadata__" in header), "safetensors header lists", path=path)
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
    check_name(name, "tensor name", path=path)
    if not isinstance(entry, dict):
        raise FormatError(f"tensor {name!r}: header entry is not an object", path=path)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise FormatError(f"tensor {name!r}: unknown dtype {str(dtype)[:40]!r}", path=path)
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        raise FormatError(f"tensor {name!r}: shape must be a list of non-negative integers", path=path)
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_natural(o) for o in offsets) or offsets[0] > offsets[1]):
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


def _natural(x: object) -> bool:
    """A non-negative JSON integer (``true`` is not one)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def data_sha256(path: str | os.PathLike[str], header: Header | None = None) -> str:
    """sha256 (hex) of a safetensors file's data region: every byte after the header."""
    header = header or read_header(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(header.data_start)
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def read_tensor(header: Header, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor's bytes from disk into a new torch tensor (one copy of the data in memory), or into
    the front of ``buffer`` (a 1-D uint8 tensor, reused across calls) and return a view of it."""
    import torch

    info = header.tensors[name]
    n = info.end - info.start
    dtype = _torch_dtypes()[info.dtype]
    if buffer is None:
        t = torch.empty(info.shape, dtype=dtype)
        raw = t.reshape(-1).view(torch.uint8)
    else:
        raw = buffer[:n]
        t = raw.view(dtype).reshape(info.shape)
    if n:
        with open(header.path, "rb") as f:
            f.seek(info.start)
            got = f.readinto(raw.numpy())
        if got != n:
            raise FormatError(f"tensor {name!r}: file ended after {got} of {n} bytes", path=header.path)
    return t


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The little-endian bytes of a tensor as safetensors stores them."""
    import torch

    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


TensorSpec = tuple[str, tuple[int, ...]]
"""A tensor's safetensors dtype name and shape: all a header needs."""


def encode_specs(specs: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None) -> tuple[bytes, list[str]]:
    """The header bytes (with its 8-byte length prefix) for tensors of these dtypes and shapes, and the order
    their data follows it (sorted by name)."""
    table = layout(specs)
    order = list(table)
    entries: dict[str, object] = {name: {"dtype": d, "shape": list(s), "data_offsets": [b, e]}
                                  for name, (d, s, b, e) in table.items()}
    if metadata:
        entries["__metadata__"] = dict(sorted(metadata.items()))
    raw = json.dumps(entries, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


def layout(specs: Mapping[str, TensorSpec]) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """Where the writer puts each tensor: ``{name: (dtype, shape, begin, end)}`` in data order (sorted
    names), offsets relative to the data region."""
    table = {}
    offset = 0
    for name in sorted(specs):
        dtype, shape = specs[name]
        n = math.prod(shape) * ITEMSIZE[dtype]
        table[name] = (dtype, tuple(shape), offset, offset + n)
        offset += n
    return table


def table_sha256(table: Mapping[str, tuple[str, tuple[int, ...], int, int]]) -> str:
    """sha256 (hex) of a tensor table (spec section 8): for each tensor in name order, the UTF-8 name, the
    dtype, the shape and the data offsets, each length-prefixed as unsigned 64-bit little-endian."""
    h = hashlib.sha256()
    for name in sorted(table):
        dtype, shape, begin, end = table[name]
        for text in (name, dtype):
            raw = text.encode("utf-8")
            h.update(struct.pack("<Q", len(raw)) + raw)
        h.update(struct.pack(f"<{len(shape) + 3}Q", len(shape), *shape, begin, end))
    return h.hexdigest()


def header_table(header: Header) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """The tensor table of a parsed header, offsets relative to its data region."""
    return {n: (i.dtype, tuple(i.shape), i.start - header.data_start, i.end - header.data_start)
            for n, i in header.tensors.items()}


def encode_header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[bytes, list[str]]:
    """The header bytes (with its 8-byte length prefix) and the order tensor data follows it."""
    return encode_specs({n: (dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()}, metadata)


class StreamWriter:
    """Write a safetensors file one tensor at a time, the header first from known dtypes and shapes.

    Only the tensor being written is in memory. Tensors must come in :attr:`order` (sorted names), each
    with its declared dtype and shape, or copied as raw bytes from another file; :meth:`finish` checks that
    every tensor was written. The bytes equal :func:`write_file`'s for the same tensors and metadata.
    """

    def __init__(self, f: BinaryIO, specs: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None = None,
                 *, sha256: bool = False) -> None:
        head, self.order = encode_specs(specs, metadata)
        self._f, self._specs, self._next = f, specs, 0
        self._sha = hashlib.sha256() if sha256 else None
        _preallocate(f, len(head) + sum(math.prod(s) * ITEMSIZE[d] for d, s in specs.values()))
        f.write(head)
        self._pos = len(head)

    def _expect(self, name: str) -> int:
        if self._next >= len(self.order) or self.order[self._next] != name:
            want = self.order[self._next] if self._next < len(self.order) else "nothing (all written)"
            raise FormatError(f"stream writer got tensor {name!r}, expected {want}")
        self._next += 1
        dtype, shape = self._specs[name]
        return math.prod(shape) * ITEMSIZE[dtype]

    def write(self, name: str, t: torch.Tensor) -> None:
        """Write the next tensor; its dtype and shape must be the declared ones."""
        n = self._expect(name)
        if (dtype_name(t.dtype), tuple(t.shape)) != (self._specs[name][0], tuple(self._specs[name][1])):
            raise FormatError(f"tensor {name!r} is {dtype_name(t.dtype)} {list(t.shape)}, declared "
                              f"{self._specs[name][0]} {list(self._specs[name][1])}")
        if n:
            import torch

            view = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            self._f.write(view)
            if self._sha is not None:
                self._sha.update(view)
        self._pos += n

    def copy(self, name: str, src: int, offset: int) -> None:
        """Write the next tensor as raw bytes read from file descriptor ``src`` at ``offset`` (kernel copy when
        the platform has it; the bytes never enter Python)."""
        n = self._expect(name)
        if self._sha is not None:
            raise FormatError("StreamWriter.copy does not hash; write the tensor instead")
        self._f.flush()
        done = 0
        if hasattr(os, "copy_file_range"):
            try:
                os.lseek(self._f.fileno(), self._pos, os.SEEK_SET)
                while done < n:
                    k = os.copy_file_range(src, self._f.fileno(), n - done, offset + done)
                    if k == 0:
                        break
                    done += k
            except OSError:
                pass  # e.g. across file systems on old kernels: fall back to reading and writing
        self._f.seek(self._pos + done)
        while done < n:
            chunk = os.pread(src, min(n - done, 1 << 24), offset + done)
            if not chunk:
                raise FormatError(f"tensor {name!r}: source file ended after {done} of {n} bytes")
            self._f.write(chunk)
            done += len(chunk)
        self._pos += n

    def finish(self) -> str:
        """Check every declared tensor was written; returns the data region's sha256 ("" when not hashing)."""
        if self._next != len(self.order):
            raise FormatError(f"stream writer closed with {len(self.order) - self._next} tensor(s) unwritten, "
                              f"first {self.order[self._next]!r}")
        return "" if self._sha is None else self._sha.hexdigest()


def _preallocate(f: BinaryIO, size: int) -> None:
    """Reserve the file's full size up front when the file system can: no out-of-space error half way, and
    on ext4 writes into reserved blocks run ~10x faster than writes that grow the file."""
    try:
        os.posix_fallocate(f.fileno(), 0, size)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        pass


def write_file(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
               metadata: Mapping[str, str] | None = None, *, overwrite: bool = False) -> str:
    """Write a safetensors file atomically (replacing an existing one only with ``overwrite``); returns the
    sha256 of its data region."""
    specs = {n: (dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()}
    with atomic_file(path, overwrite=overwrite) as f:
        w = StreamWriter(f, specs, metadata, sha256=True)
        for name in w.order:
            w.write(name, tensors[name])
        return w.finish()


def iter_tensor_names(headers: Iterable[Header]) -> Iterable[str]:
    for header in headers:
        yield from header.tensors
