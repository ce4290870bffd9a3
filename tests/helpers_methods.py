"""Shared pieces of the method-family tests: a learnable tiny LM task, a training loop, one-thread runs."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 128


@pytest.fixture
def one_thread():
    """Tiny training loops run faster on one thread than on two contended ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def lm_task(seed: int = 0, rows: int = 16, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences following a fixed random next-token table: learnable, and far from the base model."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randint(0, VOCAB, (VOCAB,), generator=gen)
    seq = [torch.randint(0, VOCAB, (rows,), generator=gen)]
    for _ in range(length):
        seq.append(table[seq[-1]])
    ids = torch.stack(seq, dim=1)
    return ids[:, :-1], ids[:, 1:]


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Next-token loss on the last ``T`` positions of the output (a prompt adds positions in front)."""
    x, y = batch
    logits = model(x)
    logits = logits if isinstance(logits, torch.Tensor) else logits.logits
    return F.cross_entropy(logits[:, -y.shape[1]:].reshape(-1, logits.shape[-1]), y.reshape(-1))


def train(loss: Callable[[], torch.Tensor], params: Iterable[torch.Tensor], *, steps: int, lr: float) -> tuple[float, float]:
    """``steps`` Adam steps on ``loss()``; returns the loss before and after (measured without grad)."""
    with torch.no_grad():
        start = loss().item()
    opt = torch.optim.Adam(list(params), lr=lr)
    for _ in range(steps):
        value = loss()
        opt.zero_grad()
        value.backward()
        opt.step()
    with torch.no_grad():
        return start, loss().item()
