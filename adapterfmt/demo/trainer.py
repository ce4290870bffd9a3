"""Demo step: ``adapter train``'s library path on the tiny base folder, a JSONL file of prompt/completion pairs,
a checkpoint, and a run resumed from it that ends where the uninterrupted one did."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import torch

from ..format.adapter import load
from ..threads import one_thread
from ..verbs.trainer import TrainOptions, train_adapter

if TYPE_CHECKING:
    from .context import DemoContext


def step_train_cli(ctx: DemoContext) -> None:
    """LoRA r=4 trained for 20 steps on sums written as text (loss on the answers only), a checkpoint at step
    10; the run resumed from it must give the same adapter."""
    data = ctx.workdir / "sums.jsonl"
    gen = torch.Generator().manual_seed(0)
    pairs = torch.randint(0, 10, (64, 2), generator=gen).tolist()
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "completion": f"{a + b}"}) + "\n" for a, b in pairs))
    losses: list[float] = []
    opts = {"method": "lora", "data": data, "base": ctx.base_dir, "max_steps": 20, "lr": 1e-2, "batch_size": 8,
            "config": {"target_modules": "all-linear", "r": 4, "alpha": 8}}
    started = time.perf_counter()
    with one_thread(), torch.enable_grad():
        whole = train_adapter(TrainOptions(**opts, out=ctx.workdir / "cli-lora.safetensors", checkpoint_every=10,
                                           overwrite=True),
                              progress=lambda r: losses.append(r.loss))
        resumed = train_adapter(TrainOptions(resume=whole.checkpoints[0], overwrite=True,
                                             out=ctx.workdir / "cli-lora-resumed.safetensors"))
    a, b = load(whole.out), load(resumed.out)
    ctx.adapters["cli-lora"] = whole.out
    ctx.note("train_cli", method="lora", steps=whole.steps, loss_first=round(losses[0], 4),
             loss_last=round(losses[-1], 4), resumed_from=resumed.resumed_from,
             resumed_equal=all(torch.equal(a.tensor(n), b.tensor(n)) for n in a.tensors()),
             data_sha256=whole.data_sha256[:12], seconds=round(time.perf_counter() - started, 2))
