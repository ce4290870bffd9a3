"""The explicit form of a ``lowrank`` base-derived part (spec 6.2.1): a derived part (a recipe the reader
recomputes from the base) turned into stored ``init_*`` factors, so the adapter no longer needs the base.

Delta-space merges, compression and format conversion work on the explicit form; :func:`make_explicit` is
the one step that needs the base, and it checks first that the base is the one the adapter records.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..deltas.base_part import derived_tensors, explicit_entry, is_derived
from ..errors import BaseMismatchError, UnsupportedError
from ..format.adapter import Adapter
from ..format.fingerprint import compare
from ..format.manifest import FEATURES, copy_manifest
from .conversion import base_fingerprint, base_tensor

BaseLike = str | os.PathLike[str] | nn.Module


def derived_modules(adapter: Adapter) -> list[str]:
    """Modules whose entry has a derived base part."""
    return sorted(m for m, e in adapter.modules.items() if is_derived(e))


def make_explicit(adapter: Adapter, base: BaseLike) -> Adapter:
    """``adapter`` with every derived base part computed on ``base`` (a live model or a safetensors checkpoint)
    and stored as ``init_*`` (and ``lora_A`` / ``lora_B`` where those were derived); a part of scale 0 is
    dropped. Returns ``adapter`` itself when nothing is derived. Raises :class:`BaseMismatchError` unless
    ``base`` compares as the recorded base (section 7), :class:`UnsupportedError` when a recipe is not well
    defined on it."""
    derived = derived_modules(adapter)
    if not derived:
        return adapter
    recorded = (adapter.base or {}).get("fingerprint")
    found = compare(recorded, base_fingerprint(base) or {})
    if found != "same" or not (recorded or {}).get("values"):
        raise BaseMismatchError(f"module {derived[0]!r} has a derived params.base_part; the base given is not the "
                                f"one the adapter records (fingerprint: {found})", path=adapter.source)
    manifest = copy_manifest(adapter.manifest)
    tensors = {n: adapter.tensor(n) for n in adapter.tensor_names()}
    for module in derived:
        entry = adapter.modules[module]
        w = base_tensor(base, f"{module}.{entry.get('parameter', 'weight')}")
        w = w.t() if entry.get("params", {}).get("transposed") else w
        stored = adapter.module_tensors(module)
        dtype = next((t.dtype for t in stored.values() if t.is_floating_point()), torch.float32)
        try:
            new = derived_tensors(entry, w, dtype=torch.promote_types(dtype, torch.float32))
        except UnsupportedError as e:
            raise UnsupportedError(f"module {module!r}: {e.message}", path=adapter.source) from None
        tensors.update({f"{module}.{role}": t.contiguous() for role, t in new.items() if role not in stored})
        manifest["modules"][module] = explicit_entry(entry)
    kept = [n for n in manifest.get("must_understand", ()) if n not in FEATURES]
    if kept:
        manifest["must_understand"] = kept
    else:
        manifest.pop("must_understand", None)
    record: dict[str, Any] = {"tool": "adapterfmt make_explicit", "modules": derived}
    manifest.setdefault("provenance", []).append(record)
    manifest["files"] = {}
    return Adapter(manifest, tensors)


def require_explicit(adapter: Adapter, base: BaseLike | None, verb: str) -> Adapter:
    """``adapter`` in explicit form for ``verb``: made explicit with ``base``, or refused naming the module
    when a derived part needs a base that was not given."""
    derived = derived_modules(adapter)
    if not derived:
        return adapter
    if base is None:
        raise UnsupportedError(f"{verb}: module {derived[0]!r} has a derived params.base_part "
                               f"({adapter.modules[derived[0]]['params']['base_part']['recipe']}), computed from "
                               "the base weights; give the base (base= / --base) to make it explicit first",
                               path=adapter.source)
    return make_explicit(adapter, base)
