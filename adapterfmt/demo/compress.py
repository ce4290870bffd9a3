"""``adapter demo`` step: compress the demo's dense patch (ComPEFT) and LoRA (resize + int8)."""

from __future__ import annotations

from ..format.adapter import load, save
from ..verbs.compress import compress_adapter
from ..verbs.summary import file_bytes
from .context import DemoContext

DEMO_PLANS = {
    "dense": [{"method": "compeft", "density": 0.05}],
    "lowrank": [{"method": "resize", "rank": 2}, {"method": "quantize", "bits": 8}],
}


def step_compress(ctx: DemoContext) -> None:
    """``adapter demo``: compress the demo's dense patch (ComPEFT) and LoRA (resize + int8); report bytes on
    disk, the dW error and the output divergence on the tiny model."""
    for kind, plan in DEMO_PLANS.items():
        src = load(ctx.adapters[kind])
        out = save(compress_adapter(src, steps=plan, base=ctx.model, inputs=ctx.inputs),
                   ctx.workdir / f"{kind}-compressed", overwrite=True)
        rec = load(out).manifest["compression"]
        before, after = file_bytes(src), file_bytes(load(out))
        ctx.note("compress", kind=kind, steps=" -> ".join(s["method"] for s in plan), bytes_before=before,
                 bytes_after=after, ratio=round(before / after, 2),
                 dW_rel_error_max=round(rec["dW_rel_error_max"], 4),
                 output_rel_error=round(rec["output"]["rel_error"], 4),
                 top1_agreement=rec["output"].get("top1_agreement"))
