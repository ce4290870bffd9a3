"""The embedded default job behind ``adapter demo``: a tiny model built in-process, adapters of every
delta kind made, saved, validated and inspected, then each later capability (train, convert, merge,
compress, port) run on them. Each step adds lines to the report it prints.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..format.adapter import Adapter, save
from ..format.fingerprint import fingerprint_module
from ..format.manifest import new_manifest
from ..format.validate import validate
from ..tiny import TinyLM, build_tiny, save_tiny
from ..verbs.apply import attach, detach
from ..verbs.summary import summarize
from .context import DemoContext


def _example_tensors(kind: str, gen: torch.Generator, model: TinyLM) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """One small adapter of ``kind`` for the tiny model: module entries and tensors."""
    h = model.config.hidden
    modules: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    for i in range(model.config.layers):
        path = f"model.layers.{i}.self_attn.q_proj"
        if kind == "lowrank":
            modules[path] = {"kind": "lowrank", "shape": [h, h], "params": {"scale": 2.0}}
            tensors[f"{path}.lora_A"] = torch.randn(4, h, generator=gen) * 0.1
            tensors[f"{path}.lora_B"] = torch.randn(h, 4, generator=gen) * 0.1
        elif kind == "dense":
            modules[path] = {"kind": "dense", "shape": [h, h], "params": {"mode": "add"}}
            tensors[f"{path}.delta"] = torch.randn(h, h, generator=gen) * 0.01
        elif kind == "sparse":
            idx = torch.randperm(h * h, generator=gen)[: h * h // 20].sort().values
            modules[path] = {"kind": "sparse", "shape": [h, h], "params": {"scale": 1.0}}
            tensors[f"{path}.indices"] = idx
            tensors[f"{path}.values"] = torch.randn(idx.numel(), generator=gen) * 0.05
        elif kind == "vector":
            modules[path] = {"kind": "vector", "shape": [h, h], "params": {"op": "scale", "side": "output"}}
            tensors[f"{path}.vector"] = 1 + torch.randn(h, generator=gen) * 0.1
    if kind == "prompt":
        path = "model.embed_tokens"
        modules[path] = {"kind": "prompt", "shape": [model.config.vocab_size, h], "params": {"position": "prefix"}}
        tensors[f"{path}.embeddings"] = torch.randn(3, h, generator=gen) * 0.1
    return modules, tensors


KIND_METHODS = {"lowrank": "lora", "dense": "task_vector", "sparse": "sparse_ft", "vector": "ia3",
                "prompt": "prompt_tuning"}


def step_formats(ctx: DemoContext) -> None:
    """Make an adapter of each delta kind, save it in both file forms, validate, inspect and apply it."""
    gen = torch.Generator().manual_seed(0)
    base_out = ctx.model(ctx.inputs)
    for kind, method in KIND_METHODS.items():
        modules, tensors = _example_tensors(kind, gen, ctx.model)
        adapter = Adapter(new_manifest(method, modules, base={"name": "adapterfmt-tiny", "revision": None,
                                                              "fingerprint": fingerprint_module(ctx.model)},
                                       provenance=[{"tool": "adapterfmt demo"}]), tensors)
        folder = save(adapter, ctx.workdir / f"{kind}-adapter", overwrite=True)
        single = save(adapter, ctx.workdir / f"{kind}.safetensors", overwrite=True)
        loaded = validate(folder)
        validate(single)
        attach(ctx.model, loaded, name=kind)
        out = ctx.model(ctx.inputs)
        detach(ctx.model)
        changed = (out[:, -base_out.shape[1]:] - base_out).abs().max().item()
        info = summarize(loaded)
        ctx.adapters[kind] = folder
        ctx.note("format", kind=kind, method=method, modules=len(info["modules"]), parameters=info["parameters"],
                 bytes=info["file_bytes"], output_change=round(changed, 6))


def default_steps() -> list[Callable[[DemoContext], None]]:
    """The demo's steps in order: every kind saved and applied, then train (a loop of your own, then the
    ``adapter train`` trainer), a multiplicative adapter (OFT), a prompt-space adapter (prompt tuning),
    convert, merge + bake, compress, extract and port. Each capability's step lives beside that capability."""
    from .compress import step_compress
    from .convert import step_convert
    from .merge import step_merge
    from .port import step_extract, step_port
    from .prompt import step_prompt
    from .rotation import step_rotation
    from .train import step_train
    from .trainer import step_train_cli

    return [step_formats, step_train, step_train_cli, step_rotation, step_prompt, step_convert, step_merge,
            step_compress, step_extract, step_port]


def run_demo(workdir: Path | None = None, *, steps: list[Callable[[DemoContext], None]] | None = None) -> DemoContext:
    """Run every demo step in ``workdir`` (a new temp folder by default) and return the context with its report."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="adapterfmt-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = build_tiny(seed=0)
    ctx = DemoContext(workdir, model, save_tiny(model, workdir / "tiny-base"), torch.randint(0, 128, (2, 12)))
    with torch.no_grad():
        for step in steps or default_steps():
            step(ctx)
    return ctx
