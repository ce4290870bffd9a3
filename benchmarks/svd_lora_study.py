"""SVD-structured LoRA study (issue 15): loss at fixed steps for LoRA, PiSSA, SORSA, KaSA, LoLDU and IntTune on
the tiny Llama (adapterfmt.tiny), pretrained on one task and tuned on another, at (near) equal trainable
parameter budgets where the method allows; bytes on disk of each adapter. CPU, a few minutes.

Task A (pretraining, full fine-tuning of the random tiny model): next token = (x + 1) mod V.
Task B (adaptation, attention and MLP projections targeted): next token = (3 x + 5) mod V.
Budgets on the 64-wide model: LoRA / PiSSA r = 4 (512 per 64x64 map), SORSA / KaSA r = 4 (+4), IntTune
r = 22 (r^2 = 484), LoLDU r = 64 (64 per map: the whole diagonal, about 1/8 of LoRA's budget).

    python benchmarks/svd_lora_study.py [--seeds 3] [--steps 150]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import adapterfmt as af
from adapterfmt.plugin.registry import get_method
from adapterfmt.tiny import TinyConfig, build_tiny

CFG = TinyConfig(vocab_size=64, hidden=64, layers=2, heads=4, intermediate=128)
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
METHODS = {  # name: (method, config)
    "LoRA r4": ("lora", {"r": 4, "alpha": 8}),
    "PiSSA r4": ("pissa", {"r": 4, "alpha": 4}),
    "SORSA r4": ("sorsa", {"r": 4}),
    "KaSA r4": ("kasa", {"r": 4, "alpha": 8}),
    "IntTune r22": ("inttune", {"r": 22, "alpha": 22}),
    "LoLDU r64": ("loldu", {"r": 64, "alpha": 64}),
}
CHECKPOINTS = (25, 50, 100, 150)


def batch(task: str, gen: torch.Generator, n: int = 32, t: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, CFG.vocab_size, (n, t), generator=gen)
    y = (x + 1) % CFG.vocab_size if task == "A" else (3 * x + 5) % CFG.vocab_size
    return x, y


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def pretrained(seed: int, steps: int = 300) -> torch.nn.Module:
    model = build_tiny(seed, CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1000 + seed)
    for _ in range(steps):
        x, y = batch("A", gen)
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
    return model


def run(method: str, config: dict, base: torch.nn.Module, seed: int, steps: int, lr: float
        ) -> tuple[dict[int, float], int, int]:
    import copy

    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    session = get_method(method).train(model, config={"target_modules": TARGETS, **config})
    params = sum(p.numel() for p in session.parameters())
    opt = torch.optim.AdamW(session.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(2000 + seed)
    xe, ye = batch("B", torch.Generator().manual_seed(99), n=128)
    curve = {}
    for step in range(1, steps + 1):
        x, y = batch("B", gen)
        opt.zero_grad()
        (loss_of(model, x, y) + session.regularization()).backward()
        opt.step()
        session.step(opt)
        if step in CHECKPOINTS:
            with torch.no_grad():
                curve[step] = float(loss_of(model, xe, ye))
    with tempfile.TemporaryDirectory() as tmp:
        size = af.save(session.extract(), Path(tmp) / "a.safetensors").stat().st_size
    session.remove()
    return curve, params, size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=5e-3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results: dict[str, list[dict[int, float]]] = {k: [] for k in METHODS}
    meta: dict[str, tuple[int, int]] = {}
    for seed in range(args.seeds):
        base = pretrained(seed)
        for name, (method, config) in METHODS.items():
            curve, params, size = run(method, config, base, seed, args.steps, args.lr)
            results[name].append(curve)
            meta[name] = (params, size)
    steps = [s for s in CHECKPOINTS if s <= args.steps]
    print("| method | trainable params | file bytes | " + " | ".join(f"loss @{s}" for s in steps) + " |")
    print("|---|---|---|" + "---|" * len(steps))
    for name, curves in results.items():
        cells = []
        for s in steps:
            v = [c[s] for c in curves]
            cells.append(f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0:.3f}")
        print(f"| {name} | {meta[name][0]} | {meta[name][1]} | " + " | ".join(cells) + " |")
    print(f"\n{args.seeds} seeds, {args.steps} steps, lr {args.lr}, {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
