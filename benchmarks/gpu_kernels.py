"""GPU benchmark of the Triton apply kernels against their torch paths and PEFT (one prepared run, < 5 min).

Needs a CUDA GPU (exits with a message otherwise; ``--cpu-check`` runs the whole script on tiny shapes through
the Triton interpreter to check the harness itself). All in fp16 by default (``--dtype bf16`` for bf16).

1. **single**: one adapter on a linear layer, 4096->4096 and 4096->11008, r in {8, 16, 64}, batch 1..256:
   base GEMM (``F.linear``), the fused Triton ``lora_linear``, cuBLAS base + Triton ``lora_delta`` in place,
   the torch path (``F.linear`` + two small GEMMs) and PEFT's LoRA ``Linear`` forward.
   Target: fused apply at most 10% over the base GEMM at batch 1-16, r=16.
2. **mixed**: n in {1, 4, 16, 64} adapters (r=16; and ranks 8..64 mixed at n=16) over one batch, rows spread
   with skewed popularity plus base-only rows: base GEMM + Triton ``multi_lora_rows``, base + the torch path,
   and PEFT with ``adapter_names=``. Target: 16 adapters at least 3x PEFT's mixed-batch throughput.
3. **routed**: the ``mixture`` kind's per-token path (MeteoRA), 8 r=16 experts, top-2 per token, one router:
   base GEMM + routing + ``multi_lora_rows`` once per chosen slot with the gate weights folded into the rows
   (Triton, and the torch rows path), base + every expert as two GEMMs gated to zero off the top-2 (the CPU
   path), base + the naive loop over experts (MeteoRA's ``_accelerated_forward_inner_loop``: each expert's
   tokens gathered, ``index_add_``), against one unmerged r=16 LoRA (fused ``lora_linear``).
   Target: the Triton mixture at most 1.5x the single LoRA.
4. **sparse / ternary**: the CSR and bit-plane kernels against their torch paths at 1% / 10% density.

Prints one table per part and writes everything as JSON to ``--out``. Every timed kernel is first checked
against the reference of :mod:`adapterfmt.kernels.reference`.

Run: ``python benchmarks/gpu_kernels.py --out gpu_kernels.json``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

CPU_CHECK = "--cpu-check" in sys.argv
if CPU_CHECK:
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

BUDGET_S = 270.0
_T0 = time.perf_counter()


def over_budget() -> bool:
    return time.perf_counter() - _T0 > BUDGET_S


def bench(fn: Callable[[], object], device: str, graph: bool = False) -> float:
    """Milliseconds per call: triton.testing.do_bench (median) on GPU, or with ``graph`` the call replayed from a
    CUDA graph (no Python launch overhead, as a serving engine runs decode) when it can be captured; best of 2
    on the CPU check."""
    if device == "cuda":
        import triton.testing

        if graph:
            try:
                return float(triton.testing.do_bench_cudagraph(fn, rep=40))
            except Exception as e:  # not capturable: fall back to eager timing
                print(f"  (CUDA graph capture failed: {type(e).__name__}; timing eagerly)", flush=True)
                torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=10, rep=40))
    ts = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * min(ts)


def use(backend: str) -> None:
    os.environ["ADAPTERFMT_KERNELS"] = backend


def check(out: torch.Tensor, ref: torch.Tensor, what: str, tol: float) -> float:
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1.0)).item()
    if err > tol:
        raise SystemExit(f"{what}: relative error {err:.3g} exceeds {tol}")
    return err


def peft_layer(d_in: int, d_out: int, ranks: list[int], dtype: torch.dtype, device: str,
               weight: torch.Tensor) -> torch.nn.Module:
    """A peft-wrapped one-layer model with adapters a0..a{n-1} (random non-zero factors)."""
    from peft import LoraConfig, get_peft_model

    base = torch.nn.Sequential(torch.nn.Linear(d_in, d_out, bias=False))
    base[0].weight.data.copy_(weight.float().cpu())
    model = None
    for i, r in enumerate(ranks):
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], init_lora_weights=False)
        model = get_peft_model(base, cfg, adapter_name=f"a{i}") if model is None else model
        if i:
            model.add_adapter(f"a{i}", cfg)
    return model.to(device=device, dtype=dtype).eval()


def pool_of(model: torch.nn.Module, n: int):
    from adapterfmt.kernels import LoraPool

    m = model.base_model.model[0]
    for i in range(n):
        m.lora_B[f"a{i}"].weight.data.mul_(0.05)
    return LoraPool.stack([(m.lora_A[f"a{i}"].weight.detach(), m.lora_B[f"a{i}"].weight.detach(), m.scaling[f"a{i}"])
                           for i in range(n)])


def part_single(shapes, ranks, batches, dtype, device, tol) -> list[dict]:
    from adapterfmt.kernels import lora_delta, lora_linear
    from adapterfmt.kernels.reference import lora_linear_ref

    rows = []
    for d_in, d_out in shapes:
        w = torch.randn(d_out, d_in, device=device, dtype=dtype) / d_in ** 0.5
        for r in ranks:
            if over_budget():
                return rows
            model = peft_layer(d_in, d_out, [r], dtype, device, w)
            pool = pool_of(model, 1)
            A, B, s = pool.A[0], pool.B[0], float(pool.scales[0])
            for m in batches:
                x = torch.randn(m, d_in, device=device, dtype=dtype)
                use("triton")
                err = check(lora_linear(x, w, A, B, s), lora_linear_ref(x, w, A, B, s), "lora_linear", tol)
                with torch.no_grad():
                    check(model(x), lora_linear_ref(x, w, A, B, s), "peft vs reference", tol)

                def split() -> torch.Tensor:
                    return lora_delta(x, A, B, s, out=F.linear(x, w))

                t = {"base_gemm": bench(lambda: F.linear(x, w), device),
                     "fused_triton": bench(lambda: lora_linear(x, w, A, B, s), device),
                     "gemm+triton_delta": bench(split, device),
                     "graph_base_gemm": bench(lambda: F.linear(x, w), device, graph=True),
                     "graph_fused_triton": bench(lambda: lora_linear(x, w, A, B, s), device, graph=True),
                     "graph_gemm+triton_delta": bench(split, device, graph=True)}
                use("torch")
                t["torch_path"] = bench(lambda: lora_linear(x, w, A, B, s), device)
                with torch.no_grad():
                    t["peft"] = bench(lambda: model(x), device)
                rows.append({"part": "single", "shape": f"{d_in}->{d_out}", "r": r, "batch": m, "err": err,
                             **{f"{k}_ms": v for k, v in t.items()},
                             "fused_over_base": t["fused_triton"] / t["base_gemm"] - 1,
                             "split_over_base": t["gemm+triton_delta"] / t["base_gemm"] - 1,
                             "graph_fused_over_base": t["graph_fused_triton"] / t["graph_base_gemm"] - 1,
                             "graph_split_over_base": t["graph_gemm+triton_delta"] / t["graph_base_gemm"] - 1,
                             "peft_over_base": t["peft"] / t["base_gemm"] - 1})
            del model
    return rows


def skewed_ids(t: int, n: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(t + n)
    w = torch.cat([torch.tensor([0.25]), 1.0 / (torch.arange(n) + 1.0)])
    return (torch.multinomial(w, t, replacement=True, generator=g) - 1).to(device)


def part_mixed(shapes, configs, batches, dtype, device, tol) -> list[dict]:
    from adapterfmt.kernels import multi_lora_rows
    from adapterfmt.kernels.reference import multi_lora_rows_ref

    rows = []
    for d_in, d_out in shapes:
        w = torch.randn(d_out, d_in, device=device, dtype=dtype) / d_in ** 0.5
        for label, ranks in configs:
            if over_budget():
                return rows
            n = len(ranks)
            model = peft_layer(d_in, d_out, ranks, dtype, device, w)
            pool = pool_of(model, n)
            for m in batches:
                x = torch.randn(m, d_in, device=device, dtype=dtype)
                ids = skewed_ids(m, n, device)
                names = ["__base__" if i < 0 else f"a{i}" for i in ids.tolist()]
                use("triton")
                y = F.linear(x, w)
                ref = multi_lora_rows_ref(x, y, pool.A, pool.B, pool.scales, ids)
                err = check(multi_lora_rows(x, y, pool.A, pool.B, pool.scales, ids), ref, "multi_lora_rows", tol)
                with torch.no_grad():
                    check(model(x, adapter_names=names), ref, "peft mixed vs reference", tol)

                def ours() -> torch.Tensor:
                    return multi_lora_rows(x, F.linear(x, w), pool.A, pool.B, pool.scales, ids)

                t = {"base_gemm": bench(lambda: F.linear(x, w), device), "triton_rows": bench(ours, device),
                     "graph_triton_rows": bench(ours, device, graph=True)}
                use("torch")
                t["torch_rows"] = bench(ours, device)
                with torch.no_grad():
                    t["peft_mixed"] = bench(lambda: model(x, adapter_names=names), device)
                rows.append({"part": "mixed", "shape": f"{d_in}->{d_out}", "adapters": n, "ranks": label,
                             "batch": m, "err": err, **{f"{k}_ms": v for k, v in t.items()},
                             "peft_over_triton": t["peft_mixed"] / t["triton_rows"],
                             "triton_over_base": t["triton_rows"] / t["base_gemm"] - 1})
            del model
    return rows


def part_compressed(shapes, batches, dtype, device, tol) -> list[dict]:
    from adapterfmt.kernels import pack_ternary_planes, sparse_apply, ternary_apply, to_csr
    from adapterfmt.kernels.reference import sparse_apply_ref, ternary_apply_ref

    rows = []
    for d_in, d_out in shapes:
        w = torch.randn(d_out, d_in, device=device, dtype=dtype) / d_in ** 0.5
        for density in (0.01, 0.1):
            if over_budget():
                return rows
            keep = torch.rand(d_out, d_in, device=device) < density
            idx = keep.flatten().nonzero().flatten()
            vals = torch.randn(idx.shape[0], device=device) * 0.01
            csr = to_csr(idx, vals, (d_out, d_in))
            signs = torch.where(keep, torch.randint(0, 2, keep.shape, device=device) * 2 - 1, 0)
            pos, neg = pack_ternary_planes(signs)
            scale = torch.full((d_out,), 0.01, device=device)
            for m in batches:
                x = torch.randn(m, d_in, device=device, dtype=dtype)
                y = F.linear(x, w)
                use("triton")
                check(sparse_apply(x, y, idx, vals, (d_out, d_in), csr=csr),
                      sparse_apply_ref(x, y, idx, vals, (d_out, d_in)), "sparse_apply", tol)
                check(ternary_apply(x, y, pos, neg, scale, d_in), ternary_apply_ref(x, y, pos, neg, scale, d_in),
                      "ternary_apply", tol)
                t = {"base_gemm": bench(lambda: F.linear(x, w), device),
                     "sparse_triton": bench(lambda: sparse_apply(x, y, idx, vals, (d_out, d_in), csr=csr), device),
                     "ternary_triton": bench(lambda: ternary_apply(x, y, pos, neg, scale, d_in), device)}
                use("torch")
                t["sparse_torch"] = bench(lambda: sparse_apply(x, y, idx, vals, (d_out, d_in), csr=csr), device)
                t["ternary_torch"] = bench(lambda: ternary_apply(x, y, pos, neg, scale, d_in), device)
                rows.append({"part": "compressed", "shape": f"{d_in}->{d_out}", "density": density, "batch": m,
                             **{f"{k}_ms": v for k, v in t.items()}})
    return rows


def part_routed(shapes, batches, dtype, device, tol, experts: int = 8, r: int = 16, top_k: int = 2) -> list[dict]:
    from adapterfmt.kernels import lora_linear, multi_lora_rows
    from adapterfmt.kernels.reference import multi_lora_rows_ref
    from adapterfmt.plugins.methods.mixture import Mixture, gemm_forward, mixture_entry, route

    kind, rows = Mixture(), []
    for d_in, d_out in shapes:
        if over_budget() and rows:  # the first shape runs even past the budget (about 30 s): the must-show
            return rows
        w = torch.randn(d_out, d_in, device=device, dtype=dtype) / d_in ** 0.5
        entry = mixture_entry([d_out, d_in], [f"e{i}" for i in range(experts)], top_k=top_k,
                              scales=[2.0] * experts)
        p = entry["params"]
        t = kind.bind(None, entry, {"router": torch.randn(experts, d_in, device=device, dtype=dtype) / d_in ** 0.5,
                                    "lora_A": torch.randn(experts, r, d_in, device=device, dtype=dtype) / d_in ** 0.5,
                                    "lora_B": torch.randn(experts, d_out, r, device=device, dtype=dtype) * 0.05})
        scales = torch.full((experts,), 2.0, device=device)
        for m in batches:
            x = torch.randn(m, d_in, device=device, dtype=dtype)

            def rows_path() -> torch.Tensor:  # what the kind runs on CUDA: one rows call per chosen slot
                out, (idx, g) = F.linear(x, w), route(x, t["router"], top_k, 1.0)
                for j in range(top_k):
                    out = multi_lora_rows(x * g[:, j, None].to(dtype), out, t["lora_A"], t["lora_B"], scales, idx[:, j])
                return out

            def gemm() -> torch.Tensor:
                return gemm_forward(p, t, x, F.linear(x, w))[1]

            def expert_loop() -> torch.Tensor:
                y = F.linear(x, w)
                idx, g = route(x, t["router"], top_k, 1.0)
                for e in range(experts):
                    tok, slot = torch.where(idx == e)
                    if tok.numel():
                        part = F.linear(F.linear(x[tok], t["lora_A"][e]), t["lora_B"][e]) * 2.0
                        y.index_add_(0, tok, part * g[tok, slot, None].to(dtype))
                return y

            idx, g = route(x, t["router"], top_k, 1.0)
            ref = F.linear(x, w).float()
            for j in range(top_k):  # the dense reference: token by token, slot by slot, in fp32
                ref = multi_lora_rows_ref(x.float() * g[:, j, None], ref, t["lora_A"], t["lora_B"], scales, idx[:, j])
            use("triton")
            err = check(rows_path(), ref, "mixture (triton rows)", tol)
            if device == "cuda":  # the kind itself takes this path on CUDA (on the CPU: the two GEMMs)
                check(kind.forward(None, entry, t, x, F.linear(x, w)), ref, "mixture kind forward", tol)
            check(expert_loop(), ref, "naive expert loop", tol)
            check(gemm(), ref, "mixture (two GEMMs)", tol)
            lone = (t["lora_A"][0], t["lora_B"][0])
            tm = {"base_gemm": bench(lambda: F.linear(x, w), device),
                  "single_lora": bench(lambda: lora_linear(x, w, *lone, 2.0), device),
                  "mixture_triton": bench(rows_path, device), "mixture_gemm": bench(gemm, device),
                  "expert_loop": bench(expert_loop, device)}
            use("torch")
            check(rows_path(), ref, "mixture (torch rows)", tol)
            tm["mixture_torch_rows"] = bench(rows_path, device)
            rows.append({"part": "routed", "shape": f"{d_in}->{d_out}", "experts": experts, "top_k": top_k,
                         "batch": m, "err": err, **{f"{k}_ms": v for k, v in tm.items()},
                         "triton_over_lora": tm["mixture_triton"] / tm["single_lora"],
                         "loop_over_triton": tm["expert_loop"] / tm["mixture_triton"]})
    return rows


def table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    fmt = [lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt[0](r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def verdicts(single: list[dict], mixed: list[dict], routed: list[dict]) -> list[str]:
    out = []
    s = [r for r in single if r["r"] == 16 and r["batch"] <= 16]
    if s:
        worst = max(r["fused_over_base"] for r in s)
        worst_split = max(r["split_over_base"] for r in s)
        g = max(r["graph_fused_over_base"] for r in s)
        g_split = max(r["graph_split_over_base"] for r in s)
        out.append(f"fused apply over base GEMM, r=16, batch 1-16: worst {100 * worst:+.1f}% eager, "
                   f"{100 * g:+.1f}% from a CUDA graph (target <= +10%: "
                   f"{'MET' if min(worst, g) <= 0.10 else 'NOT MET'}); cuBLAS base + Triton delta: worst "
                   f"{100 * worst_split:+.1f}% eager, {100 * g_split:+.1f}% graph")
    m = [r for r in mixed if r["adapters"] == 16]
    if m:
        least = min(r["peft_over_triton"] for r in m)
        out.append(f"16-adapter mixed batch, PEFT time / ours: min {least:.2f}x "
                   f"(target >= 3x: {'MET' if least >= 3 else 'NOT MET'})")
    if routed:
        worst = max(r["triton_over_lora"] for r in routed)
        out.append(f"mixture of {routed[0]['experts']} r=16 experts, top-{routed[0]['top_k']}, over one unmerged "
                   f"LoRA: worst {worst:.2f}x (target <= 1.5x: {'MET' if worst <= 1.5 else 'NOT MET'}); naive "
                   f"expert loop / ours: min {min(r['loop_over_triton'] for r in routed):.2f}x")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=not CPU_CHECK, help="write the results as JSON here")
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--cpu-check", action="store_true", help="tiny shapes on CPU via TRITON_INTERPRET=1")
    args = ap.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    if args.cpu_check:
        device, shapes, batches = "cpu", [(64, 96)], [1, 17]
        ranks, configs = [8, 16], [("16", [16] * 2), ("8-64", [8, 64, 16, 32])]
        dtype, tol = torch.float32, 1e-4
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                             "use --cpu-check to test the script on tiny shapes through the Triton interpreter")
        try:
            import triton  # noqa: F401
        except ImportError:
            raise SystemExit("gpu_kernels.py needs triton installed") from None
        device, shapes = "cuda", [(4096, 4096), (4096, 11008)]
        batches, ranks = [1, 4, 16, 64, 256], [8, 16, 64]
        configs = [("16", [16]), ("16", [16] * 4), ("16", [16] * 16), ("8-64", [8, 16, 32, 64] * 4),
                   ("16", [16] * 64)]
    torch.manual_seed(0)
    single = part_single(shapes, ranks, batches, dtype, device, tol)
    print("## single adapter\n" + table(single), flush=True)
    mixed = part_mixed(shapes, configs, [b for b in batches if b > 1] or batches, dtype, device, tol)
    print("\n## mixed batch\n" + table(mixed), flush=True)
    routed = part_routed(shapes, [16, 256, 1024] if device == "cuda" else batches, dtype, device, tol)
    print("\n## routed mixture (per-token ids and gate weights)\n" + table(routed), flush=True)
    comp = part_compressed(shapes, [1, 16] if device == "cuda" else batches, dtype, device, tol)
    print("\n## sparse / ternary\n" + table(comp), flush=True)
    verdict = verdicts(single, mixed, routed)
    print("\n" + "\n".join(verdict))
    if over_budget():
        print(f"(stopped early: time budget of {BUDGET_S:.0f} s reached)")
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter check)",
            "torch": torch.__version__, "dtype": str(dtype), "wall_s": time.perf_counter() - _T0,
            "verdicts": verdict, "single": single, "mixed": mixed, "compressed": comp,
            "routed": routed}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
