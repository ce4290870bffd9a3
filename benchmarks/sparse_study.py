"""SpIEL's prune / regrow against static masks at the same 1% budget, 3 seeds (mean ± sample std).

Tiny Llama (``adapterfmt.tiny``: hidden 64, 2 layers, vocab 128), first trained fully for ``--pretrain`` steps on
task A (next token ``(x + 1) mod 128``), then sparse-fine-tuned on task B (a fixed random next-token table) with
every projection targeted and SpIEL's budget (1% of all parameters, split by size). Arms, all through the
``spiel`` method and its AdamW (lr ``--lr``), ``--steps`` steps, batch 32 x 16:

- ``spiel``: the schedule (reselection every 20 steps, 5 accumulation steps, rate 0.2 linear decay);
- ``static gradient``: one selection phase (the first 5 steps' accumulated gradients replace the random mask),
  then no reselection;
- ``static random``: the random initial mask kept.

Loss of task B on a held-out batch of 256 at the end. ``python benchmarks/sparse_study.py [--seeds 3]``
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time

import torch
import torch.nn.functional as F

import adapterfmt as af
from adapterfmt.tiny import TinyConfig, build_tiny

VOCAB = 128
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batch(table: torch.Tensor, gen: torch.Generator, rows: int = 32, length: int = 16) -> torch.Tensor:
    seq = [torch.randint(0, VOCAB, (rows,), generator=gen)]
    for _ in range(length):
        seq.append(table[seq[-1]])
    return torch.stack(seq, 1)


def loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(ids[:, :-1]).reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


@functools.cache
def pretrained(seed: int, steps: int) -> torch.nn.Module:
    model = build_tiny(seed, TinyConfig(vocab_size=VOCAB, hidden=64, layers=2, heads=4, intermediate=128))
    gen = torch.Generator().manual_seed(seed)
    table = (torch.arange(VOCAB) + 1) % VOCAB
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        loss(model, batch(table, gen)).backward()
        opt.step()
    return model


def run(arm: str, seed: int, args: argparse.Namespace) -> float:
    model = copy.deepcopy(pretrained(seed, args.pretrain))
    gen = torch.Generator().manual_seed(1000 + seed)
    table = torch.randint(0, VOCAB, (VOCAB,), generator=gen)
    held = batch(table, torch.Generator().manual_seed(99), rows=256)
    schedule = {"reselection_steps": 20, "selection_accumulation_steps": 5} if arm == "spiel" else \
        {"reselection_steps": args.steps + 10, "selection_accumulation_steps": 5}
    session = af.registry.get_method("spiel").train(model, config={
        "target_modules": TARGETS, "density": 0.01, "total_steps": args.steps, "seed": seed, **schedule})
    opt = session.optimizer(lr=args.lr)
    for _ in range(args.steps):
        opt.zero_grad()
        loss(model, batch(table, gen)).backward()
        opt.step()
        if arm != "static random":
            session.step(opt)
    with torch.no_grad():
        return float(loss(model, held))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--pretrain", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    print("| arm (1% of parameters) | held-out loss, task B | per seed |")
    print("|---|---|---|")
    for arm in ("spiel", "static gradient", "static random"):
        losses = [run(arm, s, args) for s in range(args.seeds)]
        spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
        print(f"| {arm} | {statistics.mean(losses):.3f} ± {spread:.3f} | {', '.join(f'{x:.3f}' for x in losses)} |")
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
