"""Structure checks of an adapter against its manifest: every module's tensors present, none extra, shapes
that fit each kind and, with ``deep``, each kind's rules on the stored values (read only for a kind that has
such rules)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import FormatError
from ..plugin.registry import get_kind
from .manifest import (
    FEATURE_BASE,
    FEATURE_QUANT,
    manifest_features,
    required_features,
    shared_tensors,
)

if TYPE_CHECKING:
    from .adapter import Adapter


def expected_tensors(adapter: Adapter) -> dict[str, tuple[str, str]]:
    """Stored tensor names the manifest allows, mapped to (module, role); required ones are checked separately."""
    allowed: dict[str, tuple[str, str]] = {}
    for module, entry in adapter.modules.items():
        kind = get_kind(entry["kind"], path=adapter.source)
        required, optional = kind.roles(entry)
        enc = entry.get("encoding", {})
        for role in (*required, *optional):
            if role in enc:
                from .codecs import stored_parts

                for part in stored_parts(enc[role]):
                    allowed[f"{module}.{role}.{part}"] = (module, role)
            else:
                allowed[f"{module}.{role}"] = (module, role)
        for role, name in shared_tensors(entry).items():
            allowed[name] = (module, role)
    return allowed


def check_structure(adapter: Adapter, *, deep: bool = False) -> None:
    """Raise :class:`FormatError` unless every module's tensors are present, none extra, shapes fit the kind;
    with ``deep``, also each kind's rules on the stored values (reads every tensor)."""
    where = adapter.source
    allowed = expected_tensors(adapter)
    names = adapter.tensor_names()
    stored = set(names)
    extra = [n for n in names if n not in allowed]
    if extra:
        raise FormatError(f"tensor {extra[0]!r} is not described by the manifest"
                          + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""), path=where)
    _check_features(adapter)
    for module, entry in sorted(adapter.modules.items()):
        kind = get_kind(entry["kind"], path=where)
        required, _ = kind.roles(entry)
        shared = shared_tensors(entry)
        gone = [n for n in shared.values() if n not in stored]
        if gone:
            raise FormatError(f"module {module!r} ({entry['kind']}): shared tensor {gone[0]!r} is missing", path=where)
        present = set(adapter.roles(module)) | set(shared)
        missing = [r for r in required if r not in present]
        if missing:
            raise FormatError(f"module {module!r} ({entry['kind']}): tensor {module}.{missing[0]} is missing",
                              path=where)
        enc = entry.get("encoding", {})
        if enc:
            tensors = adapter.module_tensors(module)
            shapes = {r: tuple(t.shape) for r, t in tensors.items()}
        else:
            shapes = {r: adapter.shape(shared.get(r, f"{module}.{r}")) for r in present}
        try:
            kind.check(module, entry, shapes)
        except FormatError as e:
            raise FormatError(e.message, path=where) from None
        if deep and (enc or getattr(kind, "has_data_rules", True)):
            adapter.module_tensors(module)  # reads the values and checks the kind's data rules


def _check_features(adapter: Adapter) -> None:
    """Spec 9 / 6.2.1: a lowrank middle factor or base part is listed in ``must_understand``, and a derived
    base part comes with a base fingerprint holding values (a reader checks the base before computing it)."""
    listed = set(adapter.manifest.get("must_understand", ()))
    roles = {m: adapter.roles(m) for m, e in adapter.modules.items() if e["kind"] == "lowrank"}
    missing = [f for f in required_features(adapter.modules, roles) if f not in listed]
    if missing:
        field = "params.base_part" if missing[0] == FEATURE_BASE else "lora_mid"
        raise FormatError(f"a lowrank entry has {field}, and must_understand does not list {missing[0]} "
                          "(spec section 9)", path=adapter.source)
    if [f for f in manifest_features(adapter.manifest) if f not in listed]:
        raise FormatError(f"base.quantization is given, and must_understand does not list {FEATURE_QUANT} "
                          "(spec section 9)", path=adapter.source)
    derived = [m for m, e in adapter.modules.items() if "recipe" in e.get("params", {}).get("base_part", {})]
    fp = (adapter.manifest.get("base") or {}).get("fingerprint") or {}
    if derived and not fp.get("values"):
        raise FormatError(f"module {derived[0]!r}: a derived params.base_part needs base.fingerprint with values "
                          "(spec 6.2.1)", path=adapter.source)
