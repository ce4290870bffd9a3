"""Demo step: a prompt-space adapter (prompt tuning, kind ``prompt``) trained, saved, reloaded and applied."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..format.adapter import load, save
from ..verbs.apply import attach, detach

if TYPE_CHECKING:
    from .context import DemoContext


def step_prompt(ctx: DemoContext) -> None:
    """Prompt tuning: 8 virtual tokens prepended to the input embeddings, 20 AdamW steps with the base frozen;
    the reloaded adapter gives the trained session's logits (the real tokens are the last ``T`` positions),
    and detaching gives the base's logits back bit for bit."""
    vocab = ctx.model.config.vocab_size
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (8, 11), generator=gen)
    target = torch.roll(ids, -1, dims=1)
    base = ctx.model(ctx.inputs)
    session, losses = ctx.fit("prompt_tuning", {"num_virtual_tokens": 8}, ids, target, lr=1e-1)
    trained = ctx.model(ctx.inputs)
    adapter = session.extract(base_name="adapterfmt-tiny")
    session.remove()
    path = save(adapter, ctx.workdir / "prompt.safetensors", overwrite=True)
    attach(ctx.model, load(path), name="prompt")
    applied = ctx.model(ctx.inputs)
    detach(ctx.model)
    ctx.adapters["prompt"] = path
    ((module, entry),) = adapter.modules.items()
    ctx.note("prompt", method="prompt_tuning", kind=entry["kind"], module=module,
             virtual_tokens=adapter.shape(f"{module}.embeddings")[0],
             loss_before=round(losses[0], 4), loss_after=round(losses[-1], 4),
             seq_len=f"{ctx.inputs.shape[1]} -> {applied.shape[1]}",
             reloaded_vs_trained=f"{float((applied - trained).abs().max()):.1e}",
             detach_exact=torch.equal(ctx.model(ctx.inputs), base))
