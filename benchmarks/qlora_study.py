"""QLoRA study (issue 20): a LoRA trained over a bitsandbytes nf4 base, then shipped three ways. CPU, minutes.

The tiny Llama of ``quant_study.py`` pretrained on task A (copy the previous token); its seven projections
held as bitsandbytes ``Linear4bit`` nf4 (block 64, double-quantised scales, float32 compute: QLoRA's storage);
a LoRA r4 trained on task B ((x_{t-1} + 1) mod V) over that base (QLoRA). Accuracy on task B of

1. the LoRA unmerged over the nf4 base (what was trained);
2. the LoRA merged into the dequantised base in float32 (exact ``W_nf4 + dW``, a float checkpoint);
3. ``adapter merge --base`` the nf4 checkpoint: dequantised, ``dW`` added, re-quantised to nf4 by bitsandbytes
   (``af.bake``), with the reported re-quantisation error ``|Q(W + dW) - (W + dW)|_F / |dW|_F`` (mean over modules).

The models run in train mode (bitsandbytes' dequantising matmul; in eval mode on CPUs with AVX512-BF16 it
repacks the weights with bf16 block scales). Accuracy = next-token argmax on 512 held-out sequences of 16.

    python benchmarks/qlora_study.py [--seeds 3] [--steps 150]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import bitsandbytes as bnb
import torch
from quant_study import TARGETS, accuracy, pretrained, tune
from safetensors.torch import load_file, save_file
from torch import nn

import adapterfmt as af
from adapterfmt.verbs.bake import bake


def nf4(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with the targeted projections held as bitsandbytes nf4 ``Linear4bit`` s."""
    model = copy.deepcopy(model)
    for path, lin in list(model.named_modules()):
        if isinstance(lin, nn.Linear) and path.rsplit(".", 1)[-1] in TARGETS["target_modules"]:
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
            q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, q.to("cpu"))
    return model.train()


def dequantised(model: nn.Module) -> nn.Module:
    """A float copy whose projections hold the nf4 model's dequantised weights."""
    out = copy.deepcopy(model)
    for path, q in list(model.named_modules()):
        if af.held_quantized(q):
            lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(af.function_weight(q))
            parent, _, name = path.rpartition(".")
            setattr(out.get_submodule(parent), name, lin)
    return out


def loaded(model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of the nf4 ``model`` with a baked checkpoint's quantised weights (loaded prequantised, as transformers
    does); the bake changes no other tensor of this model (the LoRA has no bias)."""
    model = copy.deepcopy(model)
    for path, q in model.named_modules():
        if isinstance(q, bnb.nn.Linear4bit):
            stats = {k.removeprefix(f"{path}.weight."): v for k, v in tensors.items() if k.startswith(f"{path}.weight.")}
            q.weight = bnb.nn.Params4bit.from_prequantized(tensors[f"{path}.weight"], stats, device="cpu", module=q)
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=2e-2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        fp = pretrained(seed)
        rows.setdefault("A: float base", []).append(accuracy(fp, "A")[0])
        base = nf4(fp)
        rows.setdefault("A: nf4 base", []).append(accuracy(base, "A")[0])
        lora, _ = tune("lora", {"r": 4, "alpha": 8}, base, "B", seed, args.steps, args.lr)
        unmerged = copy.deepcopy(base)
        af.attach(unmerged, lora)
        rows.setdefault("B: QLoRA unmerged over nf4", []).append(accuracy(unmerged, "B")[0])
        exact = dequantised(base)
        af.attach(exact, lora, merge=True)
        rows.setdefault("B: merged into the dequantised base (float)", []).append(accuracy(exact, "B")[0])
        with tempfile.TemporaryDirectory() as tmp:
            save_file({k: v.contiguous() for k, v in base.state_dict().items()}, Path(tmp) / "base.safetensors")
            report = bake([lora], Path(tmp) / "base.safetensors", Path(tmp) / "baked.safetensors")
            baked = loaded(base, load_file(Path(tmp) / "baked.safetensors"))
        rows.setdefault("B: merge --base the nf4 checkpoint (re-quantised)", []).append(accuracy(baked, "B")[0])
        rows.setdefault("re-quantisation error over dW, Frobenius (mean over modules)", []).append(
            statistics.mean(r["relative_error"] for r in report.requantized.values()))
    print("| setting | mean ± sd |")
    print("|---|---|")
    for name, v in rows.items():
        print(f"| {name} | {statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.3f} |")
    print(f"\n{args.seeds} seeds, {args.steps} steps, lr {args.lr}, {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
