"""A plain-data summary of an adapter, for ``adapter inspect`` and scripts."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from ..format.adapter import Adapter
from ..plugin.registry import get_kind


def file_bytes(adapter: Adapter) -> int | None:
    """Bytes the adapter occupies on disk (None for an adapter that only lives in memory)."""
    src = adapter.source
    if src is None:
        return None
    if src.is_file():
        return src.stat().st_size
    return sum(p.stat().st_size for p in src.rglob("*") if p.is_file())


def summarize(adapter: Adapter, *, checksums: str = "verified") -> dict[str, Any]:
    """Method, spec version, base, modules with kinds and ranks, parameter count and bytes."""
    modules = []
    params = 0
    for path, entry in sorted(adapter.modules.items()):
        kind = get_kind(entry["kind"], path=adapter.source)
        tensors = adapter.module_tensors(path) if entry.get("encoding") else None
        shapes = ({r: tuple(t.shape) for r, t in tensors.items()} if tensors is not None
                  else {r: adapter.shape(f"{path}.{r}") for r in adapter.roles(path)})
        n = kind.param_count(entry, shapes)
        params += n
        modules.append({"module": path, "kind": entry["kind"], "shape": entry["shape"],
                        "rank": kind.rank(entry, shapes), "params": n,
                        "encoding": {r: spec.get("codec") for r, spec in sorted(entry.get("encoding", {}).items())}
                        or None})
    ranks = Counter(m["rank"] for m in modules if m["rank"] is not None)
    base = adapter.manifest.get("base") or {}
    return {
        "path": str(adapter.source) if adapter.source else None,
        "form": None if adapter.source is None else
        (f"{adapter.converted_from} {'folder' if adapter.source.is_dir() else 'file'}, converted in memory"
         if adapter.converted_from else "folder" if adapter.source.is_dir() else "single-file"),
        "spec_version": adapter.manifest["spec_version"],
        "method": adapter.manifest["method"],
        "base": base,
        "kinds": dict(Counter(m["kind"] for m in modules)),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "modules": modules,
        "parameters": params,
        "tensor_bytes": adapter.nbytes(),
        "file_bytes": file_bytes(adapter),
        "checksums": f"none ({adapter.converted_from} has no adapterfmt checksums)" if adapter.converted_from
        else checksums,
        "compression": adapter.manifest.get("compression"),
        "provenance": adapter.manifest.get("provenance", []),
        "extensions": sorted(adapter.manifest.get("extensions", {})),
        "dense_equivalent_params": sum(math.prod(m["shape"]) for m in modules),
    }
