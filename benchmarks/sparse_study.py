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

``--study s2ft``: the same setting, S2FT's dense row / column blocks (kind ``block``) against element-sparse
SpIEL (kind ``sparse``). S2FT at v / o ratio 0.25 (2 of the 8 attention heads: v rows and o columns) and
up / down ratio 0.0625 (16 of the 256 FFN channels), ``coupled`` (v rows share the o columns' heads, up rows the
down columns' channels) or independent draws (the authors' released default); SpIEL (its schedule, all
projections) at the same trainable count and at the same bytes on disk (values fp32 + int64 indices). All with
AdamW at ``--lr``; bytes: the tensor data of the extracted adapter.

``--study lt_sft``: composable SFTs. Two tasks on disjoint halves of the vocabulary so that both can hold at once:
"language" A (``x -> (x + 1) mod 64`` on tokens 0..63) and "task" B (a random table of 64..127 onto itself). From
the same untrained tiny model, ``lt_sft`` (density ``--density``, phase 1 ``--steps`` full fine-tuning steps at
``DENSE_LR``, phase 2 ``--steps`` steps at ``--lr``) learns one SFT per task; ``af.merge_adapters`` (linear,
weights 1, 1) composes them. Next-token accuracy on held-out A and B for each SFT alone and the composition.

``--study hft``: forgetting. The model pretrained on task A, then tuned on task B for ``--steps`` steps (AdamW at
``DENSE_LR``) either fully (every parameter) or by ``hft`` (ratio 0.5, the seed's half of each block's
projections, dense); held-out accuracy on A and B after.

``--study grafting``: theta_pre = the model pretrained on A, theta_ft = it fully fine-tuned on B (``--steps`` at
``DENSE_LR``); ``grafting`` at density ``--density`` over the seven projections, its learned mask (``--epochs``
epochs over 8 training batches, ``mask_lr`` ``--mask-lr``, best epoch by accuracy on a validation batch, the
authors' selection) against magnitude top-k (``epochs: 0``); learned ``enforce_budget`` (the same budget) and
unconstrained (its graft size reported). Held-out accuracy on B of theta_pre + graft.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time
from typing import Any

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


def task_b(seed: int) -> tuple[torch.Tensor, torch.Generator, torch.Tensor]:
    """(next-token table of task B, the training-batch generator, the held-out batch) for ``seed``."""
    gen = torch.Generator().manual_seed(1000 + seed)
    table = torch.randint(0, VOCAB, (VOCAB,), generator=gen)
    return table, gen, batch(table, torch.Generator().manual_seed(99), rows=256)


def finetune(model: torch.nn.Module, session: af.TrainSession, seed: int, args: argparse.Namespace,
             *, schedule: bool = True) -> tuple[float, float]:
    """Train ``session`` on task B for ``args.steps`` steps; held-out (loss, next-token accuracy). ``schedule``:
    call its step hook."""
    table, gen, held = task_b(seed)
    opt = session.optimizer(lr=args.lr)
    for _ in range(args.steps):
        opt.zero_grad()
        loss(model, batch(table, gen)).backward()
        opt.step()
        if schedule:
            session.step(opt)
    with torch.no_grad():
        hit = model(held[:, :-1]).argmax(-1) == held[:, 1:]
        return float(loss(model, held)), float(hit.float().mean())


def spiel_session(model: torch.nn.Module, seed: int, args: argparse.Namespace, *, reselect: bool = True,
                  **budget: Any) -> af.TrainSession:
    schedule = {"reselection_steps": 20 if reselect else args.steps + 10, "selection_accumulation_steps": 5}
    return af.registry.get_method("spiel").train(model, config={
        "target_modules": TARGETS, "total_steps": args.steps, "seed": seed, **schedule, **budget})


def run(arm: str, seed: int, args: argparse.Namespace) -> float:
    model = copy.deepcopy(pretrained(seed, args.pretrain))
    session = spiel_session(model, seed, args, reselect=arm == "spiel", density=0.01)
    return finetune(model, session, seed, args, schedule=arm != "static random")[0]


S2FT_RATIOS = {"v_ratio": 0.25, "o_ratio": 0.25, "u_ratio": 0.0625, "d_ratio": 0.0625}


def run_s2ft(arm: str, seed: int, args: argparse.Namespace,
             budget: dict[str, int]) -> tuple[float, float, int, int]:
    """(held-out loss, accuracy, trained values, bytes) of one arm; ``budget`` holds the S2FT arm's values and bytes."""
    model = copy.deepcopy(pretrained(seed, args.pretrain))
    if arm.startswith("s2ft"):
        config = {**S2FT_RATIOS, "coupled": arm == "s2ft coupled", "seed": seed}
        session = af.registry.get_method("s2ft").train(model, config=config)
    elif arm == "spiel, same values":
        session = spiel_session(model, seed, args, num_tunable_weights=budget["values"])
    else:  # same bytes: 4 (fp32 value) + 8 (int64 index) per entry
        session = spiel_session(model, seed, args, num_tunable_weights=budget["bytes"] // 12)
    held_loss, accuracy = finetune(model, session, seed, args)
    values, size = sum(p.numel() for p in session.parameters()), session.extract().nbytes()
    if arm == "s2ft coupled":
        budget.update(values=values, bytes=size)
    return held_loss, accuracy, values, size


def s2ft_study(args: argparse.Namespace) -> None:
    print("| arm | trained values | bytes | held-out loss, task B | accuracy | loss per seed |")
    print("|---|---:|---:|---|---|---|")
    rows: dict[str, list[tuple[float, float, int, int]]] = {}
    for seed in range(args.seeds):
        budget: dict[str, int] = {}
        for arm in ("s2ft coupled", "s2ft independent", "spiel, same values", "spiel, same bytes"):
            rows.setdefault(arm, []).append(run_s2ft(arm, seed, args, budget))
    for arm, runs in rows.items():
        losses, accs = [r[0] for r in runs], [r[1] for r in runs]
        print(f"| {arm} | {statistics.mean(r[2] for r in runs):,.0f} | {statistics.mean(r[3] for r in runs):,.0f} | "
              f"{mean_spread(losses, 3)} | {mean_spread(accs, 3)} | {', '.join(f'{x:.3f}' for x in losses)} |")


def mean_spread(xs: list[float], digits: int) -> str:
    """``mean ± sample std`` (0 for one value)."""
    spread = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.{digits}f} ± {spread:.{digits}f}"


DENSE_LR = 3e-3


def accuracy(model: torch.nn.Module, held: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(held[:, :-1]).argmax(-1) == held[:, 1:]).float().mean())


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, table: torch.Tensor, gen: torch.Generator,
                steps: int, span: tuple[int, int] = (0, VOCAB)) -> None:
    for _ in range(steps):
        opt.zero_grad()
        loss(model, span_batch(table, gen, span)).backward()
        opt.step()


def span_batch(table: torch.Tensor, gen: torch.Generator, span: tuple[int, int], rows: int = 32) -> torch.Tensor:
    """A batch of ``table``'s chains starting in ``span`` (a table maps its span onto itself)."""
    seq = [torch.randint(*span, (rows,), generator=gen)]
    for _ in range(16):
        seq.append(table[seq[-1]])
    return torch.stack(seq, 1)


def half_tasks(seed: int) -> dict[str, tuple[torch.Tensor, tuple[int, int]]]:
    """The composition study's tasks: A on tokens 0..63, B on 64..127 (identity elsewhere)."""
    a, b = torch.arange(VOCAB), torch.arange(VOCAB)
    a[:64] = (torch.arange(64) + 1) % 64
    b[64:] = 64 + torch.randint(0, 64, (64,), generator=torch.Generator().manual_seed(1000 + seed))
    return {"A": (a, (0, 64)), "B": (b, (64, VOCAB))}


def lt_sft_study(args: argparse.Namespace) -> None:
    arms = ("base", "language SFT (A)", "task SFT (B)", "composed A + B")
    rows: dict[str, list[tuple[float, float]]] = {arm: [] for arm in arms}
    for seed in range(args.seeds):
        base = build_tiny(seed, TinyConfig(vocab_size=VOCAB, hidden=64, layers=2, heads=4, intermediate=128))
        tasks = half_tasks(seed)
        held = {t: span_batch(table, torch.Generator().manual_seed(99), span, rows=256)
                for t, (table, span) in tasks.items()}
        sfts = []
        for table, span in tasks.values():
            model = copy.deepcopy(base)
            gen = torch.Generator().manual_seed(seed * 10 + len(sfts))
            session = af.registry.get_method("lt_sft").train(model, config={
                "target_modules": TARGETS, "density": args.density, "full_ft_steps": args.steps,
                "full_ft_lr": DENSE_LR}, loss_fn=loss, batches=[span_batch(table, gen, span) for _ in range(args.steps)])
            train_steps(model, session.optimizer(lr=args.lr), table, gen, args.steps, span)
            sfts.append(session.extract())
        for arm, adapters in zip(arms, ([], sfts[:1], sfts[1:], [af.merge_adapters(sfts, weights=[1, 1])])):
            model = copy.deepcopy(base)
            for adapter in adapters:
                af.attach(model, adapter)
            rows[arm].append((accuracy(model, held["A"]), accuracy(model, held["B"])))
    print(f"| model (density {args.density}) | accuracy, A | accuracy, B |")
    print("|---|---|---|")
    for arm, runs in rows.items():
        print(f"| {arm} | {mean_spread([r[0] for r in runs], 3)} | {mean_spread([r[1] for r in runs], 3)} |")


def hft_study(args: argparse.Namespace) -> None:
    held_a = batch((torch.arange(VOCAB) + 1) % VOCAB, torch.Generator().manual_seed(98), rows=256)
    print("| tuned on B | accuracy on A after | accuracy on B after |")
    print("|---|---|---|")
    for arm in ("pretrained (before)", "full fine-tuning", "hft (ratio 0.5)"):
        a, b = [], []
        for seed in range(args.seeds):
            model = copy.deepcopy(pretrained(seed, args.pretrain))
            table, gen, held = task_b(seed)
            if arm == "full fine-tuning":
                train_steps(model, torch.optim.AdamW(model.parameters(), lr=DENSE_LR), table, gen, args.steps)
            elif arm.startswith("hft"):
                session = af.registry.get_method("hft").train(model, config={"seed": seed})
                train_steps(model, session.optimizer(lr=DENSE_LR), table, gen, args.steps)
            a.append(accuracy(model, held_a))
            b.append(accuracy(model, held))
        print(f"| {arm} | {mean_spread(a, 3)} | {mean_spread(b, 3)} |")


def grafting_study(args: argparse.Namespace) -> None:
    arms = {"magnitude top-k (epochs 0)": {"epochs": 0},
            "learned mask, same budget": {"epochs": args.epochs, "enforce_budget": True},
            "learned mask, unconstrained": {"epochs": args.epochs}}
    rows: dict[str, list[tuple[float, int]]] = {arm: [] for arm in ("theta_pre", "theta_ft", *arms)}
    for seed in range(args.seeds):
        pre = pretrained(seed, args.pretrain)
        table, gen, held = task_b(seed)
        ft = copy.deepcopy(pre)
        train_steps(ft, torch.optim.AdamW(ft.parameters(), lr=DENSE_LR), table, gen, args.steps)
        rows["theta_pre"].append((accuracy(pre, held), 0))
        rows["theta_ft"].append((accuracy(ft, held), 0))
        data = [batch(table, gen) for _ in range(8)]
        valid = batch(table, gen, rows=128)
        for arm, extra in arms.items():
            model = copy.deepcopy(pre)
            config = {"target_modules": TARGETS, "density": args.density, "mask_lr": args.mask_lr, "seed": seed,
                      **extra}
            session = af.registry.get_method("grafting").train(
                model, config=config, finetuned=ft, loss_fn=loss, batches=data,
                score_fn=functools.partial(accuracy, held=valid))
            rows[arm].append((accuracy(model, held), session.config["graft_size"]))
    print(f"| theta_pre + graft (density {args.density}) | entries | accuracy on B |")
    print("|---|---:|---|")
    for arm, runs in rows.items():
        print(f"| {arm} | {statistics.mean(r[1] for r in runs):,.0f} | {mean_spread([r[0] for r in runs], 3)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--study", choices=["spiel", "s2ft", "lt_sft", "hft", "grafting"], default="spiel")
    ap.add_argument("--density", type=float, default=0.01, help="lt_sft and grafting budget")
    ap.add_argument("--epochs", type=int, default=10, help="grafting's mask-learning epochs")
    ap.add_argument("--mask-lr", type=float, default=1e7, help="grafting's mask learning rate")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--pretrain", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    studies = {"s2ft": s2ft_study, "lt_sft": lt_sft_study, "hft": hft_study, "grafting": grafting_study}
    studies.get(args.study, spiel_study)(args)
    print(f"({time.time() - t0:.0f} s)")


def spiel_study(args: argparse.Namespace) -> None:
    print("| arm (1% of parameters) | held-out loss, task B | per seed |")
    print("|---|---|---|")
    for arm in ("spiel", "static gradient", "static random"):
        losses = [run(arm, s, args) for s in range(args.seeds)]
        print(f"| {arm} | {mean_spread(losses, 3)} | {', '.join(f'{x:.3f}' for x in losses)} |")


if __name__ == "__main__":
    main()
