"""The demo steps of ``adapter extract`` and ``adapter port`` (see :mod:`adapterfmt.demo.run`)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from ..errors import BaseMismatchError
from ..format.adapter import save
from ..tiny import TinyConfig, build_tiny, save_tiny
from ..verbs.apply import attach, detach
from ..verbs.extract import extract_adapter
from ..verbs.port import port_adapter, port_record

if TYPE_CHECKING:
    from .context import DemoContext

DEMO_RANK = 4
TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")


def _known_lowrank_finetune(ctx: DemoContext) -> dict[str, torch.Tensor]:
    """Add a rank-DEMO_RANK change to some weights of a copy of the demo model; save it; return the changes."""
    gen = torch.Generator().manual_seed(7)
    tuned = copy.deepcopy(ctx.model)
    changes = {}
    for name, p in tuned.named_parameters():
        if name.endswith(".weight") and any(t in name for t in TARGETS):
            d = 0.05 * torch.randn(p.shape[0], DEMO_RANK, generator=gen) @ torch.randn(DEMO_RANK, p.shape[1], generator=gen)
            p.add_(d)
            changes[name.removesuffix(".weight")] = d
    save_tiny(tuned, ctx.workdir / "tiny-finetuned")
    return changes


def step_extract(ctx: DemoContext) -> None:
    """Extract lowrank and dense patches from a fine-tune whose change is known to be of rank 4."""
    changes = _known_lowrank_finetune(ctx)
    for form, opts in (("lowrank", {"energy": 0.999999}), ("dense", {})):
        adapter, report = extract_adapter(ctx.base_dir, ctx.workdir / "tiny-finetuned", form=form,
                                          base_name="adapterfmt-tiny", **opts)
        path = save(adapter, ctx.workdir / f"extracted-{form}", overwrite=True)
        ctx.adapters[f"extracted-{form}"] = path
        errs = [float((adapter.tensor(f"{m}.lora_B") @ adapter.tensor(f"{m}.lora_A") - d).norm() / d.norm())
                if form == "lowrank" else float((adapter.tensor(f"{m}.delta") - d).norm() / d.norm())
                for m, d in changes.items()]
        ranks = sorted({m.rank for m in report.modules if m.rank})
        ctx.note("extract", form=form, modules=len(report.modules), left_out=report.unchanged,
                 ranks=ranks or "-", captured=f"{min(m.captured for m in report.modules):.9f}",
                 err_vs_truth=f"{max(errs):.1e}", bytes=adapter.nbytes())


def step_port(ctx: DemoContext) -> None:
    """Port the extracted patch to an evolved base (v2 = v1 + small changes everywhere); refuse another shape."""
    gen = torch.Generator().manual_seed(11)
    v2 = copy.deepcopy(ctx.model)
    for p in v2.parameters():
        p.add_(0.01 * torch.randn(p.shape, generator=gen))
    v2_dir = save_tiny(v2, ctx.workdir / "tiny-v2")
    from ..format.adapter import load

    patch = load(ctx.adapters["extracted-lowrank"])
    ported = port_adapter(patch, new_base=v2_dir, base_name="adapterfmt-tiny-v2")
    out = save(ported, ctx.workdir / "extracted-lowrank-on-v2", overwrite=True)
    record = port_record(ported)
    attach(v2, ported, name="ported")
    patched = v2(ctx.inputs)
    detach(v2)
    ctx.note("port", to="v2 (evolved)", change=record["change"],
             mapped=", ".join(f"{k}: {v}" for k, v in record["mapped_by"].items()),
             output_change=round(float((patched - v2(ctx.inputs)).abs().max()), 4), written=out.name)
    other = build_tiny(0, TinyConfig(hidden=32, intermediate=64))
    try:
        port_adapter(patch, new_base=save_tiny(other, ctx.workdir / "tiny-h32"))
    except BaseMismatchError as e:
        ctx.note("port", to="h32 (other arch)", change="refused", mapped=f"{e.message.split(' module(s) do not fit')[0].split()[-1]} misfits",
                 output_change="-", written="nothing")
