"""MeteoRA study: three task LoRAs embedded in one model with a router trained on frozen experts (kind ``mixture``,
the ``mixture`` method's train verb, MeteoRA's recipe: LM loss + 50 x the gate cross-entropy against each
sequence's task, top-2, T = 1).

Per seed, on a random tiny Llama (``adapterfmt.tiny``: 2 layers, hidden 64, vocabulary 128 = ASCII):

1. three LoRAs (r=8, alpha 16, all linear maps, ``LORA_STEPS`` Adam steps), one per synthetic task; each
   sequence is ``LENGTH`` tokens following its task's rule from a random first token (next-token tasks);
2. a router per module (``ROUTER_STEPS`` Adam steps at ``ROUTER_LR``) on the frozen experts, two ways:
   ``meteora``: batches mixing the three tasks, each sequence one task labelled for the gate loss (MeteoRA's
   training data); ``composite``: the same, but half the sequences switch task halfway, labelled per token;
3. evaluation on held-out sequences: next-token accuracy (positions 1.., greedy argmax = the rule's token) of
   the base, each task's own LoRA, each trained mixture, and the experts averaged (the same mixture with a
   zero router and top-3: every expert at weight 1/3, the untrained way to hold three LoRAs at once);
4. switching: sequences whose first half follows task A and second half task B (all 6 ordered pairs): the
   fraction of (position, module) pairs whose top-1 expert is the task of the token it predicts (first
   half: A; second half: B, from the first B token on), and the mixture's accuracy per half.

Two task sets: ``disjoint`` (each task on its own characters: lower-case +1, digits +3, upper-case -1, so
a token's identity names its task) and ``shared`` (the three rules on the same lower-case letters: +1, +3, -1,
so only the context tells them apart: the router must read it from the hidden states).

    python benchmarks/meteora_study.py [--seeds 0 1 2] [--sets disjoint shared] [--json PATH]

(default: ``--sets disjoint``, about 2-3 minutes on the shared 2-core machine).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import time
from typing import Any

import torch
from adapterfmt.plugins.methods.mixture import mixture_adapter

import adapterfmt as af
from adapterfmt.tiny import build_tiny
from adapterfmt.verbs.trainer import mean_loss

LENGTH, BATCH, EVAL = 16, 16, 48
LORA_STEPS, ROUTER_STEPS, LR, ROUTER_LR = 80, 150, 1e-2, 1e-1
"""Adam steps and learning rates (the routers start at N(0, 1) as MeteoRA's gates and need the larger rate)."""
TASKS = {
    "disjoint": {"succ": (ord("a"), 26, 1), "skip3": (ord("0"), 10, 3), "pred": (ord("A"), 26, -1)},
    "shared": {"succ": (ord("a"), 26, 1), "skip3": (ord("a"), 26, 3), "pred": (ord("a"), 26, -1)},
}
"""Per task set: task -> (first character, alphabet size, step): token t+1 = start + (token t - start + step) % size."""


def sequences(rule: tuple[int, int, int], n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    start, size, step = rule
    first = torch.randint(0, size, (n, 1), generator=gen)
    return start + (first + step * torch.arange(length)) % size


def accuracy(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Greedy next-token accuracy at positions 1.. (``mask`` [n, length - 1]: which predictions count)."""
    with torch.no_grad():
        logits = model(ids)
    hit = (logits[:, :-1].argmax(-1) == ids[:, 1:]).float()
    return float(hit.mean()) if mask is None else float(hit[mask].mean())


def train_lora(base: torch.nn.Module, rule: tuple[int, int, int], gen: torch.Generator) -> af.Adapter:
    model = copy.deepcopy(base)
    session = af.registry.verb("lora", "train")(model, config={"target_modules": "all-linear", "r": 8, "alpha": 16})
    opt = session.optimizer(lr=LR)
    for _ in range(LORA_STEPS):
        ids = sequences(rule, BATCH, LENGTH, gen)
        loss = mean_loss(model, (ids, ids))
        opt.zero_grad()
        loss.backward()
        opt.step()
    adapter = session.extract()
    session.remove()
    return adapter


def two_task(rules: list[tuple[int, int, int]], a: int, b: int, n: int,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences whose first half follows task ``a`` and second half task ``b``, and each token's task."""
    half = LENGTH // 2
    ids = torch.cat([sequences(rules[a], n, half, gen), sequences(rules[b], n, LENGTH - half, gen)], dim=1)
    return ids, torch.cat([torch.full((n, half), a), torch.full((n, LENGTH - half), b)], dim=1)


def train_router(base: torch.nn.Module, experts: dict[str, af.Adapter], rules: list[tuple[int, int, int]],
                 gen: torch.Generator, composite: bool) -> tuple[af.Adapter, list[float]]:
    """MeteoRA's recipe on batches mixing the tasks, each sequence one task (``composite``: half the sequences
    switch task halfway, labelled per token); returns the mixture and the gate loss every 50 steps."""
    model = copy.deepcopy(base)
    session = af.registry.verb("mixture", "train")(model, config={"train": "router"}, experts=experts)
    opt = session.optimizer(lr=ROUTER_LR)
    trace = []
    for step in range(ROUTER_STEPS):
        rows = []
        for i in range(BATCH):
            a, b = torch.randint(0, len(rules), (2,), generator=gen).tolist()
            rows.append(two_task(rules, a, b if composite and i % 2 else a, 1, gen))
        ids, tasks = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
        lm = mean_loss(model, (ids, ids))
        gate = session.regularization(task_ids=tasks)
        opt.zero_grad()
        (lm + gate).backward()
        opt.step()
        if step % 50 == 0 or step == ROUTER_STEPS - 1:
            trace.append(float(gate.detach()) / 50.0)
    mix = session.extract()
    session.remove()
    return mix, trace


def routed_fraction(model: torch.nn.Module, mix: af.Adapter, ids: torch.Tensor,
                    want: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per routed module: ``[n, length - 1]`` booleans, the top-1 expert at position t == ``want[:, t + 1]``."""
    inputs: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(p).register_forward_pre_hook(lambda m, a, p=p: inputs.update({p: a[0]}))
               for p in mix.modules]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return {p: (inputs[p] @ mix.tensor(f"{p}.router").t()).argmax(-1)[:, :-1] == want[:, 1:] for p in mix.modules}


def group(path: str) -> str:
    """``layer N q/k/v`` (inputs: the token's own state) or ``layer N o/mlp`` (after attention)."""
    layer, proj = path.split(".")[2], path.rsplit(".", 1)[-1]
    return f"layer {layer} {'q/k/v' if proj in ('q_proj', 'k_proj', 'v_proj') else 'o/mlp'}"


def evaluate(base: torch.nn.Module, mix: af.Adapter, rules: list[tuple[int, int, int]], seed: int) -> dict[str, Any]:
    """Single-task accuracy and routing; switching inside two-task sequences (all ordered pairs)."""
    model = copy.deepcopy(base)
    af.attach(model, mix)
    model.eval()
    out: dict[str, Any] = {"accuracy": [], "routed": []}
    for i, rule in enumerate(rules):
        ids = sequences(rule, EVAL, LENGTH, torch.Generator().manual_seed(1000 + seed * 10 + i))
        out["accuracy"].append(accuracy(model, ids))
        hits = routed_fraction(model, mix, ids, torch.full_like(ids, i))
        out["routed"].append(float(torch.stack([h.float().mean() for h in hits.values()]).mean()))
    half = LENGTH // 2
    first, second, acc1, acc2, groups = [], [], [], [], {}
    for a, b in itertools.permutations(range(len(rules)), 2):
        ids, want = two_task(rules, a, b, EVAL // 6, torch.Generator().manual_seed(2000 + seed * 10 + a * 3 + b))
        for p, h in routed_fraction(model, mix, ids, want).items():
            first.append(h[:, : half - 1].float().mean())
            second.append(h[:, half:].float().mean())  # predicting tokens half+1..: B tokens after a B token
            groups.setdefault(group(p), []).append(h[:, half:].float().mean())
        m1 = torch.zeros(ids.shape[0], LENGTH - 1, dtype=torch.bool)
        m1[:, : half - 1] = True
        m2 = torch.zeros_like(m1)
        m2[:, half:] = True  # the first B token follows an A token: its value is not predictable
        acc1.append(accuracy(model, ids, m1))
        acc2.append(accuracy(model, ids, m2))
    out["switch"] = {"routed_first_half": float(torch.stack(first).mean()),
                     "routed_second_half": float(torch.stack(second).mean()),
                     "routed_second_half_by_group": {k: float(torch.stack(v).mean()) for k, v in groups.items()},
                     "accuracy_first_half": statistics.mean(acc1), "accuracy_second_half": statistics.mean(acc2)}
    return out


def run(task_set: str, seed: int) -> dict[str, Any]:
    rules = list(TASKS[task_set].values())
    names = list(TASKS[task_set])
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    base = build_tiny(seed)
    experts = {name: train_lora(base, rule, gen) for name, rule in zip(names, rules, strict=True)}
    out: dict[str, Any] = {"seed": seed, "base": [], "own": [], "averaged": []}
    for i, rule in enumerate(rules):
        ids = sequences(rule, EVAL, LENGTH, torch.Generator().manual_seed(1000 + seed * 10 + i))
        own = copy.deepcopy(base)
        af.attach(own, experts[names[i]])
        out["base"].append(accuracy(base.eval(), ids))
        out["own"].append(accuracy(own.eval(), ids))
    for variant, composite in (("meteora", False), ("composite", True)):
        mix, trace = train_router(base, experts, rules, gen, composite)
        out[variant] = {**evaluate(base, mix, rules, seed), "gate_loss": trace}
    zero = {p: torch.zeros_like(mix.tensor(f"{p}.router")) for p in mix.modules}
    averaged = copy.deepcopy(base)
    af.attach(averaged, mixture_adapter(experts, zero, top_k=len(names)))
    for i, rule in enumerate(rules):
        ids = sequences(rule, EVAL, LENGTH, torch.Generator().manual_seed(1000 + seed * 10 + i))
        out["averaged"].append(accuracy(averaged.eval(), ids))
    return out


def summary(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


VARIANTS = {"meteora": "router on single-task sequences (MeteoRA)",
            "composite": "router, half the sequences switching task (per-token labels)"}


def report(task_set: str, runs: list[dict[str, Any]]) -> str:
    names = list(TASKS[task_set])
    lines = [f"### {task_set}", "", ("Next-token accuracy on held-out single-task sequences (routed: the fraction of "
                                     "(position, module) pairs whose top-1 expert is the task's):"), "",
             "| task | base | own LoRA | experts averaged | " + " | ".join(
                 f"mixture, {v} | routed, {v}" for v in VARIANTS) + " |", "|---|" + "---|" * (3 + 2 * len(VARIANTS))]
    for i, n in enumerate(names):
        cells = [summary([r[k][i] for r in runs]) for k in ("base", "own", "averaged")]
        for v in VARIANTS:
            cells += [summary([r[v]["accuracy"][i] for r in runs]), summary([r[v]["routed"][i] for r in runs])]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "Switching inside one sequence (first half task A, second half task B, all 6 ordered pairs):", "",
              ("| router | routed right, first half | routed right, second half | accuracy, first half | "
               "accuracy, second half |"), "|---|---|---|---|---|"]
    for v, label in VARIANTS.items():
        s = [r[v]["switch"] for r in runs]
        lines.append(f"| {label} | " + " | ".join(summary([x[k] for x in s]) for k in (
            "routed_first_half", "routed_second_half", "accuracy_first_half", "accuracy_second_half")) + " |")
    for v in VARIANTS:
        s = [r[v]["switch"]["routed_second_half_by_group"] for r in runs]
        lines.append(f"\n{v}: second half routed right by module group: " + ", ".join(
            f"{k} {summary([x[k] for x in s])}" for k in sorted(s[0])))
        lines.append(f"{v}: gate loss (CE per token at steps 0, 50, 100, last; seed {runs[0]['seed']}): "
                     + ", ".join(f"{x:.3f}" for x in runs[0][v]["gate_loss"]))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sets", nargs="+", choices=list(TASKS), default=["disjoint"])
    ap.add_argument("--json", help="write every run's figures here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    started, results = time.perf_counter(), {}
    for task_set in args.sets:
        results[task_set] = [run(task_set, s) for s in args.seeds]
        print(report(task_set, results[task_set]) + "\n", flush=True)
    print(f"wall {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
