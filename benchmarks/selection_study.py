"""IST, GreenTrainer and Light-PEFT against plain LoRA at an equal trainable-parameter budget (CPU, minutes).

Setup, per seed (the seed drives the base, both tasks, the data order and every initialisation):

1. Base: the tiny Llama of ``adapterfmt.tiny`` (4 blocks, hidden 64, 4 heads, FFN 128, vocabulary 128), fully
   trained ``PRETRAIN`` AdamW steps on task A: sequences of a random sparse Markov chain over 64 tokens.
2. Target task B: another random chain over the same tokens. Every method trains ``STEPS`` steps (batches of
   16 sequences of 16 predicted tokens, the same batches for every method), AdamW, constant lr ``LR`` for every
   method (``--dense-lr`` sets GreenTrainer's whole tensors' apart; no sweep). Metric: mean next-token loss on 64
   held-out task-B sequences (lower is better; the chain's entropy is the floor).
3. Studies (``--study``):
   - ``ist``: IST (LoRA r=8 on all linear layers, 25% of the blocks per step, score updates every 10 steps on
     the next of 4 calibration batches) against LoRA r=8 (the same parameters, all trained each step) and RST
     (IST with ``update_interval: 0``: uniform block draws).
   - ``greentrainer``: GreenTrainer at ``rho`` 0.5 (tensors chosen on the first batch) against LoRA on all linear
     layers with the rank that gives the same number of trainable parameters; beside each, the modelled cost of
     a step (forward + backward FLOPs, GreenTrainer's own model) as a fraction of a full fine-tuning step. The
     LoRA's backward runs the activation gradients through every block (its modules reach block 0).
   - ``light_peft``: Light-PEFT (LoRA r=8 on q/v, the reference script's ratios: 1/3 of the heads and FFN
     channels, 75% of the LoRA modules, 50% of the ranks pruned) estimated on the first ``ESTIMATE`` batches,
     then trained for the rest (so ``STEPS`` in all), against LoRA on q/v with the rank that matches its final
     trainable parameters and against the unpruned LoRA r=8 (the "original PEFT"). Beside: the share of the
     base's attention + FFN weights removed.

Mean and sample standard deviation over the seeds.

    python benchmarks/selection_study.py [--study all|ist|greentrainer|light_peft] [--seeds 0 1 2] [--dense-lr X] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

import adapterfmt as af
from adapterfmt.tiny import TinyConfig, build_tiny
from adapterfmt.plugins.methods.selection import linear_flops

CONFIG = TinyConfig(vocab_size=128, hidden=64, layers=4, heads=4, intermediate=128)
TOKENS, SEQ, BATCH = 64, 17, 16
PRETRAIN = {"steps": 150, "lr": 3e-3}
STEPS, ESTIMATE, CALIBRATION = 120, 16, 4
LR = 3e-3
EVAL_ROWS = 64


def chain(gen: torch.Generator) -> torch.Tensor:
    """A random Markov chain over ``TOKENS`` tokens: 4 likely successors per token (Dirichlet(1) weights, drawn
    as normalised exponentials from ``gen``)."""
    probs = torch.full((TOKENS, TOKENS), 1e-3)
    for t in range(TOKENS):
        nxt = torch.randperm(TOKENS, generator=gen)[:4]
        w = -torch.rand(4, generator=gen).log()
        probs[t, nxt] += w / w.sum()
    return probs / probs.sum(1, keepdim=True)


def sample(probs: torch.Tensor, rows: int, gen: torch.Generator) -> torch.Tensor:
    ids = torch.empty(rows, SEQ, dtype=torch.long)
    ids[:, 0] = torch.randint(0, TOKENS, (rows,), generator=gen)
    for i in range(1, SEQ):
        ids[:, i] = torch.multinomial(probs[ids[:, i - 1]], 1, generator=gen).squeeze(1)
    return ids


def loss_fn(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids[:, :-1])
    return F.cross_entropy(getattr(out, "logits", out).flatten(0, 1), ids[:, 1:].flatten())


def evaluate(model: torch.nn.Module, ids: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        value = float(loss_fn(model, ids))
    model.train()
    return value


def fit(model: torch.nn.Module, session: af.TrainSession, batches: list[torch.Tensor], lr: float) -> None:
    """AdamW on the session's parameters over ``batches``, running the session's hooks each step."""
    opt = torch.optim.AdamW(list(session.parameters()), lr=lr, weight_decay=0.0)
    model.train()
    for ids in batches:
        loss_fn(model, ids).backward()
        session.after_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        session.step(opt)


def trainable(session: af.TrainSession) -> int:
    return sum(p.numel() for p in session.parameters())


def lora_rank_for(model: torch.nn.Module, targets: Any, budget: int) -> int:
    """The LoRA rank on ``targets`` whose parameter count is nearest ``budget``."""
    widths = sum(sum(m.weight.shape) for m in af.select_targets(model, {"target_modules": targets}).values())
    return max(1, round(budget / widths))


def setup(seed: int) -> tuple[torch.nn.Module, list[torch.Tensor], torch.Tensor, float]:
    """The pretrained base, the task-B training batches, the held-out rows and the task-B chain's entropy."""
    gen = torch.Generator().manual_seed(1000 + seed)
    task_a, task_b = chain(gen), chain(gen)
    torch.manual_seed(seed)
    base = build_tiny(seed, CONFIG)
    opt = torch.optim.AdamW(base.parameters(), lr=PRETRAIN["lr"])
    for _ in range(PRETRAIN["steps"]):
        loss_fn(base, sample(task_a, BATCH, gen)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    batches = [sample(task_b, BATCH, gen) for _ in range(STEPS)]
    held = sample(task_b, EVAL_ROWS, gen)
    stationary = torch.linalg.matrix_power(task_b.T, 200)[:, 0]
    entropy = float(-(stationary[:, None] * task_b * task_b.log()).sum() / stationary.sum())
    return base, batches, held, entropy


def run(name: str, base: torch.nn.Module, config: dict[str, Any], steps: list[torch.Tensor], held: torch.Tensor,
        lr: float, seed: int, **train: Any) -> dict[str, Any]:
    """Method ``name``'s train verb (``train``: its calibration options) on a copy of ``base``, trained on ``steps``."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    session = af.registry.get_method(name).train(model, config=config, **train)
    params = trainable(session)
    t0 = time.perf_counter()
    fit(model, session, steps, lr)
    return {"loss": evaluate(model, held), "params": params, "seconds": time.perf_counter() - t0,
            "adapter": session.extract()}


def step_cost(base: torch.nn.Module, batch: torch.Tensor, chosen: list[str] | None) -> float:
    """A step's modelled FLOPs over a full fine-tuning step's (GreenTrainer's model): ``chosen`` tensors trained
    whole, or (``None``) a LoRA reaching block 0: every activation gradient and no weight gradient of the base."""
    paths, t_dy, t_dw, forward = linear_flops(base, loss_fn, batch)
    full = forward + float((t_dy + t_dw).sum())
    if chosen is None:
        return (forward + float(t_dy.sum())) / full
    deepest = min(paths.index(p) for p in chosen)
    return (forward + float(t_dy[deepest:].sum()) + sum(float(t_dw[paths.index(p)]) for p in chosen)) / full


def study_ist(seed: int, base, batches, held) -> dict[str, dict[str, Any]]:
    cfg = {"target_modules": "all-linear", "r": 8, "alpha": 16}
    calib = {"loss_fn": loss_fn, "batches": batches[:CALIBRATION]}
    out = {"LoRA r=8": run("lora", base, cfg, batches, held, LR, seed),
           "IST (25% of blocks/step)": run("ist", base, cfg, batches, held, LR, seed, **calib),
           "RST (uniform draws)": run("ist", base, {**cfg, "update_interval": 0}, batches, held, LR, seed)}
    return out


def study_greentrainer(seed: int, base, batches, held, dense_lr: float = LR) -> dict[str, dict[str, Any]]:
    gt = run("greentrainer", base, {"rho": 0.5}, batches, held, dense_lr, seed, loss_fn=loss_fn, batches=batches[:1])
    gt["cost"] = step_cost(base, batches[0], gt["adapter"].config["tensors"])
    r = lora_rank_for(base, "all-linear", gt["params"])
    lora = run("lora", base, {"target_modules": "all-linear", "r": r, "alpha": 2 * r}, batches, held, LR, seed)
    lora["cost"] = step_cost(base, batches[0], None)
    return {"GreenTrainer rho=0.5": gt, f"LoRA all-linear r={r}": lora}


def removed_share(adapter: af.Adapter) -> float:
    """Weights of the base made dead by the masks (rows/columns of o_proj and down_proj and what feeds only
    them: the head's q/k/v rows, the channel's gate/up rows) over all attention + FFN weights."""
    per_layer = 4 * CONFIG.hidden ** 2 + 3 * CONFIG.hidden * CONFIG.intermediate
    dead = 0
    for path, entry in adapter.modules.items():
        if entry["kind"] == "mask":
            removed = int((adapter.tensor(f"{path}.keep") == 0).sum()) * entry["params"]["group"]
            dead += removed * CONFIG.hidden * (4 if path.endswith("o_proj") else 3)
    return dead / (per_layer * CONFIG.layers)


def study_light_peft(seed: int, base, batches, held) -> dict[str, dict[str, Any]]:
    qv = ["q_proj", "v_proj"]
    cfg = {"target_modules": qv, "r": 8, "alpha": 16, "estimate_lr": LR}
    lp = run("light_peft", base, cfg, batches[ESTIMATE:], held, LR, seed, loss_fn=loss_fn,
             batches=batches[:ESTIMATE])
    lp["removed"] = removed_share(lp["adapter"])
    r = lora_rank_for(base, qv, lp["params"])
    return {"Light-PEFT": lp,
            f"LoRA q/v r={r} (same params)": run("lora", base, {"target_modules": qv, "r": r, "alpha": 2 * r},
                                                 batches, held, LR, seed),
            "LoRA q/v r=8 (unpruned)": run("lora", base, {"target_modules": qv, "r": 8, "alpha": 16}, batches, held,
                                           LR, seed)}


STUDIES = {"ist": study_ist, "greentrainer": study_greentrainer, "light_peft": study_light_peft}


def summarise(rows: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out = {}
    for key in rows[0]:
        runs = [r[key] for r in rows]
        summary = {}
        for field in ("loss", "params", "seconds", "cost", "removed"):
            if field in runs[0]:
                values = [x[field] for x in runs]
                summary[field] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        out[key] = summary
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=["all", *STUDIES], default="all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dense-lr", type=float, default=LR, help="GreenTrainer's lr (default: the others')")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    chosen = list(STUDIES) if args.study == "all" else [args.study]
    rows: dict[str, list[dict[str, dict[str, Any]]]] = {s: [] for s in chosen}
    floors = []
    for seed in args.seeds:
        base, batches, held, entropy = setup(seed)
        floors.append(entropy)
        rows_base = {"base (no adapter)": {"loss": evaluate(base, held), "params": 0, "seconds": 0.0}}
        for s in chosen:
            extra = {"dense_lr": args.dense_lr} if s == "greentrainer" else {}
            rows[s].append({**rows_base, **STUDIES[s](seed, base, batches, held, **extra)})
    result = {s: summarise(r) for s, r in rows.items()}
    if args.json:
        print(json.dumps({"seeds": args.seeds, "entropy": floors, "studies": result}, indent=1))
        return
    print(f"task-B entropy (loss floor): {statistics.mean(floors):.3f}; seeds {args.seeds}")
    for s, table in result.items():
        print(f"\n[{s}]\n| method | trainable params | held-out loss | train s |" + (
            " step FLOPs / full FT |" if s == "greentrainer" else " base weights removed |" if s == "light_peft" else ""))
        for key, v in table.items():
            extra = ""
            for field in ("cost", "removed"):
                if field in v:
                    extra = f" {100 * v[field][0]:.0f}% ± {100 * v[field][1]:.0f} |"
            if not extra and s in ("greentrainer", "light_peft"):
                extra = " 0% |" if s == "light_peft" else " — |"
            print(f"| {key} | {v['params'][0]:,.0f} | {v['loss'][0]:.3f} ± {v['loss'][1]:.3f} | {v['seconds'][0]:.1f} |"
                  + extra)


if __name__ == "__main__":
    main()
