"""Parsing JSON text read from a file, with one clear :class:`FormatError` for every way it can be bad."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import FormatError


class _NotStrictJSON(ValueError):
    """Text Python's json accepts but RFC 8259 JSON does not allow (or leaves ambiguous)."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _NotStrictJSON(f"key {key!r} appears twice in one object")
        obj[key] = value
    return obj


def _no_constant(name: str) -> Any:
    raise _NotStrictJSON(f"{name} is not a JSON number")


def parse_json(raw: str | bytes, what: str, *, path: object = None) -> Any:
    """Strict ``json.loads`` of ``raw`` (no NaN/Infinity, no duplicate keys); not UTF-8, not JSON or nested too
    deeply -> ``FormatError`` naming ``what``."""
    try:
        return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw,
                          object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _NotStrictJSON as e:
        raise FormatError(f"{what} is not valid JSON ({e})", path=path) from None
    except UnicodeDecodeError:
        raise FormatError(f"{what} is not valid UTF-8", path=path) from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})",
                          path=path) from None
    except RecursionError:
        raise FormatError(f"{what} is not valid JSON (nested too deeply)", path=path) from None


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in the file ``path`` (a config file, say); unreadable, not JSON or not an object ->
    ``FormatError`` naming the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FormatError(f"cannot read {path.name}: {e.strerror or e}", path=path) from None
    data = parse_json(raw, path.name, path=path)
    if not isinstance(data, dict):
        raise FormatError(f"{path.name} is not a JSON object", path=path)
    return data
