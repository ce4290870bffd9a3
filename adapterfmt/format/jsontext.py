"""Parsing JSON text read from a file, with one clear :class:`FormatError` for every way it can be bad.

Strict beyond RFC 8259's minimum (spec section 4.2): no ``NaN``/``Infinity`` literals, no duplicate keys,
integers in ``[-2^63, 2^64)``, numbers finite (``1e999`` is refused, not read as infinity), no lone
surrogate escapes (``"\\ud800"``: text that could not be written back as UTF-8), and the text no larger
than its size limit (:mod:`adapterfmt.format.limits`).
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from ..errors import FormatError
from .limits import JSON_BYTES, Limit

INT_MIN, INT_END = -(1 << 63), 1 << 64
"""JSON integers are refused outside ``[INT_MIN, INT_END)``: every int64 and uint64 (safetensors offsets)."""
_INT_MAX_CHARS = 21  # sign + the 20 digits of 2^64 - 1
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class _NotStrictJSON(ValueError):
    """Text Python's json accepts but RFC 8259 JSON does not allow (or leaves ambiguous), or this reader refuses."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _NotStrictJSON(f"key {key!r} appears twice in one object")
    return obj


def _no_constant(name: str) -> Any:
    raise _NotStrictJSON(f"{name} is not a JSON number")


def _int(text: str) -> int:
    value = int(text) if len(text) <= _INT_MAX_CHARS else None
    if value is None or not INT_MIN <= value < INT_END:
        raise _NotStrictJSON(f"integer {text[:24]}{'...' if len(text) > 24 else ''} is outside [-2^63, 2^64)")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotStrictJSON(f"number {text[:24]}{'...' if len(text) > 24 else ''} is too large for a float")
    return value


def parse_json(raw: str | bytes, what: str, *, path: object = None, limit: Limit = JSON_BYTES,
               objects: tuple[Limit, int] | None = None) -> Any:
    """Strict ``json.loads`` of ``raw`` (see the module docstring); not UTF-8, not JSON, nested too deeply or
    larger than ``limit`` -> ``FormatError`` naming ``what``. ``objects=(limit, extra)`` stops the parse as
    soon as it has met more than ``limit + extra`` JSON objects (a safetensors header: one per tensor, plus
    the header and ``__metadata__``), so a text of many small objects costs no more than the limit allows."""
    limit.check(len(raw), f"{what} has", path=path)
    hook = _no_duplicates
    if objects is not None:
        most, seen = objects[0].value() + objects[1], itertools.count(1)

        def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            if next(seen) > most:
                objects[0].check(most + 1 - objects[1], f"{what} lists at least", path=path)
            return _no_duplicates(pairs)
    collecting = gc.isenabled()
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        if isinstance(raw, str) and _SURROGATE.search(text):
            raise UnicodeError
        gc.disable()  # parsing makes no cycles; collecting during a big parse more than doubles its time
        data = json.loads(text, object_pairs_hook=hook, parse_constant=_no_constant,
                          parse_int=_int, parse_float=_float)
        if _SURROGATE_ESCAPE.search(text) and _SURROGATE.search(json.dumps(data, ensure_ascii=False)):
            raise _NotStrictJSON("a string holds a lone surrogate escape (\\ud800-\\udfff), not a character")
        return data
    except _NotStrictJSON as e:
        raise FormatError(f"{what} is not valid JSON ({e})", path=path) from None
    except UnicodeError:
        raise FormatError(f"{what} is not valid UTF-8", path=path) from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})",
                          path=path) from None
    except RecursionError:
        raise FormatError(f"{what} is not valid JSON (nested too deeply)", path=path) from None
    finally:
        if collecting:
            gc.enable()


def read_json_bytes(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a JSON file, refused by its size before reading (``LimitError``) or when unreadable."""
    path = Path(path)
    try:
        JSON_BYTES.check(path.stat().st_size, f"{path.name} has", path=path)
        return path.read_bytes()
    except OSError as e:
        raise FormatError(f"cannot read {path.name}: {e.strerror or e}", path=path) from None


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in the file ``path`` (a config file, say); unreadable, too large, not JSON or not an
    object -> ``FormatError`` naming the file."""
    path = Path(path)
    data = parse_json(read_json_bytes(path), path.name, path=path)
    if not isinstance(data, dict):
        raise FormatError(f"{path.name} is not a JSON object", path=path)
    return data
