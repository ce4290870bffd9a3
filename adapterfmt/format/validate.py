"""Full validation of an adapter: format, manifest, checksums, tensors present / none extra, shapes, data."""

from __future__ import annotations

import os

from .adapter import Adapter, load
from .structure import check_structure


def validate(target: str | os.PathLike[str] | Adapter, *, deep: bool = True) -> Adapter:
    """Check an adapter completely; returns it, or raises the specific :class:`~adapterfmt.AdapterError`.

    Loading a path already checks format, checksums and structure; this adds the per-kind data rules.
    """
    if isinstance(target, Adapter):
        check_structure(target, deep=deep)
        return target
    adapter = load(target, verify=True)
    if deep:
        check_structure(adapter, deep=True)
    return adapter
