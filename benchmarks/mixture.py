"""Mixture of LoRA experts (kind ``mixture``) on CPU: one Llama decoder layer, forward time against a single
unmerged LoRA and against the naive loop, all in the same run on the same weights.

The layer has the 220M Llama's shape (hidden 1024, 16 heads, intermediate 2816; ``adapterfmt.tiny``), every linear
map targeted (q, k, v, o, gate, up, down), batch 8 x 128 tokens, fp32. Rows:

* **base**: the layer alone;
* **lora**: one r=16 LoRA attached unmerged (``af.attach``, the lowrank kind's fused path);
* **mixture**: 8 r=16 experts, top-2 per token, a router per module (``af.attach``: routing + ``multi_lora_rows``);
* **naive loop**: the same mixture as a forward hook looping over tokens and their chosen experts in Python
  (the dense reference's structure), timed on the first ``--naive-tokens`` tokens of each row and scaled up
  (its cost is linear in the tokens).

Outputs are checked (mixture against the naive loop on those tokens) before timing; each timing is the median
of ``--repeats`` runs, the rows interleaved. Run: ``python benchmarks/mixture.py`` (``--json PATH`` to save).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

import adapterfmt as af
from adapterfmt.plugins.methods.mixture import mixture_adapter, route
from adapterfmt.tiny import TinyConfig, build_tiny

TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def lora(model: torch.nn.Module, seed: int, r: int) -> af.Adapter:
    gen = torch.Generator().manual_seed(seed)
    modules, tensors = {}, {}
    for t in TARGETS:
        path = f"model.layers.0.{t}"
        w = model.get_submodule(path).weight
        modules[path] = af.lowrank_entry(list(w.shape), 2.0)
        tensors[f"{path}.lora_A"] = torch.randn(r, w.shape[1], generator=gen) / w.shape[1] ** 0.5
        tensors[f"{path}.lora_B"] = torch.randn(w.shape[0], r, generator=gen) / r
    return af.Adapter(af.new_manifest("lora", modules), tensors)


def naive_hooks(model: torch.nn.Module, mix: af.Adapter, tokens: int) -> list:
    """Forward hooks adding the mixture token by token, expert by expert (positions < ``tokens`` only)."""
    handles = []
    for path, entry in mix.modules.items():
        t, p = mix.module_tensors(path), entry["params"]

        def hook(module, args, y, t=t, p=p):
            x = args[0]
            out = y.clone()
            for b in range(x.shape[0]):
                for pos in range(min(tokens, x.shape[1])):
                    xt = x[b, pos]
                    idx, w = route(xt[None], t["router"], p["top_k"], p["temperature"])
                    for g, e in zip(w[0].tolist(), idx[0].tolist(), strict=True):
                        out[b, pos] += g * p["scales"][e] * (t["lora_B"][e] @ (t["lora_A"][e] @ xt))
            return out

        handles.append(model.get_submodule(path).register_forward_hook(hook))
    return handles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--naive-tokens", type=int, default=4)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = TinyConfig(vocab_size=32, hidden=1024, layers=1, heads=16, intermediate=2816)
    model = build_tiny(0, cfg).eval()
    layer = model.model.layers[0]
    x = torch.randn(args.batch, args.seq, cfg.hidden, generator=torch.Generator().manual_seed(1))
    single = lora(model, 100, args.rank)
    experts = {f"e{i}": lora(model, i, args.rank) for i in range(args.experts)}
    routers = {f"model.layers.0.{t}": torch.randn(args.experts, model.get_submodule(f"model.layers.0.{t}").weight.shape[1],
                                                  generator=torch.Generator().manual_seed(50 + i))
               for i, t in enumerate(TARGETS)}
    mix = mixture_adapter(experts, routers, top_k=args.top_k)
    af.attach(model, single, name="lora", activate=False)
    af.attach(model, mix, name="mixture", activate=False)

    def run(active: list[str]) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            af.activate(model, active)
            with torch.no_grad():
                return layer(x)
        return fn

    xs = x[:, : args.naive_tokens]

    def naive() -> torch.Tensor:
        af.activate(model, [])
        handles = naive_hooks(model, mix, args.naive_tokens)
        try:
            with torch.no_grad():
                return layer(xs)
        finally:
            for h in handles:
                h.remove()

    got = run(["mixture"])()[:, : args.naive_tokens]
    ref = naive()  # causal attention: the first positions do not depend on later ones
    err = float((got - ref).abs().max() / ref.abs().max())
    assert err < 1e-5, err

    rows = {"base": run([]), "lora": run(["lora"]), "mixture": run(["mixture"]), "naive loop": naive}
    times: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(args.repeats):
        for k, fn in rows.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    med["naive loop"] *= args.seq / args.naive_tokens  # per token: scaled to the whole sequence
    tokens = args.batch * args.seq
    print(f"one Llama layer (hidden {cfg.hidden}, intermediate {cfg.intermediate}), {len(TARGETS)} linear maps, "
          f"batch {args.batch} x {args.seq} tokens, fp32, {torch.get_num_threads()} threads; "
          f"{args.experts} experts r={args.rank}, top-{args.top_k}; max rel. diff mixture vs naive {err:.1e}")
    print(f"{'row':<12} {'median s':>10} {'ms/token':>9} {'vs lora':>8}")
    for k, v in med.items():
        print(f"{k:<12} {v:>10.4f} {1000 * v / tokens:>9.4f} {v / med['lora']:>8.2f}")
    over = (med["mixture"] - med["base"]) / (med["lora"] - med["base"])
    print(f"mixture / lora = {med['mixture'] / med['lora']:.2f}x (target <= 1.5x); adapter overhead ratio {over:.1f}x; "
          f"naive loop / mixture = {med['naive loop'] / med['mixture']:.0f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"median_s": med, "rel_err": err, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
