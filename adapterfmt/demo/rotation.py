"""Demo step: a multiplicative adapter (OFT, kind ``cayley``) trained, applied unmerged and merged, and baked."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from ..format.adapter import load, save
from ..plugin.registry import get_kind
from ..verbs.apply import attach, detach, merge_into
from ..verbs.bake import bake

if TYPE_CHECKING:
    from .context import DemoContext

PROBE = "model.layers.0.self_attn.q_proj"


def step_rotation(ctx: DemoContext) -> None:
    """OFT (block size 4, exact Cayley blocks) on q/v/down, 20 AdamW steps; the merged weights are the base
    weights times an orthogonal matrix (row norms kept), merged equals unmerged, unmerge restores the base
    bit for bit, and ``merge --base`` bakes the same weights into a checkpoint."""
    vocab = ctx.model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (8, 11), generator=gen)
    target = torch.roll(ids, -1, dims=1)
    session, losses = ctx.fit("oft", {"target_modules": ["q_proj", "v_proj", "down_proj"], "block_size": 4},
                              ids, target, lr=5e-2)
    adapter = session.extract(base_name="adapterfmt-tiny")
    session.remove()
    path = save(adapter, ctx.workdir / "oft.safetensors", overwrite=True)
    loaded = load(path)
    w0 = ctx.model.get_submodule(PROBE).weight.detach().clone()
    attach(ctx.model, loaded, name="oft")
    unmerged = ctx.model(ctx.inputs)
    merge_into(ctx.model, "oft")
    merged = ctx.model(ctx.inputs)
    w1 = ctx.model.get_submodule(PROBE).weight.detach().clone()
    detach(ctx.model)
    restored = torch.equal(ctx.model.get_submodule(PROBE).weight, w0)
    g = get_kind("cayley").rotation(loaded.modules[PROBE], loaded.module_tensors(PROBE))
    baked = ctx.workdir / "tiny-oft-baked"
    bake([path], ctx.base_dir, baked, overwrite=True)
    baked_w = load_file(baked / "model.safetensors")[f"{PROBE}.weight"]
    ctx.adapters["oft"] = path
    ctx.note("rotation", method="oft", kind="cayley", modules=len(adapter.modules),
             loss_before=round(losses[0], 4), loss_after=round(losses[-1], 4),
             orthogonality=f"{float((g @ g.T - torch.eye(len(g))).abs().max()):.1e}",
             row_norm_change=f"{float((w1.norm(dim=1) - w0.norm(dim=1)).abs().max()):.1e}",
             merged_vs_unmerged=f"{float((merged - unmerged).abs().max()):.1e}", unmerge_exact=restored,
             baked_vs_merged=f"{float((baked_w - w1).abs().max()):.1e}")
