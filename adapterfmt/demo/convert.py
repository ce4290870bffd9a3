"""The demo step of ``adapter convert``: train a small LoRA on the tiny model, convert it to PEFT and back,
and show that the outputs agree (and, when ``peft`` is installed, that PEFT itself computes the same)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from ..format.adapter import load, save
from ..plugin.registry import verb
from ..verbs.apply import attach, detach
from ..verbs.conversion import convert

if TYPE_CHECKING:
    from .context import DemoContext

LORA_CONFIG = {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4, "alpha": 8,
               "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 3}}


def _train_lora(ctx: DemoContext, steps: int = 8, lr: float = 0.5) -> float:
    """A few steps of plain SGD on next-token prediction of random text; returns the final loss."""
    model = ctx.model
    gen = torch.Generator().manual_seed(3)
    data = torch.randint(0, model.config.vocab_size, (4, 12), generator=gen)
    with torch.enable_grad(), verb("lora", "train")(model, config=LORA_CONFIG) as session:
        params = list(session.parameters())
        for _ in range(steps):
            out = model(data[:, :-1])
            loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), data[:, 1:].reshape(-1))
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.sub_(lr * g)
        save(session.extract(base_name="adapterfmt-tiny"), ctx.workdir / "trained-lora.safetensors", overwrite=True)
    return float(loss)


def _peft_output(ctx: DemoContext, folder: object) -> torch.Tensor | None:
    """The tiny model's output with the PEFT folder loaded by PEFT itself (None without peft)."""
    try:
        from peft import PeftModel
    except ImportError:
        return None
    from ..tiny import build_tiny

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(build_tiny(seed=0), folder).eval()
        return model(ctx.inputs)


def step_convert(ctx: DemoContext) -> None:
    """Train a LoRA (mixed ranks and alphas), convert it to PEFT and back; compare outputs."""
    loss = _train_lora(ctx)
    trained = ctx.workdir / "trained-lora.safetensors"
    peft_dir, back = ctx.workdir / "trained-lora-peft", ctx.workdir / "trained-lora-back.safetensors"
    to_peft = convert(trained, peft_dir, "peft", overwrite=True)
    convert(peft_dir, back, overwrite=True)
    outputs = {}
    for label, path in (("trained", trained), ("round_trip", back)):
        attach(ctx.model, load(path), name=label)
        outputs[label] = ctx.model(ctx.inputs)
        detach(ctx.model)
    a, b = load(trained), load(back)
    identical = all(torch.equal(a.tensor(n), b.tensor(n)) for n in a.tensor_names()) and a.modules == b.modules
    peft_out = _peft_output(ctx, peft_dir)
    ctx.note("convert", train_loss=round(loss, 4), modules=to_peft.modules, peft_folder=str(peft_dir),
             round_trip_tensors_identical=identical,
             round_trip_max_diff=float((outputs["trained"] - outputs["round_trip"]).abs().max()),
             peft_max_diff=("peft not installed" if peft_out is None
                            else float((outputs["trained"] - peft_out).abs().max())))
