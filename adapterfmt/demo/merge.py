"""The demo steps of ``adapter merge``: two adapters merged in delta space, and baked into the tiny model."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ..format.adapter import load, save
from ..plugin.registry import get_kind
from ..tiny import build_tiny
from ..verbs.apply import attach, detach
from ..verbs.bake import bake
from ..verbs.merge import merge_adapters, relative_error

if TYPE_CHECKING:
    from ..format.adapter import Adapter
    from .context import DemoContext

WEIGHTS = (0.7, 0.5)


def _delta(adapter: Adapter, module: str) -> torch.Tensor:
    if module not in adapter.modules:
        return torch.zeros(())
    entry = adapter.modules[module]
    return get_kind(entry["kind"]).delta(entry, adapter.module_tensors(module)).double()


def step_merge(ctx: DemoContext) -> None:
    """Merge the lowrank adapter with the extracted one (cat, svd), then bake both into the tiny checkpoint."""
    paths = [ctx.adapters["lowrank"], ctx.adapters.get("extracted-lowrank", ctx.adapters["lowrank"])]
    inputs = [load(p) for p in paths]
    modules = sorted(set().union(*(a.modules for a in inputs)))
    exact = {m: sum(w * _delta(a, m) for w, a in zip(WEIGHTS, inputs, strict=True)) for m in modules}
    for strategy, rank in (("cat", None), ("svd", 8)):
        t0 = time.perf_counter()
        merged = merge_adapters(inputs, weights=WEIGHTS, strategy=strategy, rank=rank)
        secs = time.perf_counter() - t0
        out = save(merged, ctx.workdir / f"merged-{strategy}", overwrite=True)
        ctx.adapters[f"merged-{strategy}"] = out
        ranks = sorted({merged.shape(f"{m}.lora_A")[0] for m in merged.modules})
        err = max(relative_error(_delta(merged, m), exact[m]) for m in modules)
        ctx.note("merge", strategy=strategy, modules=len(merged.modules), ranks=ranks,
                 rel_error_vs_sum=f"{err:.1e}", ms=round(1000 * secs, 1))
    report = bake(paths, ctx.base_dir, ctx.workdir / "tiny-baked", weights=WEIGHTS, overwrite=True)
    from safetensors.torch import load_file

    baked = build_tiny(0, ctx.model.config)
    baked.load_state_dict(load_file(ctx.workdir / "tiny-baked" / "model.safetensors"))
    for i, a in enumerate(inputs):  # the reference: both adapters attached, unmerged, weights in their scale
        scaled = a.manifest["modules"]
        for m in scaled:
            scaled[m].setdefault("params", {})["scale"] = WEIGHTS[i] * float(scaled[m]["params"].get("scale", 1.0))
        attach(ctx.model, a, name=f"in{i}")
    want = ctx.model(ctx.inputs)
    detach(ctx.model)
    ctx.note("bake", into="tiny-base", changed=f"{len(report.changed)}/{report.tensors} tensors",
             fingerprint=",".join(report.fingerprints), copied=",".join(report.copied),
             max_logit_diff_vs_attached=f"{float((baked(ctx.inputs) - want).abs().max()):.1e}",
             ms=round(1000 * report.seconds, 1))
