"""`adapter compress --rank`: the factored resize (QR of B and A^T, SVD of the small r x r core, errors through
stacked factors) against the dense path it replaced (form dW = B @ A in fp64, full SVD, dense error), same
adapter, same target rank, same run.

Each module is a random rank-``--rank`` LoRA with a decaying spectrum; both paths keep ``--to``. The check
column is max |dW_factored - dW_dense| / max |dW_dense| over the modules (they compute the same best
rank-k approximation), and the two reported relative errors.

    python benchmarks/compress_resize.py [--out 4096] [--in 11008] [--modules 2] [--rank 64] [--to 16]
                                         [--threads 1] [--no-dense]
"""

from __future__ import annotations

import argparse
import time

import torch

import adapterfmt as af


def make_adapter(n_out: int, n_in: int, modules: int, rank: int) -> af.Adapter:
    gen = torch.Generator().manual_seed(0)
    entries, tensors = {}, {}
    for i in range(modules):
        m = f"model.layers.{i}.mlp.up_proj"
        entries[m] = af.lowrank_entry([n_out, n_in], scale=2.0)
        tensors[f"{m}.lora_A"] = torch.randn(rank, n_in, generator=gen) / n_in ** 0.5
        tensors[f"{m}.lora_B"] = torch.randn(n_out, rank, generator=gen) * 0.9 ** torch.arange(rank)
    return af.Adapter(af.new_manifest("lora", entries), tensors)


def dense_resize(adapter: af.Adapter, k: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The replaced path, written out: dW in fp64, its full SVD, the best rank-k dW and its relative error."""
    out, errors = {}, {}
    for m, e in sorted(adapter.modules.items()):
        t = adapter.module_tensors(m)
        dw = e["params"]["scale"] * t["lora_B"].double() @ t["lora_A"].double()
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        out[m] = (u[:, :k] * s[:k]) @ vh[:k]
        errors[m] = float((out[m] - dw).norm() / dw.norm())
    return out, errors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=int, default=4096)
    ap.add_argument("--in", dest="n_in", type=int, default=11008)
    ap.add_argument("--modules", type=int, default=2)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--to", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-dense", action="store_true", help="skip the dense baseline (minutes at full size)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    adapter = make_adapter(args.out, args.n_in, args.modules, args.rank)
    af.compress_adapter(make_adapter(8, 8, 1, 2), steps=[{"method": "resize", "rank": 1}])  # plugins load once

    t0 = time.perf_counter()
    small = af.compress_adapter(adapter, steps=[{"method": "resize", "rank": args.to}])
    factored_s = time.perf_counter() - t0
    errs = small.manifest["compression"]["module_errors"]
    print(f"{args.modules} x [{args.out} x {args.n_in}] rank {args.rank} -> {args.to}, {args.threads} thread(s)")
    print(f"factored: {factored_s:.3f} s, rel. error max {max(errs.values()):.6e}")
    if args.no_dense:
        return
    t0 = time.perf_counter()
    dense, dense_errs = dense_resize(adapter, args.to)
    dense_s = time.perf_counter() - t0
    kind = af.registry.get_kind("lowrank")
    diff = max(float((kind.delta(small.modules[m], small.module_tensors(m)).double() - d).abs().max()
                     / d.abs().max()) for m, d in dense.items())
    print(f"dense:    {dense_s:.3f} s, rel. error max {max(dense_errs.values()):.6e}")
    print(f"ratio:    {dense_s / factored_s:.0f}x faster; max |dW_factored - dW_dense| / max |dW_dense| = {diff:.1e}")


if __name__ == "__main__":
    main()
