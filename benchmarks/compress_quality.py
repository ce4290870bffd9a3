"""Compression quality: LoRAs trained here on small tasks the base model fails, compressed at several
densities / ranks / bit widths; task accuracy against the ratio on disk (vs the fp16 LoRA file).

Base: ``adapterfmt.tiny.build_tiny()`` (random weights, so it solves nothing). Tasks on sequences of 12 tokens
drawn from 0..31: ``shift`` (predict the previous token: needs attention) and ``map`` (predict
``(5 x + 3) mod 32`` of the current token). LoRA r=8, alpha=16 on every linear layer of both blocks, trained
with plain torch (factors injected by forward hooks). Accuracy = next-token argmax on 512 held-out sequences.

Run: ``python benchmarks/compress_quality.py`` (a few minutes on 2 cores) for the table of every step, and
``python benchmarks/compress_quality.py compeft`` for the ComPEFT study: the paper's alpha grid at several
densities and the STC baseline, 3 training seeds, test accuracy mean and spread, plus alpha picked per seed
on a separate validation set (the paper's protocol).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import adapterfmt as af
from adapterfmt.tiny import build_tiny
from adapterfmt.verbs.compress import compress_adapter
from adapterfmt.verbs.summary import file_bytes

SEQ, SPAN, RANK, ALPHA = 12, 32, 8, 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIGS: list[tuple[str, list[dict]]] = [
    *[(f"compeft d={d} alpha=1", [{"method": "compeft", "density": d}]) for d in (0.5, 0.3, 0.1, 0.03)],
    ("compeft d=0.3 alpha=2", [{"method": "compeft", "density": 0.3, "factor": 2.0}]),
    ("stc d=0.3", [{"method": "compeft", "density": 0.3, "scale": "stc"}]),
    ("stc d=0.3 per tensor", [{"method": "compeft", "density": 0.3, "scale": "stc", "scope": "tensor"}]),
    *[(f"compeft on dW d={d}", [{"method": "compeft", "density": d, "target": "delta"}]) for d in (0.3, 0.1)],
    *[(f"resize r={r}", [{"method": "resize", "rank": r}]) for r in (4, 2, 1)],
    ("int8", [{"method": "quantize", "bits": 8}]),
    ("int4 g64", [{"method": "quantize", "bits": 4}]),
    ("resize r=4 + compeft d=0.3", [{"method": "resize", "rank": 4}, {"method": "compeft", "density": 0.3}]),
]
ALPHAS = (0.5, 1, 2, 3, 4, 5, 6, 8, 10)
"""ComPEFT's alpha grid (its appendix; the reference README leaves alpha to the user)."""
DENSITIES = (0.5, 0.3, 0.2, 0.1, 0.05)
"""ComPEFT's density grid, k in {5, 10, 20, 30, 50} percent."""
SEEDS = (1, 2, 3)


def batch(task: str, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, SPAN, (n, SEQ), generator=gen)
    if task == "shift":
        y = torch.cat([torch.full((n, 1), -100), x[:, :-1]], 1)
    else:
        y = (5 * x + 3) % SPAN
    return x, y


def accuracy(model: nn.Module, task: str, data_seed: int = 999) -> float:
    """Next-token accuracy on 512 sequences (seed 999: the test set; the study validates on seed 998)."""
    x, y = batch(task, 512, torch.Generator().manual_seed(data_seed))
    with torch.no_grad():
        pred = model(x).argmax(-1)
    keep = y != -100
    return float((pred[keep] == y[keep]).float().mean())


def train_lora(model: nn.Module, task: str, steps: int = 300, seed: int = 1) -> af.Adapter:
    """Plain-torch LoRA: A, B per target module, added through forward hooks; returns the adapter (fp16).
    ``seed`` draws the initial A and the training batches."""
    gen = torch.Generator().manual_seed(seed)
    factors, hooks = {}, []
    for path, mod in model.named_modules():
        if path.rsplit(".", 1)[-1] in TARGETS:
            a = nn.Parameter(torch.randn(RANK, mod.in_features, generator=gen) / mod.in_features ** 0.5)
            b = nn.Parameter(torch.zeros(mod.out_features, RANK))
            factors[path] = (a, b)
            hooks.append(mod.register_forward_hook(
                lambda m, args, y, a=a, b=b: y + (ALPHA / RANK) * (args[0] @ a.t()) @ b.t()))
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for ab in factors.values() for p in ab]
    opt = torch.optim.AdamW(params, lr=6e-3, weight_decay=0.0)
    for _ in range(steps):
        x, y = batch(task, 64, gen)
        loss = nn.functional.cross_entropy(model(x).reshape(-1, 128), y.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for h in hooks:
        h.remove()
    modules = {p: af.lowrank_entry(list(model.get_submodule(p).weight.shape), ALPHA / RANK) for p in factors}
    tensors = {f"{p}.{r}": t.detach().half().contiguous()
               for p, (a, b) in factors.items() for r, t in (("lora_A", a), ("lora_B", b))}
    return af.Adapter(af.new_manifest("lora", modules, config={"r": RANK, "lora_alpha": ALPHA}), tensors)


def with_adapter(model: nn.Module, adapter: af.Adapter, task: str, data_seed: int = 999) -> float:
    af.attach(model, adapter, name="bench")
    try:
        return accuracy(model, task, data_seed)
    finally:
        af.detach(model)


def _spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def compeft_study() -> None:
    """Per task: test accuracy (mean ± sample std over SEEDS) of ComPEFT at each alpha and density, STC,
    and ComPEFT with alpha picked per seed and density on the validation set; tensor-data ratio per density."""
    print(f"| task | setting | {' | '.join(f'd={d}' for d in DENSITIES)} |")
    print(f"|---|---|{'---:|' * len(DENSITIES)}")
    for task in ("shift", "map"):
        test: dict[str, dict[float, list[float]]] = {}
        picked: dict[float, list[float]] = {d: [] for d in DENSITIES}
        ratio: dict[float, float] = {}
        full = []
        for seed in SEEDS:
            model = build_tiny(seed=0)
            src = train_lora(model, task, seed=seed)
            full.append(with_adapter(model, src, task))
            for d in DENSITIES:
                val_best = (-1.0, 0.0)
                settings = [(f"compeft alpha={a}", {"factor": float(a)}) for a in ALPHAS] + [("stc", {"scale": "stc"})]
                for label, opts in settings:
                    out = compress_adapter(src, steps=[{"method": "compeft", "density": d, **opts}])
                    ratio[d] = out.manifest["compression"]["tensor_ratio"]
                    acc = with_adapter(model, out, task)
                    test.setdefault(label, {}).setdefault(d, []).append(acc)
                    if label != "stc":
                        val_best = max(val_best, (with_adapter(model, out, task, data_seed=998), acc))
                picked[d].append(val_best[1])
        print(f"| {task} | LoRA r={RANK} fp16, uncompressed | " + " | ".join([_spread(full)] * len(DENSITIES)) + " |")
        print(f"| {task} | tensor-data ratio vs fp16 | " + " | ".join(f"{ratio[d]:.1f}x" for d in DENSITIES) + " |")
        for label, by_d in test.items():
            print(f"| {task} | {label} | " + " | ".join(_spread(by_d[d]) for d in DENSITIES) + " |")
        print(f"| {task} | compeft, alpha picked on validation | "
              + " | ".join(_spread(picked[d]) for d in DENSITIES) + " |", flush=True)


def realistic_sizes(work: Path) -> None:
    """Bytes on disk at a realistic module size (random factors: size only, no task): fp16 LoRA r=16 on
    q/k/v/o of one 4096-wide layer, against ComPEFT at the issue's densities."""
    gen = torch.Generator().manual_seed(0)
    modules, tensors = {}, {}
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        path = f"model.layers.0.self_attn.{p}"
        modules[path] = af.lowrank_entry([4096, 4096], 2.0)
        tensors[f"{path}.lora_A"] = torch.randn(16, 4096, generator=gen).half()
        tensors[f"{path}.lora_B"] = torch.randn(4096, 16, generator=gen).half()
    src = af.load(af.save(af.Adapter(af.new_manifest("lora", modules), tensors), work / "big.safetensors"))
    print("| 4096-wide layer, LoRA r=16 fp16 | bytes on disk | ratio |")
    print("|---|---:|---:|")
    print(f"| original | {file_bytes(src):,} | 1.00 |")
    for d in (0.1, 0.03):
        out = af.load(af.save(compress_adapter(src, steps=[{"method": "compeft", "density": d}]),
                              work / f"big-{d}.safetensors"))
        print(f"| compeft d={d} | {file_bytes(out):,} | {file_bytes(src) / file_bytes(out):.2f} |")
    print()


def main() -> None:
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="compress-bench-"))
    realistic_sizes(work)
    print("| task | stored as | bytes on disk | ratio vs fp16 LoRA | tensor-data ratio | accuracy | dW rel. error (max) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for task in ("shift", "map"):
        model = build_tiny(seed=0)
        base_acc = accuracy(model, task)
        t0 = time.perf_counter()
        lora = train_lora(model, task)
        train_s = time.perf_counter() - t0
        src = af.load(af.save(lora, work / f"{task}-fp16.safetensors"))
        src_bytes = file_bytes(src)
        print(f"| {task} | base model, no adapter | - | - | - | {base_acc:.3f} | - |")
        print(f"| {task} | LoRA r={RANK} fp16 (trained {train_s:.0f} s) | {src_bytes:,} | 1.00 | 1.00 | "
              f"{with_adapter(model, src, task):.3f} | 0 |")
        for label, steps in CONFIGS:
            out = af.load(af.save(compress_adapter(src, steps=steps), work / f"{task}-{label}.safetensors"))
            rec = out.manifest["compression"]
            size = file_bytes(out)
            print(f"| {task} | {label} | {size:,} | {src_bytes / size:.2f} | {rec['tensor_ratio']:.2f} | "
                  f"{with_adapter(model, out, task):.3f} | {rec['dW_rel_error_max']:.3f} |", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny matrices: more threads only add overhead, the more so on a shared machine
    compeft_study() if sys.argv[1:] == ["compeft"] else main()
