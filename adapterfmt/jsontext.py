"""Parsing JSON text read from a file, with one clear :class:`FormatError` for every way it can be bad."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import FormatError


def parse_json(raw: str | bytes, what: str, *, path: object = None) -> Any:
    """``json.loads`` of ``raw``; not UTF-8, not JSON or nested too deeply -> ``FormatError`` naming ``what``."""
    try:
        return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
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
