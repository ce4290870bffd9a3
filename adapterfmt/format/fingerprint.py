"""Base-model fingerprints: which weights an adapter was made for (algorithm ``adapterfmt-fp1``).

``structure`` = sha256 of one line per tensor, sorted by name: ``name \\t DTYPE \\t d0,d1,...\\n``.
``values``    = sha256 over, for each tensor in the same order, the raw little-endian bytes of
                ``SAMPLES`` elements at flat positions ``floor(i * numel / SAMPLES)`` for i < SAMPLES,
                then the last element (positions may repeat for small tensors; empty tensors add nothing).
A checkpoint on disk is fingerprinted from its safetensors headers plus those few elements, so a
multi-GB model costs a few kilobytes of reads. A module in memory gives the same answer: its state
dict, with a tensor shared under several names (tied weights) counted once under the name met first
in module registration order, as ``save_pretrained`` keeps it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import FormatError, MissingFileError
from .safetensors_io import ITEMSIZE, Header, dtype_name, read_header, tensor_bytes

ALGORITHM = "adapterfmt-fp1"
SAMPLES = 16


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str
    shape: tuple[int, ...]


def sample_positions(numel: int) -> list[int]:
    if numel == 0:
        return []
    return [i * numel // SAMPLES for i in range(SAMPLES)] + [numel - 1]


def _digest(metas: Iterable[TensorMeta], samples: Iterable[bytes] | None) -> dict[str, Any]:
    metas = list(metas)
    s = hashlib.sha256()
    for m in metas:
        s.update(f"{m.name}\t{m.dtype}\t{','.join(map(str, m.shape))}\n".encode())
    out: dict[str, Any] = {"algorithm": ALGORITHM, "structure": s.hexdigest(), "values": None, "tensors": len(metas)}
    if samples is not None:
        v = hashlib.sha256()
        for b in samples:
            v.update(b)
        out["values"] = v.hexdigest()
    return out


def module_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as a checkpoint would hold it: tied tensors once, under their first name."""
    state = model.state_dict(keep_vars=True)
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    keep: dict[str, torch.Tensor] = {}
    order = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    order += [n for n in state if n not in set(order)]
    for name in order:
        if name not in state:
            continue
        t = state[name]
        key = (t.data_ptr(), t.element_size(), tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        keep[name] = t
    return keep


def fingerprint_module(model: nn.Module, *, values: bool = True) -> dict[str, Any]:
    """Fingerprint of a live torch module (see the module docstring for the exact definition)."""
    state = module_state(model)
    names = sorted(state)
    metas = [TensorMeta(n, dtype_name(state[n].dtype), tuple(state[n].shape)) for n in names]

    def samples() -> Iterable[bytes]:
        for n in names:
            flat = state[n].detach().reshape(-1)
            pos = sample_positions(flat.numel())
            if pos:
                yield tensor_bytes(flat[torch.tensor(pos, device=flat.device)])

    return _digest(metas, samples() if values else None)


def checkpoint_files(path: str | os.PathLike[str]) -> list[Path]:
    """The safetensors files of a checkpoint: a file, a folder with an index, or a folder of shards."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise MissingFileError("no such checkpoint file or folder", path=path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise FormatError("index has no valid weight_map", path=index) from None
        files = sorted(set(weight_map.values()))
        from .adapter import safe_member

        return [safe_member(path, f) for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MissingFileError("no .safetensors files in checkpoint folder", path=path)
    return files


def read_checkpoint_headers(path: str | os.PathLike[str]) -> list[Header]:
    return [read_header(f) for f in checkpoint_files(path)]


def fingerprint_checkpoint(path: str | os.PathLike[str], *, values: bool = True) -> dict[str, Any]:
    """Fingerprint of a safetensors checkpoint, reading headers and a few sampled elements per tensor."""
    headers = read_checkpoint_headers(path)
    infos = {}
    for h in headers:
        for name, info in h.tensors.items():
            if name in infos:
                raise FormatError(f"tensor {name!r} appears in two shards", path=h.path)
            infos[name] = (h, info)
    names = sorted(infos)
    metas = [TensorMeta(n, infos[n][1].dtype, infos[n][1].shape) for n in names]

    def samples() -> Iterable[bytes]:
        handles: dict[Path, int] = {}
        try:
            for n in names:
                h, info = infos[n]
                fd = handles.get(h.path)
                if fd is None:
                    fd = handles[h.path] = os.open(h.path, os.O_RDONLY)
                size = ITEMSIZE[info.dtype]
                yield b"".join(os.pread(fd, size, info.start + p * size) for p in sample_positions(info.numel))
        finally:
            for fd in handles.values():
                os.close(fd)

    return _digest(metas, samples() if values else None)


def compare(recorded: dict[str, Any] | None, actual: dict[str, Any]) -> str:
    """``"same"``, ``"new-weights"`` (same names/shapes/dtypes, other values), ``"different"`` or ``"unknown"``."""
    if not recorded or recorded.get("algorithm") != actual.get("algorithm"):
        return "unknown"
    if recorded["structure"] != actual["structure"]:
        return "different"
    if recorded.get("values") and actual.get("values") and recorded["values"] != actual["values"]:
        return "new-weights"
    return "same"
