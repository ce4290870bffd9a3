"""Many LoRA adapters in one batch on CPU: adapterfmt's torch multi-adapter path against PEFT's mixed batch.

Both run in the same process on the same weights, interleaved (best of ``--repeats``):

* **layer**: one ``nn.Linear`` (1024 -> 2816) with n adapters. PEFT: a peft-wrapped one-layer model called with
  ``adapter_names=[...]``; adapterfmt: the base linear followed by ``multi_lora_rows`` (rows) or
  ``multi_lora_segments`` (contiguous requests).
* **model**: a Llama built from a config (no downloads; hidden 512, 4 layers), LoRA on every linear layer.
  PEFT: ``model(input_ids, adapter_names=[...])``; adapterfmt: the same base weights with a forward hook on each
  target linear that adds ``multi_lora_rows`` for the batch's per-sequence ids.

Each row of a batch gets an adapter (skewed popularity: a few hot adapters, a long tail) or the bare base
(``__base__`` / -1). Outputs are checked to agree before timing. Prints a table of times and ratios
(PEFT time / adapterfmt time; > 1 means adapterfmt is faster), the base forward for scale, and the ratio of the
adapter overheads (time minus the base forward; for the layer rows the better of rows/segments).

Run: ``python benchmarks/cpu_multi_adapter.py`` (``--small`` for a quick check; ``--json PATH`` to save rows).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from adapterfmt.kernels import LoraPool, multi_lora_rows, multi_lora_segments


def best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def skewed_ids(n_rows: int, n_adapters: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    w = torch.cat([torch.tensor([0.5]), 1.0 / (torch.arange(n_adapters) + 1.0)])  # slot 0: base only
    return (torch.multinomial(w, n_rows, replacement=True, generator=g) - 1).tolist()


def names_for(ids: list[int]) -> list[str]:
    return ["__base__" if i < 0 else f"a{i}" for i in ids]


def add_adapters(model: torch.nn.Module, ranks: list[int], targets: list[str] | str) -> torch.nn.Module:
    """A PEFT model with adapters a0..a{n-1} (random non-zero A and B, alpha = 2 r)."""
    torch.manual_seed(1)
    peft_model = None
    for i, r in enumerate(ranks):
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
        if peft_model is None:
            peft_model = get_peft_model(model, cfg, adapter_name=f"a{i}")
        else:
            peft_model.add_adapter(f"a{i}", cfg)
    for m in peft_model.modules():  # keep the deltas moderate
        if hasattr(m, "lora_B"):
            for lin in m.lora_B.values():
                lin.weight.data.mul_(0.05)
    peft_model.eval()
    return peft_model


def pools_from_peft(peft_model: torch.nn.Module, n: int) -> dict[str, LoraPool]:
    """One LoraPool per LoRA-wrapped module, keyed by the module's name in the unwrapped model."""
    pools = {}
    for name, m in peft_model.base_model.model.named_modules():
        if hasattr(m, "lora_A") and "a0" in m.lora_A:
            pools[name] = LoraPool.stack([(m.lora_A[f"a{i}"].weight.detach(), m.lora_B[f"a{i}"].weight.detach(),
                                           m.scaling[f"a{i}"]) for i in range(n)])
    return pools


def bench_layer(n: int, ranks: list[int], tokens: int, seq: int, repeats: int, small: bool) -> dict:
    d_in, d_out = (256, 704) if small else (1024, 2816)
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(d_in, d_out))
    ours = copy.deepcopy(base)[0]
    peft_model = add_adapters(base, ranks, ["0"])
    pool = pools_from_peft(peft_model, n)["0"]
    n_seq = tokens // seq
    seq_ids = skewed_ids(n_seq, n, seed=n + seq)
    x = torch.randn(n_seq, seq, d_in)
    ids = torch.tensor(seq_ids)
    order = torch.argsort(ids, stable=True)  # a serving batch arrives grouped by request: use contiguous segments
    xs = x[order].reshape(-1, d_in)
    sorted_ids = ids[order]
    starts = torch.arange(0, tokens + 1, seq)
    names = names_for(seq_ids)

    def peft_run() -> torch.Tensor:
        with torch.no_grad():
            return peft_model(x, adapter_names=names)

    def rows_run() -> torch.Tensor:
        with torch.no_grad():
            return multi_lora_rows(x, ours(x), pool.A, pool.B, pool.scales, ids)

    def seg_run() -> torch.Tensor:
        with torch.no_grad():
            return multi_lora_segments(xs, ours(xs), pool.A, pool.B, pool.scales, starts, sorted_ids)

    def base_run() -> torch.Tensor:
        with torch.no_grad():
            return ours(x)

    ref = peft_run()
    err = (rows_run() - ref).abs().max().item()
    err_seg = (seg_run().reshape(n_seq, seq, d_out) - ref[order]).abs().max().item()
    assert err < 1e-3 and err_seg < 1e-3, (err, err_seg)
    t = {"peft": [], "rows": [], "segments": [], "base": []}
    for _ in range(repeats):  # interleaved
        for k, fn in (("peft", peft_run), ("rows", rows_run), ("segments", seg_run), ("base", base_run)):
            t[k].append(best(fn, 1))
    t = {k: min(v) for k, v in t.items()}
    return {"level": "layer", "shape": f"{d_in}->{d_out}", "adapters": n, "ranks": f"{min(ranks)}-{max(ranks)}",
            "batch": f"{n_seq}x{seq}", "base_ms": 1e3 * t["base"], "peft_ms": 1e3 * t["peft"],
            "ours_rows_ms": 1e3 * t["rows"], "ours_segments_ms": 1e3 * t["segments"],
            "speedup_rows": t["peft"] / t["rows"], "speedup_segments": t["peft"] / t["segments"],
            "overhead_ratio": (t["peft"] - t["base"]) / max(min(t["rows"], t["segments"]) - t["base"], 1e-6),
            "max_abs_diff": max(err, err_seg)}


def bench_model(n: int, ranks: list[int], n_seq: int, seq: int, repeats: int, small: bool) -> dict:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=128 if small else 512, intermediate_size=352 if small else 1376,
                      num_hidden_layers=2 if small else 4, num_attention_heads=4, num_key_value_heads=4)
    base = LlamaForCausalLM(cfg).eval()
    ours = copy.deepcopy(base)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = add_adapters(base, ranks, targets)
    pools = pools_from_peft(peft_model, n)
    state: dict[str, torch.Tensor] = {}

    def hook_for(pool: LoraPool):
        def hook(module: torch.nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor | None:
            if "off" in state:
                return None
            return multi_lora_rows(inp[0], out, pool.A, pool.B, pool.scales, state["ids"])
        return hook

    handles = [ours.get_submodule(name).register_forward_hook(hook_for(p)) for name, p in pools.items()]
    seq_ids = skewed_ids(n_seq, n, seed=n + seq)
    state["ids"] = torch.tensor(seq_ids)
    names = names_for(seq_ids)
    tokens = torch.randint(0, cfg.vocab_size, (n_seq, seq), generator=torch.Generator().manual_seed(2))

    def peft_run() -> torch.Tensor:
        with torch.no_grad():
            return peft_model(input_ids=tokens, adapter_names=names).logits

    def ours_run() -> torch.Tensor:
        with torch.no_grad():
            return ours(input_ids=tokens).logits

    def base_run() -> torch.Tensor:  # the bare base model: our copy with the hooks switched off
        state["off"] = torch.ones(())
        try:
            with torch.no_grad():
                return ours(input_ids=tokens).logits
        finally:
            del state["off"]

    err = (peft_run() - ours_run()).abs().max().item()
    assert err < 1e-3, err
    t = {"peft": [], "ours": [], "base": []}
    for _ in range(repeats):
        for k, fn in (("peft", peft_run), ("ours", ours_run), ("base", base_run)):
            t[k].append(best(fn, 1))
    t = {k: min(v) for k, v in t.items()}
    for h in handles:
        h.remove()
    return {"level": "model", "shape": f"llama h{cfg.hidden_size} L{cfg.num_hidden_layers}", "adapters": n,
            "ranks": f"{min(ranks)}-{max(ranks)}", "batch": f"{n_seq}x{seq}", "base_ms": 1e3 * t["base"],
            "peft_ms": 1e3 * t["peft"], "ours_rows_ms": 1e3 * t["ours"], "ours_segments_ms": float("nan"),
            "speedup_rows": t["peft"] / t["ours"], "speedup_segments": float("nan"),
            "overhead_ratio": (t["peft"] - t["base"]) / max(t["ours"] - t["base"], 1e-6), "max_abs_diff": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes, one repeat: checks the script runs")
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args()
    reps = 1 if args.small else args.repeats
    torch.set_grad_enabled(False)
    rows = []
    mixed = [8, 16, 32, 64]
    for n, ranks in ((4, [16] * 4), (16, [16] * 16), (16, (mixed * 4)), (64, [16] * 64)):
        for tokens, seq in ((64, 1), (512, 32)):
            if args.small and n > 16:
                continue
            rows.append(bench_layer(n, ranks, tokens, seq, reps, args.small))
            print(_fmt(rows[-1]), flush=True)
    for n, n_seq, seq in ((4, 64, 1), (16, 64, 1), (16, 16, 32)):
        rows.append(bench_model(n, [16] * n, n_seq, seq, reps, args.small))
        print(_fmt(rows[-1]), flush=True)
    print()
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


def _fmt(r: dict) -> str:
    return (f"{r['level']:5} {r['shape']:>18} n={r['adapters']:<3} r={r['ranks']:<6} batch={r['batch']:<6} "
            f"peft {r['peft_ms']:.2f} ms, ours {r['ours_rows_ms']:.2f} ms -> {r['speedup_rows']:.2f}x")


def table(rows: list[dict]) -> str:
    head = ("| level | shape | adapters | ranks | batch (seqs x tokens) | base ms | PEFT mixed ms | ours rows ms | "
            "ours segments ms | PEFT/ours rows | PEFT/ours segments | PEFT/ours adapter overhead |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        seg = "-" if r["ours_segments_ms"] != r["ours_segments_ms"] else f"{r['ours_segments_ms']:.2f}"
        sps = "-" if r["speedup_segments"] != r["speedup_segments"] else f"{r['speedup_segments']:.2f}x"
        lines.append(f"| {r['level']} | {r['shape']} | {r['adapters']} | {r['ranks']} | {r['batch']} | "
                     f"{r['base_ms']:.2f} | {r['peft_ms']:.2f} | {r['ours_rows_ms']:.2f} | {seg} | "
                     f"{r['speedup_rows']:.2f}x | {sps} | {r['overhead_ratio']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
