"""Quantised-base study (issue 20): the tiny Llama (adapterfmt.tiny) pretrained on task A, its projections
RTN-quantised (per output channel, asymmetric; spec 6.12) to 4, 3 and 2 bits. CPU, a few minutes.

1. Accuracy drop on task A from quantisation, and what PEQA (``peqa``: only the scale ratios trained, on
   task A data) recovers.
2. Adaptation to task B with a deployed 3- / 4-bit model: LoRA trained on the float base, merged, then
   RTN-quantised ("LoRA then PTQ"), against L4Q (``l4q``: LoRA and step sizes trained through the rounding).

Task A: next token = x_{t-1} (copy the previous token); task B: (x_{t-1} + 1) mod V (x_{-1} = 0). Accuracy =
next-token argmax on 512 held-out sequences of 16, with the cross-entropy beside it. Bytes = the adapter file (single-file form).

    python benchmarks/quant_study.py [--seeds 3] [--steps 150] [--bits 4 3 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from adapterfmt.plugins.methods.quant import quantize_model

import adapterfmt as af
from adapterfmt.plugin.registry import get_method
from adapterfmt.tiny import TinyConfig, build_tiny

CFG = TinyConfig(vocab_size=64, hidden=64, layers=2, heads=4, intermediate=128)
TARGETS = {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def batch(task: str, gen: torch.Generator, n: int = 32, t: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, CFG.vocab_size, (n, t), generator=gen)
    prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
    return x, (prev if task == "A" else (prev + 1)) % CFG.vocab_size


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    z = logits(model, x)
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1))


@torch.no_grad()
def accuracy(model: torch.nn.Module, task: str) -> tuple[float, float]:
    """(accuracy, cross-entropy) on the held-out batch."""
    x, y = batch(task, torch.Generator().manual_seed(99), n=512)
    return float((logits(model, x).argmax(-1) == y).float().mean()), float(loss_of(model, x, y))


def pretrained(seed: int, steps: int = 600) -> torch.nn.Module:
    model = build_tiny(seed, CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1000 + seed)
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model, *batch("A", gen)).backward()
        opt.step()
    return model


def tune(method: str, config: dict, base: torch.nn.Module, task: str, seed: int, steps: int, lr: float
         ) -> tuple[af.Adapter, int]:
    """Train ``method`` on ``task``; returns the adapter and its file size in bytes."""
    torch.manual_seed(seed)
    session = get_method(method).train(copy.deepcopy(base), config={**TARGETS, **config})
    opt = torch.optim.AdamW(session.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(2000 + seed)
    for _ in range(steps):
        opt.zero_grad()
        loss_of(session.model, *batch(task, gen)).backward()
        opt.step()
    adapter = session.extract()
    session.remove()
    with tempfile.TemporaryDirectory() as tmp:
        size = af.save(adapter, Path(tmp) / "a.safetensors").stat().st_size
    return adapter, size


def merged(base: torch.nn.Module, adapter: af.Adapter) -> torch.nn.Module:
    model = copy.deepcopy(base)
    af.attach(model, adapter, merge=True, force=True)
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=2e-2, help="learning rate of LoRA and L4Q on task B")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows: dict[str, list[tuple[float, float]]] = {}
    size: dict[str, int] = {}

    def record(name: str, value: tuple[float, float], nbytes: int | None = None) -> None:
        rows.setdefault(name, []).append(value)
        if nbytes is not None:
            size[name] = nbytes

    for seed in range(args.seeds):
        base = pretrained(seed)
        record("A: float base", accuracy(base, "A"))
        lora, nbytes = tune("lora", {"r": 4, "alpha": 8}, base, "B", seed, args.steps, args.lr)
        record("B: float base + LoRA r4 (no quantisation)", accuracy(merged(base, lora), "B"), nbytes)
        for bits in args.bits:
            spec = af.QuantSpec(bits, None, "asymmetric")
            quant = copy.deepcopy(base)
            quantize_model(quant, spec, TARGETS)
            record(f"A: RTN {bits}-bit", accuracy(quant, "A"))
            grid = {"bits": bits, "group_size": None, "zero_point": "asymmetric"}
            peqa, nbytes = tune("peqa", grid, quant, "A", seed, args.steps, 1e-2)
            record(f"A: RTN {bits}-bit + PEQA", accuracy(merged(quant, peqa), "A"), nbytes)
            ptq = merged(base, lora)
            quantize_model(ptq, spec, TARGETS)
            record(f"B: LoRA r4 then RTN {bits}-bit", accuracy(ptq, "B"))
            l4q, nbytes = tune("l4q", {**grid, "r": 4, "alpha": 8}, base, "B", seed, args.steps, args.lr)
            record(f"B: L4Q r4 {bits}-bit", accuracy(merged(base, l4q), "B"), nbytes)
    print("| setting | accuracy (mean ± sd) | cross-entropy (mean ± sd) | adapter bytes |")
    print("|---|---|---|---|")
    for name, v in rows.items():
        cells = []
        for i in (0, 1):
            col = [r[i] for r in v]
            cells.append(f"{statistics.mean(col):.3f} ± {statistics.stdev(col) if len(col) > 1 else 0.0:.3f}")
        print(f"| {name} | {cells[0]} | {cells[1]} | {size.get(name, '')} |")
    print(f"\n{args.seeds} seeds, {args.steps} steps, lr {args.lr} (PEQA 1e-2), {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
