"""Thread count for small tensor work."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one torch thread, then restore the count. For small factorizations and tiny
    models: LAPACK calls on a few hundred numbers gain nothing from threads, and on a busy machine the
    thread barrier makes them up to 1000x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
