"""Training-procedure study (issue 18): TriAdaptLoRA, DiffoRA and S2-LoRA against plain LoRA at an equal final
trainable-parameter budget, on the tiny Llama (adapterfmt.tiny), 3 seeds. CPU, a few minutes.

The base is pretrained (full fine-tuning) on task A (next token = (x + 1) mod V), then adapted on task B
(next token = (3 x + 5) mod V) with the attention projections q/k/v/o (eight 64 x 64 maps) targeted, through
the session hooks (``after_backward``, ``step``) and each method's regulariser. Budgets (final adapter):
LoRA r = 4 on all 8 maps (4096 numbers); TriAdaptLoRA rank 1 per map growing to 32 in all (reference rank 4:
4096 in A and B, plus C); DiffoRA r = 8 on the 4 maps it keeps of 8 (4096; its search trains all 8 for the
first third of the steps, alternating factor and gate steps by default, or both at once with ``search: joint``); S2-LoRA r = 8 (A and B shared by the two layers: 4 x 8 x 128 + 8 x 8 = 4160).

    python benchmarks/train_methods_study.py [--seeds 3] [--steps 150]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from svd_lora_study import batch, loss_of, pretrained  # noqa: E402  (the same tasks, model and pretraining)

import adapterfmt as af  # noqa: E402
from adapterfmt.plugin.registry import get_method  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def methods(steps: int) -> dict[str, tuple[str, dict]]:
    return {
        "LoRA r4": ("lora", {"r": 4, "alpha": 8}),
        "TriAdaptLoRA 1->4": ("triadaptlora", {"init_rank": 1, "reference_rank": 4, "alpha": 8, "total_step": steps}),
        "DiffoRA r8, keep 1/2": ("diffora", {"r": 8, "alpha": 16, "select_ratio": 0.5, "search_steps": steps // 3}),
        "DiffoRA r8, keep 1/2, joint search": ("diffora", {"r": 8, "alpha": 16, "select_ratio": 0.5,
                                                           "search_steps": steps // 3, "search": "joint"}),
        "S2-LoRA r8": ("s2_lora", {"r": 8, "alpha": 16, "l1": 1e-4}),
    }


def run(method: str, config: dict, base: torch.nn.Module, seed: int, steps: int, lr: float
        ) -> tuple[dict[int, float], int, int]:
    """Loss on a held-out batch at the checkpoints; the final adapter's numbers and file bytes."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    session = get_method(method).train(model, config={"target_modules": TARGETS, **config})
    opt = torch.optim.AdamW(session.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(2000 + seed)
    xe, ye = batch("B", torch.Generator().manual_seed(99), n=128)
    curve = {}
    for step in range(1, steps + 1):
        x, y = batch("B", gen)
        opt.zero_grad(set_to_none=True)
        (loss_of(model, x, y) + session.regularization()).backward()
        session.after_backward()
        opt.step()
        session.step(opt)
        if step in (steps // 3, 2 * steps // 3, steps):
            with torch.no_grad():
                curve[step] = float(loss_of(model, xe, ye))
    adapter = session.extract()
    numbers = sum(adapter.tensor(n).numel() for n in adapter.tensor_names())
    with tempfile.TemporaryDirectory() as tmp:
        size = af.save(adapter, Path(tmp) / "a.safetensors").stat().st_size
    session.remove()
    return curve, numbers, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=5e-3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    table = methods(args.steps)
    results: dict[str, list[tuple[dict[int, float], int, int]]] = {name: [] for name in table}
    for seed in range(args.seeds):
        base = pretrained(seed)
        for name, (method, config) in table.items():
            results[name].append(run(method, config, base, seed, args.steps, args.lr))
    checkpoints = sorted(results["LoRA r4"][0][0])
    print("| method | adapter numbers | file bytes | " + " | ".join(f"loss @{c}" for c in checkpoints) + " |")
    print("|---|---|---|" + "---|" * len(checkpoints))
    for name, runs in results.items():
        cells = []
        for c in checkpoints:
            v = [r[0][c] for r in runs]
            cells.append(f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.3f}")
        print(f"| {name} | {runs[0][1]} | {runs[0][2]} | " + " | ".join(cells) + " |")
    print(f"\n{args.seeds} seeds x {args.steps} steps in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
