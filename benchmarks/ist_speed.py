"""IST's saving: step time, saved activations and peak memory of ``adapter train --method ist`` (update_ratio
0.25) against IST as it was before (every block's LoRA gradients computed, the undrawn ones dropped after the
backward pass) and plain LoRA, on the same model, data and batch.

The model and data are built by ``benchmarks/train.py``'s ``build`` (a random Llama from a config, here 8 blocks,
hidden 512: ~33M parameters; batch 4 x 128 byte tokens, fp32, CPU, one torch thread per process: the CPU is
shared); every variant trains LoRA r=16 (alpha 16, no dropout) on every linear layer but the head through
``adapter train`` (AdamW lr 2e-4, clipping at 1.0). IST draws 2 of the 8 blocks per step and updates its
scores every 10 steps (3 eval-mode forward passes on a calibration batch: one of them falls in the measured
steps, so the mean step time pays for it as a run does). "IST, gradients dropped" is the same run with the
session's ``skip_gradients`` flags off (``TrainSession._arm`` a no-op): its adapter is bit for bit IST's (the
benchmark checks the losses are equal). Per variant and repeat one process (peak RSS is its own: imports, model,
training), the variants alternating; the step time is the mean over the steps after ``--warmup`` (the median
step, pooled over the repeats, leaves the score update out); "saved" is
the mean over those steps of the bytes autograd saves for the backward pass (distinct storages, the model's
parameters excluded; ``torch.autograd.graph.saved_tensors_hooks``). Ratios are formed in the same run.

    python benchmarks/ist_speed.py     # 3 repeats x 3 variants x (2 + 10) steps
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train import BATCH, LR, SEQ, R, build, peak_rss_mib

VARIANTS = {"lora": "LoRA (all blocks)", "ist-dropped": "IST, gradients dropped", "ist": "IST"}
IST = {"update_ratio": 0.25, "update_interval": 10}


def worker(variant: str, folder: Path, steps: int, threads: int) -> dict[str, object]:
    from adapterfmt.verbs.train import TrainSession
    from adapterfmt.verbs.trainer import Run, TrainOptions

    torch.set_num_threads(threads)
    if variant == "ist-dropped":  # IST before the skipped deltas stopped requiring grad
        TrainSession._arm = lambda self, path, layer: None  # type: ignore[method-assign]
    config = {"target_modules": "all-linear", "r": R, "alpha": R, **(IST if variant != "lora" else {})}
    opts = TrainOptions(method="ist" if variant != "lora" else "lora", base=folder / "base",
                        data=folder / "data.jsonl", out=folder / f"{variant}.safetensors", config=config,
                        max_steps=steps, lr=LR, batch_size=BATCH, max_length=SEQ, overwrite=True)
    marks: list[float] = []
    losses: list[float] = []
    saved: list[int] = []
    live: dict[int, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = Run(opts)
        run.prepare()
        params = {p.untyped_storage().data_ptr() for p in run.model.parameters()}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                live[ptr] = t.untyped_storage().nbytes()
            return t

        def progress(report: object) -> None:
            marks.append(time.perf_counter())
            losses.append(report.loss)  # type: ignore[attr-defined]
            saved.append(sum(live.values()))
            live.clear()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run.loop(progress)
    return {"marks": marks, "losses": losses, "saved": saved, "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--steps", type=int, default=10, help="measured steps per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (the CPU is shared)")
    ap.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    total = args.warmup + args.steps
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, total, args.threads)))
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shape = build(folder, args.layers, args.hidden, args.intermediate, args.vocab, examples=BATCH * total)
        print(f"Llama {shape}; LoRA r={R} all-linear; IST {IST}; batch {BATCH} x {SEQ} tokens; {args.warmup} warmup "
              f"+ {args.steps} measured steps; {args.repeats} repeats; torch threads {args.threads}")
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for _ in range(args.repeats):
            for v in VARIANTS:
                out = subprocess.run([sys.executable, __file__, "--worker", v, "--folder", str(folder),
                                      "--steps", str(args.steps), "--warmup", str(args.warmup),
                                      "--threads", str(args.threads)],
                                     capture_output=True, text=True, check=True)
                runs[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary: dict[str, dict[str, float]] = {}
    for v, rs in runs.items():
        step = [(r["marks"][-1] - r["marks"][args.warmup - 1]) / args.steps for r in rs]
        each = [b - a for r in rs for a, b in zip(r["marks"][args.warmup - 1:], r["marks"][args.warmup:])]
        saved = [statistics.mean(r["saved"][args.warmup:]) / 2**20 for r in rs]
        rss = [r["peak_rss_mib"] for r in rs]
        summary[v] = {"step": statistics.mean(step), "median": statistics.median(each),
                      "saved": statistics.mean(saved), "rss": statistics.mean(rss)}
        print(f"{VARIANTS[v]:24s} step {statistics.mean(step):.3f} s (runs {min(step):.3f}-{max(step):.3f}; median "
              f"step {statistics.median(each):.3f} s)  saved {statistics.mean(saved):.0f} MiB/step  peak RSS "
              f"{statistics.mean(rss):.0f} MiB ({min(rss):.0f}-{max(rss):.0f})")
    same = all(a["losses"] == b["losses"] for a, b in zip(runs["ist"], runs["ist-dropped"], strict=True))
    print(f"IST's losses equal the gradients-dropped run's: {same}")
    for ref in ("ist-dropped", "lora"):
        a, b = summary["ist"], summary[ref]
        print(f"IST / {VARIANTS[ref]}: step time {a['step'] / b['step']:.2f}x (median step "
              f"{a['median'] / b['median']:.2f}x), saved activations "
              f"{a['saved'] / b['saved']:.2f}x, peak RSS {a['rss'] / b['rss']:.2f}x")
    print(f"wall {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
