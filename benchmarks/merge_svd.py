"""SVD merge of two r=16 all-linear LoRAs: adapterfmt's merge_adapters(strategy="svd") vs PEFT's
add_weighted_adapter(..., combination_type="svd"), same inputs, same target rank, same run.

Error of each: ||dW_merged - (w1 dW1 + w2 dW2)||_F / ||w1 dW1 + w2 dW2||_F per module (the best rank-16
approximation has the smallest possible), summarised over all modules.

    python benchmarks/merge_svd.py [--layers 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from llama_lora import llama, lora  # noqa: E402

import adapterfmt as af  # noqa: E402
from adapterfmt.verbs.merge import merge_adapters, relative_error  # noqa: E402

WEIGHTS = [0.6, 0.4]
RANK = 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both (1: on a shared 2-core machine PEFT's SVD runs ~6x faster on one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-merge-svd-") as tmp:
        tmp = Path(tmp)
        pm = lora(llama(args.layers, vocab=1000), tmp / "a", seed=1)
        lora(llama(args.layers, vocab=1000), tmp / "b", seed=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm.load_adapter(tmp / "b", adapter_name="b")
        inputs = [af.read_foreign(tmp / "a", "peft"), af.read_foreign(tmp / "b", "peft")]
        layers = {n: m for n, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}

        t0 = time.perf_counter()
        merged = merge_adapters(inputs, weights=WEIGHTS, strategy="svd", rank=RANK)
        ours_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm.add_weighted_adapter(["default", "b"], WEIGHTS, "mix", combination_type="svd", svd_rank=RANK)
        peft_s = time.perf_counter() - t0

        ours_err, peft_err = [], []
        with torch.no_grad():
            for name, layer in layers.items():
                module = name.removeprefix("base_model.model.")
                exact = WEIGHTS[0] * layer.get_delta_weight("default").double() + \
                    WEIGHTS[1] * layer.get_delta_weight("b").double()
                entry = merged.modules[module]
                ours = af.registry.get_kind(entry["kind"]).delta(entry, merged.module_tensors(module))
                ours_err.append(relative_error(ours, exact))
                peft_err.append(relative_error(layer.get_delta_weight("mix"), exact))
    n = len(ours_err)
    print(f"two r={RANK} all-linear LoRAs on a {args.layers}-layer Llama (hidden 1024, intermediate 2816): "
          f"{n} modules, weights {WEIGHTS}, target rank {RANK}, {args.threads} torch thread(s)")
    print(f"  PEFT add_weighted_adapter(svd): {peft_s:8.3f} s   rel. error mean {sum(peft_err) / n:.6f} "
          f"max {max(peft_err):.6f}")
    print(f"  adapterfmt merge_adapters(svd): {ours_s:8.3f} s   rel. error mean {sum(ours_err) / n:.6f} "
          f"max {max(ours_err):.6f}")
    print(f"  speed-up: {peft_s / ours_s:.1f}x; error ours / PEFT: mean "
          f"{sum(ours_err) / sum(peft_err):.6f}, worst module {max(o / p for o, p in zip(ours_err, peft_err)):.6f}")


if __name__ == "__main__":
    main()
