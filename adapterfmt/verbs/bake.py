"""Baking adapters into a base checkpoint without loading the model: streamed tensor by tensor.

Each output tensor is either copied byte for byte from the base (the kernel copies it; it never enters
Python) or, when an adapter touches it, read alone, changed in fp32 and written back in the base's dtype:
``W + dW`` where ``dW`` is the merge (any strategy of :mod:`adapterfmt.verbs.merge`) of the adapters' entries
for that module, added in row chunks (a lowrank ``dW`` is never formed: each chunk gets ``B[rows] @ A``).
Kinds that are not ``W + dW`` (DoRA, IA3 vectors, dense replace) are merged by their own kind against the
base tensor, in adapter order (linear strategy, weight 1). Peak memory is about one base tensor, one fp32
``dW`` for non-lowrank kinds, plus the adapters, whatever the model's size.

A module stored in bitsandbytes' 4-bit or 8-bit format is dequantised, changed and re-quantised with
bitsandbytes (:mod:`adapterfmt.verbs.bnb`; additive kinds only), before the output is written; the report
gives each such module's re-quantisation error.

The output is a folder (same shard layout as the base, or re-sharded to ``shard_size`` bytes with an
index; config, tokenizer and other non-weight files copied) or one ``.safetensors`` file, written
atomically: a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..deltas.base import shape_fits
from ..errors import BaseMismatchError, FormatError, UnsupportedError, first_few
from ..format.adapter import Adapter, load
from ..format.atomic import atomic_dir, atomic_file, check_output
from ..format.fingerprint import checkpoint_files, compare, fingerprint_checkpoint
from ..format.jsontext import parse_json, read_json_bytes
from ..format.limits import check_dense
from ..format.quant import QuantSpec, fits_grid
from ..format.safetensors_io import (DTYPES, ITEMSIZE, Header, StreamWriter, TensorInfo, dtype_name, read_header,
                                     read_tensor)
from ..plugin.registry import get_kind
from .bnb import BnbWeight, bnb_weights, requantize_module
from .explicit import make_explicit
from .merge import MergeOptions, Term, collect_terms, merge_module, resolve_weights

INDEX_FILE = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz")
"""Files of these types in the base folder are weights: never copied into the output."""
CHUNK_BYTES = 1 << 24
"""fp32 bytes of the row chunk in which a delta is added to a tensor."""

Progress = Callable[[Iterable[str], int], Iterator[str]]


@dataclass
class BakeReport:
    """What a bake did."""

    out: Path
    files: list[str]
    tensors: int
    changed: list[str]
    """Checkpoint tensors the adapters changed."""
    not_found: list[str]
    """Adapter modules whose parameter the checkpoint lacks (only with force; otherwise an error)."""
    copied: list[str]
    """Non-weight files copied from the base folder."""
    skipped: list[str]
    """Weight files of other formats in the base folder, left out of the output."""
    fingerprints: list[str]
    """For each adapter: same, new-weights, different or unknown (see :func:`adapterfmt.format.fingerprint.compare`)."""
    bytes: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    requantized: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Modules stored in a bitsandbytes format: their re-quantisation error (see :mod:`adapterfmt.verbs.bnb`)."""

    def as_dict(self) -> dict[str, Any]:
        return {**vars(self), "out": str(self.out)}


# ----- the base checkpoint --------------------------------------------------------------------------------
def _index(base: Path) -> tuple[list[Header], dict[str, Header]]:
    headers = [read_header(f) for f in checkpoint_files(base)]
    where: dict[str, Header] = {}
    for h in headers:
        for name in h.tensors:
            if name in where:
                raise FormatError(f"tensor {name!r} appears in two shards", path=h.path)
            where[name] = h
    return headers, where


def _plan(out: Path, base: Path, headers: list[Header], shard_size: int | None) -> list[tuple[str, list[str]]]:
    """Output files (relative names) and the tensors each holds."""
    if out.suffix == ".safetensors":
        return [(out.name, sorted(n for h in headers for n in h.tensors))]
    if shard_size is None:
        if base.is_file():
            return [("model.safetensors", sorted(headers[0].tensors))]
        return [(h.path.relative_to(base).as_posix(), sorted(h.tensors)) for h in headers]
    shards: list[list[str]] = [[]]
    size = 0
    for h in sorted(headers, key=lambda h: h.path):
        for name in sorted(h.tensors):
            n = h.tensors[name].end - h.tensors[name].start
            if shards[-1] and size + n > shard_size:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += n
    if len(shards) == 1:
        return [("model.safetensors", shards[0])]
    return [(f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors", s) for i, s in enumerate(shards)]


# ----- one module's change ----------------------------------------------------------------------------
class _Standin(nn.Module):
    """A module holding one weight (and bias) for a delta kind's own ``merge`` (non-additive kinds)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)


@dataclass
class _Module:
    """The adapters' terms for one module of the checkpoint and what has been computed for it."""

    path: str
    weight: str
    bias: str | None
    terms: list[Term]
    merged: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None
    ready: dict[str, torch.Tensor] = field(default_factory=dict)
    bnb: BnbWeight | None = None

    @property
    def additive(self) -> bool:
        return all(t.additive for t in self.terms)


class _Buffers:
    """Memory reused for every tensor the bake changes: the tensor itself and an fp32 row chunk. (Fresh
    allocations of the same large size each time make glibc's heap grow tensor after tensor.)"""

    def __init__(self, nbytes: int) -> None:
        self.raw = torch.empty(nbytes, dtype=torch.uint8)
        self.acc = torch.empty(CHUNK_BYTES // 4)


def _add_rows(w: torch.Tensor, x: torch.Tensor | None, y: torch.Tensor, buf: _Buffers) -> None:
    """``w += x @ y`` (or ``w += y`` when ``x`` is None) in fp32, row chunk by row chunk, in place in ``w``'s
    dtype. ``w`` is 2-D (a view of the tensor)."""
    rows = max(1, CHUNK_BYTES // (4 * max(1, w.shape[1])))
    for r0 in range(0, w.shape[0], rows):
        chunk = w[r0:r0 + rows]
        if chunk.numel() > buf.acc.numel():  # one row longer than the chunk
            buf.acc = torch.empty(chunk.numel())
        acc = chunk if chunk.dtype == torch.float32 else buf.acc[:chunk.numel()].view(chunk.shape).copy_(chunk)
        if x is None:
            acc.add_(y[r0:r0 + rows])
        else:
            acc.addmm_(x[r0:r0 + rows], y)
        if acc is not chunk:
            chunk.copy_(acc)


def _apply_merged(w: torch.Tensor, entry: dict[str, Any], t: dict[str, torch.Tensor], buf: _Buffers) -> None:
    """Add a merged entry's dW to the base tensor ``w`` (stored layout) in place."""
    if entry["kind"] == "lowrank":
        a, b = t["lora_A"], t["lora_B"]
        k = a.shape[0]
        a2, b2 = a.reshape(k, -1), b.reshape(b.shape[0], k)
        if entry["params"].get("transposed"):
            _add_rows(w, a2.T, b2.T, buf)
        else:
            _add_rows(w.reshape(w.shape[0], -1), b2, a2, buf)
        return
    d = get_kind(entry["kind"]).delta(entry, t)
    _add_rows(w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1), None,
              d.reshape(w.shape[0], -1) if w.dim() > 1 else d.reshape(1, -1), buf)


def _merged_bias(entry: dict[str, Any], t: dict[str, torch.Tensor]) -> torch.Tensor | None:
    role = "bias" if entry["kind"] == "lowrank" else "bias_delta"
    return t.get(role)


def _changed(mod: _Module, name: str, where: dict[str, Header], buf: _Buffers, opts: MergeOptions) -> torch.Tensor:
    """The new value of checkpoint tensor ``name`` (the module's weight or bias); for additive modules a view
    of ``buf``, valid until the next call."""
    if name in mod.ready:
        return mod.ready.pop(name)
    if mod.additive:
        if mod.merged is None:
            mod.merged = merge_module(mod.path, mod.terms, opts)
        entry, t = mod.merged
        value = read_tensor(where[name], name, buf.raw)
        if name == mod.weight:
            _apply_merged(value, entry, t, buf)
        else:
            _add_rows(value.reshape(1, -1), None, _merged_bias(entry, t).float().reshape(1, -1), buf)
        return value
    # non-additive kinds merge themselves, in adapter order, into fp32 copies of the weight and bias
    check_dense(where[mod.weight].tensors[mod.weight].shape, f"module {mod.path!r}")
    weight = read_tensor(where[mod.weight], mod.weight)
    bias = read_tensor(where[mod.bias], mod.bias) if mod.bias else None
    stand = _Standin(weight.float(), None if bias is None else bias.float())
    with torch.no_grad():
        for term in mod.terms:
            if term.additive:
                stand.weight.add_(term.weight * term.delta())
                b = term.bias()
                if b is not None:
                    stand.bias.add_(term.weight * b)
            else:
                term.kind.merge(stand, term.entry, term.tensors)
    mod.ready[mod.weight] = stand.weight.detach().to(weight.dtype)
    if bias is not None:
        mod.ready[mod.bias] = stand.bias.detach().to(bias.dtype)
    return mod.ready.pop(name)


def _requantize(mod: _Module, where: dict[str, Header], buf: _Buffers, opts: MergeOptions) -> dict[str, Any]:
    """Compute a bitsandbytes module's new tensors (its codes, state and bias) into ``mod.ready``; its error."""
    entry, t = merge_module(mod.path, mod.terms, opts)
    q = mod.bnb

    def add(w: torch.Tensor) -> None:
        if not shape_fits(entry["shape"], w.shape):
            raise BaseMismatchError(f"{mod.weight}: adapter expects {list(entry['shape'])}, the checkpoint's "
                                    f"bitsandbytes weight is {list(w.shape)}")
        _apply_merged(w, entry, t, buf)

    new, report = requantize_module(q, where, add)
    mod.ready.update(new)
    if mod.bias:
        bias = read_tensor(where[mod.bias], mod.bias)
        _add_rows(bias.reshape(1, -1), None, _merged_bias(entry, t).float().reshape(1, -1), buf)
        mod.ready[mod.bias] = bias
    return report


def _modules(terms: dict[str, list[Term]], where: dict[str, Header], opts: MergeOptions
             ) -> tuple[dict[str, _Module], list[str], list[str]]:
    """Checkpoint tensor name -> module to change; adapter modules not found; shape misfits."""
    touched: dict[str, _Module] = {}
    missing, misfit = [], []
    quantized = bnb_weights(where)
    for path, ts in terms.items():
        entry = ts[0].entry
        weight = f"{path}.{entry.get('parameter', 'weight')}"
        additive = all(t.additive for t in ts)
        if path in quantized and weight == quantized[path].names[0]:
            if not additive:
                raise UnsupportedError(f"module {path!r} is stored in bitsandbytes' format: only W + dW kinds bake "
                                       f"into it, not {next(t.kind.name for t in ts if not t.additive)}")
            bias = f"{path}.bias" if any(t.bias() is not None for t in ts) else None
            if bias and bias not in where:
                missing.append(bias)
                continue
            mod = _Module(path, weight, bias, ts, bnb=quantized[path])
            touched.update({n: mod for n in (*quantized[path].names, *([bias] if bias else []))})
            continue
        if not additive:
            bad = [t for t in ts if not t.additive and (t.weight != 1.0 or opts.strategy not in ("linear", "cat"))]
            if bad:
                raise UnsupportedError(f"module {path!r}: kind {bad[0].kind.name} is not W + dW, so it can only be "
                                       "baked with weight 1 and the linear strategy")
            if entry.get("parameter", "weight") != "weight":
                raise UnsupportedError(f"module {path!r}: a non-additive kind on parameter "
                                       f"{entry['parameter']!r} cannot be baked")
        needs_bias = any(t.bias() is not None for t in ts) if additive else f"{path}.bias" in where
        bias = f"{path}.bias" if needs_bias else None
        lost = [n for n in (weight, bias) if n and n not in where]
        if lost:
            missing += lost
            continue
        info = where[weight].tensors[weight]
        if not shape_fits(entry["shape"], info.shape):
            misfit.append(f"{weight}: adapter expects {list(entry['shape'])}, checkpoint has {list(info.shape)}")
            continue
        if not DTYPES[info.dtype].is_floating_point:
            misfit.append(f"{weight}: checkpoint dtype {info.dtype} is not floating point")
            continue
        mod = _Module(path, weight, bias, ts)
        touched[weight] = mod
        if bias:
            touched[bias] = mod
    return touched, missing, misfit


# ----- the driver -------------------------------------------------------------------------------------
def _check_grids(adapters: list[Adapter], where: dict[str, Header], base: Path) -> None:
    """Spec 6.12: an adapter made on a quantised base (``base.quantization``) is refused on a checkpoint whose
    targeted weights are not on that grid."""
    for a in adapters:
        if a.base.get("quantization") is None:
            continue
        spec = QuantSpec.from_json(a.base["quantization"], path=a.source, what="base.quantization")
        for path, entry in sorted(a.modules.items()):
            name = f"{path}.{entry.get('parameter', 'weight')}"
            w = read_tensor(where[name], name) if name in where else None  # a missing one is reported later
            if w is None or not w.is_floating_point() or w.dim() < 2:
                continue
            if not fits_grid(w.t() if entry.get("params", {}).get("transposed") else w, spec):
                raise BaseMismatchError(f"{name}: {a.source or 'the adapter'} was made on a base quantised to "
                                        f"{spec.bits} bits (group {spec.group_size or 'per channel'}, "
                                        f"{spec.zero_point}) and this weight is not on that grid; pass force=True "
                                        "(CLI: --force) to bake anyway", path=base)


def bake(
    adapters: Sequence[Adapter | str | os.PathLike[str]],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    weights: Sequence[float] | None = None,
    strategy: str = "linear",
    rank: int | None = None,
    energy: float | None = None,
    density: float | None = None,
    seed: int = 0,
    sign: str = "total",
    force: bool = False,
    overwrite: bool = False,
    shard_size: int | None = None,
    progress: Progress | None = None,
) -> BakeReport:
    """Write ``base`` with ``adapters`` merged into its weights to ``out`` (see the module docstring).

    ``base``: a safetensors file, or a folder (one file, shards with ``model.safetensors.index.json``, or
    shards without). Refuses (writing nothing) a base whose fingerprint differs from an adapter's, whose
    targeted weights are off the grid of an adapter's ``base.quantization``, or that lacks some adapter
    module, unless ``force``; shape misfits are always refused. ``progress`` wraps the
    iteration over tensor names (``progress(names, total)``).
    """
    start = time.perf_counter()
    base, out = Path(base), Path(out)
    check_output(out, overwrite)
    loaded = [a if isinstance(a, Adapter) else load(a) for a in adapters]
    if not loaded:
        raise FormatError("bake needs at least one adapter")
    # cat is the exact sum, as linear is; the bake needs no lowrank output
    opts = MergeOptions("linear" if strategy == "cat" else strategy, rank, energy, density, seed, sign, torch.float32)
    headers, where = _index(base)
    actual = fingerprint_checkpoint(base)
    verdicts = [compare(a.base.get("fingerprint"), actual) for a in loaded]
    wrong = [f"{a.source or f'adapter {i + 1}'} ({v})" for i, (a, v) in enumerate(zip(loaded, verdicts, strict=True))
             if v in ("different", "new-weights")]
    if wrong and not force:
        raise BaseMismatchError("the checkpoint's fingerprint does not match the base recorded in "
                                f"{first_few(wrong)}; pass force=True (CLI: --force) to bake anyway", path=base)
    if not force:
        _check_grids(loaded, where, base)
    loaded = [make_explicit(a, base) for a in loaded]  # a derived base part is computed on this base
    terms = collect_terms(loaded, resolve_weights(len(loaded), weights))
    touched, missing, misfit = _modules(terms, where, opts)
    if misfit:
        raise BaseMismatchError(f"{len(misfit)} adapter module(s) do not fit the checkpoint: {first_few(misfit)}",
                                path=base)
    if missing and (not force or not touched):
        raise BaseMismatchError(f"the checkpoint has no tensor {first_few(missing)}"
                                + ("" if touched else " (no adapter module found)")
                                + ("; pass force=True (CLI: --force) to bake the others" if touched else ""),
                                path=base)
    plan = _plan(out, base, headers, shard_size)
    report = BakeReport(out, [f for f, _ in plan], len(where), sorted(touched), missing, [], [], verdicts)
    names = [n for _, names in plan for n in names]
    it: Iterator[str] = iter(progress(names, len(names)) if progress else names)
    buf = _Buffers(max((where[n].tensors[n].end - where[n].tensors[n].start for n in touched), default=0))
    for mod in {id(m): m for m in touched.values() if m.bnb}.values():  # before writing: a state's size may change
        report.requantized[mod.path] = _requantize(mod, where, buf, opts)
    fds = {h.path: os.open(h.path, os.O_RDONLY) for h in headers}
    try:
        if out.suffix == ".safetensors":
            with atomic_file(out, overwrite=overwrite) as f:
                report.bytes = _write_file(f, plan[0][1], where, fds, touched, buf, opts, it)
        else:
            with atomic_dir(out, overwrite=overwrite) as tmp:
                for rel, names_ in plan:
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    with open(tmp / rel, "wb") as f:
                        report.bytes += _write_file(f, names_, where, fds, touched, buf, opts, it)
                if len(plan) > 1 or (base.is_dir() and (base / INDEX_FILE).is_file()):
                    _write_index(tmp / INDEX_FILE, plan, report.bytes, base)
                if base.is_dir():
                    report.copied, report.skipped = _copy_extras(base, tmp)
        for _ in it:  # let a progress bar finish
            pass
    finally:
        for fd in fds.values():
            os.close(fd)
    report.seconds = time.perf_counter() - start
    if "unknown" in verdicts:
        report.notes.append("an adapter records no base fingerprint: the base could not be checked")
    return report


def _write_file(f: Any, names: list[str], where: dict[str, Header], fds: dict[Path, int],
                touched: dict[str, _Module], buf: _Buffers, opts: MergeOptions, it: Iterator[str]) -> int:
    infos: dict[str, TensorInfo] = {n: where[n].tensors[n] for n in names}
    meta = {"format": "pt", **where[names[0]].metadata} if names else {"format": "pt"}
    ready = {n: touched[n].ready[n] for n in names if n in touched and n in touched[n].ready}
    specs = {n: (dtype_name(ready[n].dtype), list(ready[n].shape)) if n in ready else (i.dtype, i.shape)
             for n, i in infos.items()}  # a re-quantised state may change size
    w = StreamWriter(f, specs, meta)
    for name in w.order:
        next(it)
        mod = touched.get(name)
        if mod is None:
            w.copy(name, fds[where[name].path], infos[name].start)
        else:
            w.write(name, _changed(mod, name, where, buf, opts))
    w.finish()
    return sum(math.prod(shape) * ITEMSIZE[dtype] for dtype, shape in specs.values())


def _write_index(path: Path, plan: list[tuple[str, list[str]]], total: int, base: Path) -> None:
    meta: dict[str, Any] = {}
    old = base / INDEX_FILE if base.is_dir() else None
    if old is not None and old.is_file():
        try:
            meta = dict(parse_json(read_json_bytes(old), INDEX_FILE, path=old).get("metadata") or {})
        except (ValueError, AttributeError, TypeError):  # an unreadable old index: its metadata is not carried over
            meta = {}
    index = {"metadata": {**meta, "total_size": total},
             "weight_map": {n: rel for rel, names in plan for n in names}}
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _copy_extras(base: Path, dest: Path) -> tuple[list[str], list[str]]:
    """Copy the base folder's non-weight files (config, tokenizer, generation config ...)."""
    copied, skipped = [], []
    for p in sorted(base.rglob("*")):
        rel = p.relative_to(base)
        if not p.is_file() or p.is_symlink() or any(part.startswith(".") for part in rel.parts):
            continue
        if rel.as_posix() == INDEX_FILE or p.name.endswith(".safetensors"):
            continue
        if p.suffix in WEIGHT_SUFFIXES:
            skipped.append(rel.as_posix())
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dest / rel)
        copied.append(rel.as_posix())
    return copied, skipped


__all__ = ["bake", "BakeReport", "INDEX_FILE"]
