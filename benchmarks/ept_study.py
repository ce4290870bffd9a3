"""EPT study: EPT against DePT and prompt tuning at about the same stored size, on a tiny model.

1. Base: ``adapterfmt.tiny`` (hidden 64, 2 layers, vocab 64) trained from scratch on two instructions:
   ``A x1 fA(x1) x2 fA(x2) ...`` and ``B x1 fB(x1) ...`` (``fA(x) = x + 1``, ``fB(x) = 7x + 3``, mod 60;
   the loss on the answers only), ``PRETRAIN`` steps, once.
2. Target task: the B answers *without* the instruction token (the base was never shown an uninstructed
   sequence); the adapter's virtual tokens must stand in for it.
3. Per seed (the adapter's initialisation and the batches), each method trains ``STEPS`` AdamW steps on the
   target task: ``prompt_tuning`` (8 virtual tokens), ``dept`` (5 tokens + rank-2 offset over 12 positions)
   and ``ept`` (DePT's shapes trained through prompt fusion and 4 gated rank-4 spaces, stored as DePT).
   Prompts start from the embeddings of content tokens (``init: tokens``), as PEFT's text init does.

Metric: answer accuracy (argmax at each answer position, teacher-forced) on 512 held-out sequences at
steps 25 / 50 / 100 / ``STEPS``, and the mean step time; mean and sample standard deviation over the seeds.

    python benchmarks/ept_study.py [--seeds 0 1 2] [--steps 150] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

import adapterfmt as af
from adapterfmt.threads import one_thread
from adapterfmt.tiny import TinyConfig, build_tiny

CONTENT, TASK_A, TASK_B, VOCAB = 60, 60, 61, 64
PAIRS = 6
"""(x, f(x)) pairs per sequence: 12 tokens of target sequence."""
PRETRAIN = {"steps": 400, "lr": 3e-3, "batch": 64}
BATCH, LR = 32, 1e-2
CHECKPOINTS = (10, 25, 50)
INIT = {"init": "tokens", "init_token_ids": list(range(8))}
METHODS: dict[str, dict[str, Any]] = {
    "prompt_tuning": {"num_virtual_tokens": 8, **INIT},
    "dept": {"num_virtual_tokens": 5, "r": 2, "max_length": 2 * PAIRS + 1, **INIT},
    "ept": {"num_virtual_tokens": 5, "r": 2, "max_length": 2 * PAIRS + 1, "num_spaces": 4, "space_rank": 4, **INIT},
}


def sequences(n: int, gen: torch.Generator, task: int, answer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, answer mask)``: ``task x1 f(x1) x2 f(x2) ...`` with ``f`` the ``answer`` task's (default: ``task``'s)."""
    x = torch.randint(0, CONTENT, (n, PAIRS), generator=gen)
    fx = (x + 1) % CONTENT if (answer or task) == TASK_A else (7 * x + 3) % CONTENT
    ids = torch.cat([torch.full((n, 1), task), torch.stack([x, fx], 2).reshape(n, 2 * PAIRS)], 1)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 2::2] = True
    return ids, mask


def answer_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])[:, -(ids.shape[1] - 1):]  # the real tokens' positions (a prompt prepends some)
    return F.cross_entropy(logits[mask[:, 1:]], ids[:, 1:][mask[:, 1:]])


@torch.no_grad()
def accuracy(model: torch.nn.Module, held_out: tuple[torch.Tensor, torch.Tensor]) -> float:
    ids, mask = held_out
    logits = model(ids[:, :-1])[:, -(ids.shape[1] - 1):]
    return float((logits.argmax(-1)[mask[:, 1:]] == ids[:, 1:][mask[:, 1:]]).float().mean())


def pretrain() -> torch.nn.Module:
    model = build_tiny(0, TinyConfig(vocab_size=VOCAB, hidden=64, layers=2, heads=4, intermediate=128)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"])
    gen = torch.Generator().manual_seed(0)
    half = PRETRAIN["batch"] // 2
    for _ in range(PRETRAIN["steps"]):
        a, b = sequences(half, gen, TASK_A), sequences(half, gen, TASK_B)
        loss = answer_loss(model, torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def run(base: torch.nn.Module, method: str, seed: int, steps: int, held_out: Any) -> dict[str, Any]:
    cfg = {**METHODS[method], "seed": seed}
    session = af.registry.get_method(method).train(base, config=cfg)
    trainable = sum(p.numel() for p in session.parameters())
    opt = torch.optim.AdamW(session.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(1000 + seed)
    accs, spent = {}, 0.0
    for step in range(1, steps + 1):
        ids, mask = sequences(BATCH, gen, TASK_B, TASK_A)
        t0 = time.perf_counter()
        loss = answer_loss(base, ids, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        spent += time.perf_counter() - t0
        if step in CHECKPOINTS or step == steps:
            accs[step] = accuracy(base, held_out)
    adapter = session.extract()
    session.remove()
    af.attach(base, adapter, name="probe")  # what is stored computes what was trained
    stored_acc = accuracy(base, held_out)
    af.detach(base)
    assert abs(stored_acc - accs[steps]) < 1e-6, (method, stored_acc, accs[steps])
    stored = sum(adapter.tensor(n).numel() for n in adapter.tensor_names())
    return {"method": method, "seed": seed, "trainable": trainable, "stored": stored, "acc": accs,
            "ms_per_step": 1000 * spent / steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with one_thread():
        base = pretrain()
        held_out = sequences(512, torch.Generator().manual_seed(12345), TASK_B, TASK_A)
        base_acc = accuracy(base, held_out)
        rows = [run(base, m, s, args.steps, held_out) for m in METHODS for s in args.seeds]
    if args.json:
        print(json.dumps({"base": base_acc, "rows": rows}, indent=1))
        return
    marks = [*CHECKPOINTS, args.steps]
    print(f"base on the target task: {base_acc:.3f}; {time.perf_counter() - t0:.0f} s")
    print("| method | trainable params | stored params | " + " | ".join(f"acc @{s}" for s in marks)
          + " | ms / step |")
    print("|---|---|---|" + "---|" * (len(marks) + 1))
    for m in METHODS:
        rs = [r for r in rows if r["method"] == m]

        def fmt(vals: list[float], digits: int = 3) -> str:
            return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals) if len(vals) > 1 else 0:.{digits}f}"

        print(f"| {m} | {rs[0]['trainable']} | {rs[0]['stored']} | "
              + " | ".join(fmt([r["acc"][s] for r in rs]) for s in marks)
              + f" | {fmt([r['ms_per_step'] for r in rs], 1)} |")


if __name__ == "__main__":
    main()
