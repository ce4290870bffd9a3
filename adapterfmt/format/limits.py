"""Reader limits (spec section 4.2): sizes past which an input is refused before memory or time is spent on it.

Each limit is far above any real adapter (a 70B-model all-linear LoRA: ~1,100 modules, ~2,300 tensors, a
~350 KB header; an every-expert LoRA of a 256-expert MoE: ~50k modules, ~100k tensors, a ~20 MB header) and
can be raised through its environment variable, read at each check. A refusal is a :class:`LimitError`
naming the variable.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import LimitError

MiB = 1 << 20
GiB = 1 << 30
_UNIT_NAMES = {MiB: "MiB", GiB: "GiB"}


@dataclass(frozen=True)
class Limit:
    """One limit: its environment variable, default (in ``unit``: bytes per unit, 1 for counts) and the noun
    of what it counts."""

    env: str
    default: float
    unit: int
    noun: str

    def value(self) -> int:
        """The limit in bytes (or items), from the environment variable when set."""
        raw = os.environ.get(self.env)
        if raw is None:
            return int(self.default * self.unit)
        try:
            v = float(raw)
        except ValueError:
            v = math.nan
        if not v > 0 or math.isinf(v):
            raise LimitError(f"{self.env} must be a positive number, got {raw!r}")
        return int(v * self.unit)

    def check(self, amount: int, subject: str, *, path: object = None) -> None:
        """Refuse ``amount`` above the limit: one line, ``"<subject> <amount> <noun>, over the limit ..."``."""
        limit = self.value()
        if amount > limit:
            shown = f"{limit:,}" if self.unit == 1 else f"{limit / self.unit:.4g} {_UNIT_NAMES[self.unit]}"
            raise LimitError(f"{subject} {amount} {self.noun}, over the limit of {shown} "
                             f"(set {self.env} to raise it)", path=path)


def _half_of_memory_gib() -> float:
    """Half the machine's physical memory in GiB (8 where the platform does not tell)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 / GiB
    except (AttributeError, ValueError, OSError):
        return 8.0


HEADER_BYTES = Limit("ADAPTERFMT_MAX_HEADER_MIB", 32, MiB, "bytes")
"""A safetensors header (the ``N`` of spec 4: item 1)."""
JSON_BYTES = Limit("ADAPTERFMT_MAX_JSON_MIB", 32, MiB, "bytes")
"""A JSON text read from a file: ``adapter.json``, the single-file manifest, a foreign config file."""
TENSORS = Limit("ADAPTERFMT_MAX_TENSORS", 250_000, 1, "tensors")
"""Tensor entries in one safetensors header."""
MODULES = Limit("ADAPTERFMT_MAX_MODULES", 100_000, 1, "module entries")
"""Module entries in one manifest (checked before the JSON Schema, whose cost grows with them)."""
NAME_BYTES = Limit("ADAPTERFMT_MAX_NAME_BYTES", 1024, 1, "bytes")
"""A tensor name, module path or ``files`` path, in UTF-8 bytes."""
DENSE_BYTES = Limit("ADAPTERFMT_MAX_DENSE_GIB", _half_of_memory_gib(), GiB, "bytes")
"""One dense tensor a verb forms from a compact one (a sparse or low-rank dW, a decoded codec payload);
default: half the machine's physical memory."""
MAX_PATH_COMPONENT_BYTES = 255
"""Longest component of a ``files`` path (what common file systems allow); not adjustable."""


def check_name(name: str, what: str, *, path: object = None) -> None:
    """Refuse a tensor name, module path or file path longer than the name limit."""
    NAME_BYTES.check(len(name.encode("utf-8")), f"{what} {name[:40]!r}... has", path=path)


def check_dense(shape: Sequence[int], what: str, *, itemsize: int = 4, path: object = None) -> None:
    """Refuse to allocate a dense tensor of ``shape`` (``itemsize`` bytes an element, fp32 by default) above
    the dense limit: one line saying how much it would need."""
    need = math.prod(shape) * itemsize
    limit = DENSE_BYTES.value()
    if need > limit:
        raise LimitError(f"{what}: a dense {list(shape)} tensor would need {need / GiB:.3g} GiB (limit "
                         f"{limit / GiB:.3g} GiB; set {DENSE_BYTES.env} to raise it)", path=path)


__all__ = ["Limit", "HEADER_BYTES", "JSON_BYTES", "TENSORS", "MODULES", "NAME_BYTES", "DENSE_BYTES",
           "MAX_PATH_COMPONENT_BYTES", "check_name", "check_dense"]
