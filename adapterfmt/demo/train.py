"""Demo step: train a small LoRA on the embedded tiny model, save it, reload it and apply it per row."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ..format.adapter import load, save
from ..verbs.apply import adapter_ids, attach, detach

if TYPE_CHECKING:
    from .context import DemoContext


def step_train(ctx: DemoContext) -> None:
    """LoRA r=4 on every linear layer, 20 AdamW steps on a next-token table; loss before and after, reload
    equality, and a mixed batch (adapter rows and bare-base rows) against each row's own output."""
    gen = torch.Generator().manual_seed(0)
    vocab = ctx.model.config.vocab_size
    table = torch.randint(0, vocab, (vocab,), generator=gen)
    seq = [torch.randint(0, vocab, (8,), generator=gen)]
    for _ in range(10):
        seq.append(table[seq[-1]])
    ids = torch.stack(seq, dim=1)
    x, y = ids[:, :-1], ids[:, 1:]
    started = time.perf_counter()
    session, losses = ctx.fit("lora", {"target_modules": "all-linear", "r": 4, "alpha": 8}, x, y, lr=1e-2)
    trained = ctx.model(x)
    adapter = session.extract(base_name="adapterfmt-tiny")
    session.remove()
    path = save(adapter, ctx.workdir / "trained-lora.safetensors", overwrite=True)
    base = ctx.model(x)
    attach(ctx.model, load(path), name="trained")
    reloaded = (ctx.model(x) - trained).abs().max().item()
    rows = ["trained", None] * (x.shape[0] // 2)
    with adapter_ids(ctx.model, rows):
        mixed = ctx.model(x)
    detach(ctx.model)
    want = torch.stack([trained[i] if r else base[i] for i, r in enumerate(rows)])
    ctx.adapters["trained-lora"] = path
    ctx.note("train", method="lora", modules=len(adapter.modules),
             trainable_parameters=sum(t.numel() for t in adapter.tensors().values()),
             loss_before=round(losses[0], 4), loss_after=round(losses[-1], 4),
             seconds=round(time.perf_counter() - started, 2), reload_max_diff=reloaded,
             mixed_batch_max_diff=(mixed - want).abs().max().item())
