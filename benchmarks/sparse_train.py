"""Training memory and step time: SpIEL at 1% density vs LoRA with the same number of trainable parameters vs
the dense-delta sparse path adapterfmt had before (the ``sparse`` kind's forward, which forms a weight-sized
delta and its gradient at every step) vs full fine-tuning, in the same run.

Model: the Llama-shaped ``adapterfmt.tiny`` model (default hidden 768, 12 layers, 12 heads, FFN 2048, vocab 8192:
about 98M parameters, fp32), all linear projections of the blocks targeted. Each contender runs in a fresh
subprocess on one thread: build the model, reset the peak-RSS counter (``/proc/self/clear_refs``), then
``--steps`` optimizer steps (AdamW; SpIEL's own AdamW with per-entry age, and its reselection schedule running,
its first selection phase included) on a ``--batch`` x ``--seq`` next-token batch. Reported: the peak RSS above
the RSS before training (activations, gradients, optimizer state, deltas: what training adds to the weights),
the median time of steps 2.. and the first step's. SpIEL runs with ``selection_accumulation_steps = 1``, so its
first step is a selection phase (the weight gradient streamed by row blocks through a top-k, then the whole
random mask replaced) and the later ones are ordinary steps (with the authors' defaults, 5 or 6 of every 20
steps are in a phase and also gather the candidates' gradients by SDDMM). glibc's mmap threshold is set to
64 KiB so freed buffers leave the RSS.

    python benchmarks/sparse_train.py [--hidden 768 --layers 12 --ffn 2048 --vocab 8192] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, statistics, sys, time, warnings
warnings.simplefilter("ignore")
import torch
import torch.nn.functional as F
import adapterfmt as af
from adapterfmt.tiny import TinyConfig, build_tiny

mode, hidden, layers, ffn, vocab, batch, seq, steps, rank = sys.argv[1], *map(int, sys.argv[2:])
torch.set_num_threads(1)
heads = hidden // 64
model = build_tiny(0, TinyConfig(vocab_size=vocab, hidden=hidden, layers=layers, heads=heads, intermediate=ffn))
n_params = sum(p.numel() for p in model.parameters())
ids = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
TARGETS = {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}

def rss(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024

step_hook = lambda opt: None
if mode == "full":
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)
else:
    if mode == "lora":
        session = af.registry.get_method("lora").train(model, config={**TARGETS, "r": rank, "alpha": 2 * rank})
    else:
        session = af.registry.get_method("spiel").train(model, config={
            **TARGETS, "density": 0.01, "total_steps": 100, "reselection_steps": 20, "selection_accumulation_steps": 1})
        if mode == "dense_delta":  # the same masks through the sparse kind's own (dense) forward
            sp = sys.modules["adapterfmt.plugins.methods.sparse"]
            layers_ = dict(session.layers)
            session.remove()
            session = af.inject(model, method="sparse_ft", config=TARGETS, build=lambda path, m: af.TrainableDelta(
                layers_[path].entry, {"values": torch.zeros(layers_[path].k)}, frozen={"indices": layers_[path].indices}))
    params = list(session.parameters())
    opt = session.optimizer(lr=1e-4)
    if mode == "spiel":
        step_hook = session.step
trainable = sum(p.numel() for p in params)
open("/proc/self/clear_refs", "w").write("5")
before = rss("VmRSS:")
times = []
for _ in range(steps):
    t0 = time.perf_counter()
    logits = model(ids[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    step_hook(opt)
    times.append(time.perf_counter() - t0)
print(json.dumps({"mode": mode, "params": n_params, "trainable": trainable, "extra": rss("VmHWM:") - before,
                  "step": statistics.median(times[1:] or times), "first_step": times[0]}))
"""


def run(mode: str, args: argparse.Namespace, rank: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    argv = [str(v) for v in (args.hidden, args.layers, args.ffn, args.vocab, args.batch, args.seq, args.steps, rank)]
    out = subprocess.run([sys.executable, "-c", CHILD, mode, *argv], check=False, capture_output=True, text=True,
                         env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def lora_rank(args: argparse.Namespace, k: int) -> int:
    """The rank whose all-projection LoRA has the trainable count nearest ``k``."""
    h, f = args.hidden, args.ffn
    per_rank = args.layers * (4 * 2 * h + 3 * (h + f))
    return max(1, round(k / per_rank))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--modes", nargs="+", default=["spiel", "lora", "dense_delta", "full"])
    args = ap.parse_args()
    spiel = run("spiel", args, 1) if "spiel" in args.modes else None
    rank = lora_rank(args, spiel["trainable"]) if spiel else 8
    rows = [spiel] + [run(m, args, rank) for m in args.modes if m != "spiel"]
    rows = [r for r in rows if r]
    lora = next((r for r in rows if r["mode"] == "lora"), None)
    print(f"model: {rows[0]['params'] / 1e6:.1f}M parameters (fp32), batch {args.batch} x {args.seq} tokens, "
          f"1 thread; LoRA rank {rank}")
    print(f"{'contender':<12} {'trainable':>11} {'peak above weights':>19} {'vs LoRA':>8} {'step s':>7} {'1st step s':>10}")
    for r in rows:
        ratio = f"{r['extra'] / lora['extra']:.2f}x" if lora else "-"
        print(f"{r['mode']:<12} {r['trainable']:>11,} {r['extra'] / 2**20:>15.0f} MiB {ratio:>8} {r['step']:>7.2f} "
              f"{r['first_step']:>10.2f}")


if __name__ == "__main__":
    main()
