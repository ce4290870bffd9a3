"""The manifest: building it, checking it against the JSON Schema and the spec version rules."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources
from typing import Any

from ..errors import FormatError, SpecVersionError, UnknownExtensionError
from .jsontext import parse_json
from .limits import MAX_PATH_COMPONENT_BYTES, MODULES, check_name

SPEC_MAJOR = 1
SPEC_MINOR = 2
SPEC_VERSION = f"{SPEC_MAJOR}.{SPEC_MINOR}"
SINGLE_FILE_KEY = "."
"""The key of the one ``files`` entry of a single-file adapter: the file itself."""
METADATA_KEY = "adapterfmt"
"""The ``__metadata__`` key holding the manifest JSON in the single-file form."""
RESERVED_ROLES = frozenset({"__metadata__"})
CORE_FIELDS = frozenset({"spec_version", "method", "base", "modules", "files", "compression", "provenance",
                         "extensions", "must_understand"})
"""Top-level fields of spec 1.0: every 1.x reader understands them, so ``must_understand`` may name them."""
FEATURE_MID = "adapterfmt.lowrank_mid"
FEATURE_BASE = "adapterfmt.lowrank_base"
FEATURE_QUANT = "adapterfmt.base_quantization"
FEATURES = frozenset({FEATURE_MID, FEATURE_BASE, FEATURE_QUANT})
"""Features of spec 1.2 a writer lists in ``must_understand`` when a lowrank entry uses them (spec 9), so that
an older reader refuses the file instead of computing ``scale * B @ A``; and when ``base.quantization`` is
given (spec 6.12), so that it refuses rather than attach the adapter to a base off that grid."""

Manifest = dict[str, Any]


@cache
def schema() -> dict[str, Any]:
    """The JSON Schema (2020-12) of the manifest, as shipped in ``spec/``."""
    text = resources.files("adapterfmt.spec").joinpath("manifest.schema.json").read_text("utf-8")
    return json.loads(text)


def new_manifest(
    method: str,
    modules: Mapping[str, Mapping[str, Any]],
    *,
    method_version: str = "1",
    config: Mapping[str, Any] | None = None,
    base: Mapping[str, Any] | None = None,
    provenance: Iterable[Mapping[str, Any]] = (),
    extensions: Mapping[str, Any] | None = None,
    must_understand: Iterable[str] = (),
) -> Manifest:
    """A manifest for a new adapter; ``files`` is filled in when the adapter is saved."""
    m: Manifest = {
        "spec_version": SPEC_VERSION,
        "method": {"name": method, "version": method_version, "config": dict(config or {})},
        "base": dict(base or {"name": None, "revision": None, "fingerprint": None}),
        "modules": {k: dict(v) for k, v in modules.items()},
        "files": {},
        "provenance": [dict(p) for p in provenance],
    }
    if extensions:
        m["extensions"] = dict(extensions)
    if must_understand:
        m["must_understand"] = list(must_understand)
    return m


def parse_version(text: object, *, path: object = None) -> tuple[int, int]:
    """Split ``"MAJOR.MINOR"``; refuse a major this reader does not implement."""
    if not isinstance(text, str) or not re.fullmatch(r"[0-9]{1,9}\.[0-9]{1,9}", text):
        shown = repr(text) if len(repr(text)) <= 40 else repr(text)[:40] + "..."
        raise FormatError(f"spec_version must be a 'MAJOR.MINOR' string of at most 9 digits each, got {shown}",
                          path=path)
    major, minor = (int(p) for p in text.split("."))
    if major != SPEC_MAJOR:
        raise SpecVersionError(
            f"spec_version {text} is not supported: this reader implements major version {SPEC_MAJOR} "
            "(upgrade adapterfmt to read it)", path=path)
    return major, minor


def check_manifest(m: object, *, path: object = None, understood: Iterable[str] = ()) -> Manifest:
    """Check version, schema and must-understand rules; returns the manifest."""
    if not isinstance(m, dict):
        raise FormatError("manifest is not a JSON object", path=path)
    parse_version(m.get("spec_version"), path=path)
    _check_sizes(m, path=path)
    import jsonschema  # imported on first check: `adapter --help` reads no manifest

    errors = sorted(jsonschema.Draft202012Validator(schema()).iter_errors(m), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise FormatError(f"manifest field {where}: {e.message}", path=path)
    unknown = sorted(set(m.get("must_understand", ())) - set(understood) - CORE_FIELDS - FEATURES)
    if unknown:
        raise UnknownExtensionError(f"manifest requires extensions this reader does not understand: {', '.join(unknown)}",
                          path=path)
    return m


def required_features(modules: Mapping[str, Mapping[str, Any]], roles: Mapping[str, Iterable[str]]) -> list[str]:
    """The feature names (spec 9) the lowrank entries of ``modules`` use, given each module's stored roles."""
    names = set()
    for module, entry in modules.items():
        if entry.get("kind") != "lowrank":
            continue
        if "lora_mid" in roles.get(module, ()):
            names.add(FEATURE_MID)
        if "base_part" in entry.get("params", {}):
            names.add(FEATURE_BASE)
    return sorted(names)


def manifest_features(m: Manifest) -> list[str]:
    """The feature names (spec 9) the manifest's top-level fields use: ``base.quantization``."""
    base = m.get("base")
    return [FEATURE_QUANT] if isinstance(base, dict) and base.get("quantization") is not None else []


def _check_sizes(m: Manifest, *, path: object) -> None:
    """Reader limits checked before the (slow) schema: module count, name lengths, file path components."""
    modules, files = m.get("modules"), m.get("files")
    if isinstance(modules, dict):
        MODULES.check(len(modules), "manifest has", path=path)
        for name in modules:
            check_name(name, "module path", path=path)
    for rel in files if isinstance(files, dict) else ():
        check_name(rel, "file path", path=path)
        if any(ord(c) < 0x20 or c == "\x7f" for c in rel):
            raise FormatError(f"file path {rel!r} in the manifest holds a control character", path=path)
        if any(len(part.encode("utf-8")) > MAX_PATH_COMPONENT_BYTES for part in rel.split("/")):
            raise FormatError(f"file path {rel[:60]!r}... has a component longer than {MAX_PATH_COMPONENT_BYTES} "
                              "bytes", path=path)


def dumps(m: Manifest) -> str:
    """Canonical JSON text of a manifest: sorted keys, no insignificant whitespace."""
    return _dumps(m, separators=(",", ":"))


def dumps_pretty(m: Manifest) -> str:
    """Human-readable canonical JSON (the folder form's ``adapter.json``)."""
    return _dumps(m, indent=2) + "\n"


def _dumps(m: Manifest, **layout: Any) -> str:
    """``json.dumps`` of a manifest; a NaN or infinity in it (which JSON cannot hold) is a ``FormatError``."""
    try:
        return json.dumps(m, sort_keys=True, ensure_ascii=False, allow_nan=False, **layout)
    except ValueError as e:
        raise FormatError(f"manifest cannot be written as JSON: {e}") from None


def loads(text: str | bytes, *, path: object = None) -> Manifest:
    """Parse manifest JSON text, naming the file when it is not JSON."""
    return parse_json(text, "manifest", path=path)


def copy_manifest(m: Manifest) -> Manifest:
    return copy.deepcopy(m)


def shared_tensors(entry: Mapping[str, Any]) -> dict[str, str]:
    """``params.shared`` of a module entry: roles read from tensors stored once for several modules
    (``{role: tensor name}``, e.g. VeRA's shared projections)."""
    return dict(entry.get("params", {}).get("shared", {}))
