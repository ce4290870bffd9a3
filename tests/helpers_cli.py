"""Shared setup of the CLI convention tests: a tiny base checkpoint, a fine-tune of it and a LoRA for it."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers_spec import invoke

import adapterfmt as af
from adapterfmt.tiny import build_tiny, save_tiny

MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


def lora(seed: int, rank: int = 4, base: torch.nn.Module | None = None) -> af.Adapter:
    """A rank-``rank`` LoRA on the tiny model's q/v projections (its singular values fall off), recording
    ``base``'s fingerprint."""
    g = torch.Generator().manual_seed(seed)
    modules = {m: af.lowrank_entry([64, 64], scale=2.0) for m in MODULES}
    tensors = {}
    for m in modules:
        tensors[f"{m}.lora_A"] = torch.randn(rank, 64, generator=g) * 0.1
        tensors[f"{m}.lora_B"] = torch.randn(64, rank, generator=g) * 0.1 * 0.5 ** torch.arange(rank)
    record = {"fingerprint": af.fingerprint_module(base)} if base is not None else {}
    return af.Adapter(af.new_manifest("lora", modules, base=record), tensors)


def tiny_setup(folder: Path) -> dict[str, Path]:
    """Paths of: ``base`` (tiny checkpoint), ``tuned`` (a rank-2 change of two of its weights), ``a`` and ``b``
    (LoRAs for the base, folder and single-file form)."""
    model = build_tiny(seed=0)
    paths = {"base": save_tiny(model, folder / "base")}
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for m in MODULES[:2]:
            w = model.get_submodule(m).weight
            w += torch.randn(64, 2, generator=g) @ torch.randn(2, 64, generator=g) * 0.05
    paths["tuned"] = save_tiny(model, folder / "tuned")
    base_model = build_tiny(seed=0)
    paths["a"] = af.save(lora(1, base=base_model), folder / "a")
    paths["b"] = af.save(lora(2, base=base_model), folder / "b.safetensors")
    return paths


def cli(*args: object):
    """``invoke`` with every argument as text."""
    return invoke(*map(str, args))
