"""Mixtures of LoRA experts with a learned top-k router per module (MeteoRA), kind ``mixture`` (spec 6.10.13).

One adapter holds N low-rank experts, stacked, and a router per targeted module. For each token ``x`` (a
row of the module input) the router's logits ``l = router @ x`` pick the ``top_k`` experts; their gate
weights are 1 when ``top_k = 1`` and ``softmax(l_S / temperature)`` otherwise, and the module output gets
``sum_j w_j * scale_j * B_j (A_j x)``. This is the gating of MeteoRA's reference code (``MoELinear.forward``,
accelerated path: top-k of the raw gate logits, then a softmax over the k chosen logits divided by the
temperature ``T``; weight 1 for top-1). Where this implementation differs from that code:

- the logits are computed in at least float32 (MeteoRA: in the model's dtype), and ties between equal logits
  go to the lower expert index (``torch.topk`` leaves them unspecified), so every reader routes alike;
- ``granularity = "sequence"`` is an addition (MeteoRA routes every token): one routing per sequence from the
  mean over the positions of the module input of that forward call (with a KV cache: the new positions only);
- MeteoRA's gate has no bias and neither has ``router``; its lora dropout acts only in training.

Experts are addressable by name (``params.experts``): :func:`expert_adapter` gives one expert as a plain
``lowrank`` adapter and :func:`mixture_adapter` stacks ``lowrank`` adapters (experts of lower rank are
zero-padded, which adds nothing) with routers into a mixture. Apply, with no Python loop over tokens: top-1
routing, and every routing on CUDA, goes through ``af.multi_lora_rows`` (the Triton BGMV kernel on CUDA, the
grouped torch path elsewhere), one call per chosen slot ``j < top_k`` with the gate weight folded into the
input rows; top-k >= 2 on the CPU runs every expert as two GEMMs (``x @ A_all^T``, gated to zero off the top-k,
then ``@ B_all^T``), which costs ``N r (in + out)`` per token but beats gathering rows per expert there
(benchmarks/mixture.py). A mixture depends on its input, so it is neither merged into weights nor combined in
delta space (both refused).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn

import adapterfmt as af

GRANULARITIES = ("token", "sequence")
NAME = re.compile(r"^[A-Za-z0-9_]+$")


def _fail(module: str, msg: str) -> af.FormatError:
    return af.FormatError(f"module {module!r}: {msg}")


def _linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and module.weight.dim() == 2)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


class Mixture(af.DeltaKind):
    name = "mixture"
    required_roles = ("router", "lora_A", "lora_B")
    layout_sensitive = True

    def check(self, module: str, entry: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> None:
        p = entry.get("params", {})
        experts = p.get("experts")
        if not isinstance(experts, list) or not experts or not all(isinstance(e, str) and NAME.match(e)
                                                                    for e in experts) or len(set(experts)) != len(experts):
            raise _fail(module, "mixture params.experts must be a non-empty list of distinct names matching "
                                "^[A-Za-z0-9_]+$")
        n = len(experts)
        scales = p.get("scales", [1.0] * n)
        if not isinstance(scales, list) or len(scales) != n or not all(_number(s) for s in scales):
            raise _fail(module, f"mixture params.scales must be {n} finite numbers, one per expert")
        k = p.get("top_k")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
            raise _fail(module, f"mixture params.top_k must be an integer in [1, {n}], got {k!r}")
        t = p.get("temperature", 1.0)
        if not _number(t) or t <= 0:
            raise _fail(module, f"mixture params.temperature must be a finite number > 0, got {t!r}")
        if p.get("granularity", "token") not in GRANULARITIES:
            raise _fail(module, f"mixture params.granularity must be 'token' or 'sequence', got {p.get('granularity')!r}")
        fshape = af.function_shape(entry)
        if len(fshape) != 2:
            raise _fail(module, f"mixture adapts 2-D weights, shape is {list(entry['shape'])}")
        out_f, in_f = fshape
        a, b, r = shapes["lora_A"], shapes["lora_B"], shapes["router"]
        if len(a) != 3 or a[0] != n or a[2] != in_f or b != (n, out_f, a[1]) or r != (n, in_f):
            raise _fail(module, f"mixture of {n} experts needs router [{n}, {in_f}], lora_A [{n}, r, {in_f}] and "
                                f"lora_B [{n}, {out_f}, r], got {list(r)}, {list(a)}, {list(b)}")

    def rank(self, entry: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> int:
        return shapes["lora_A"][1]

    def is_additive(self, entry: Mapping[str, Any], roles: Collection[str]) -> bool:
        return False

    def check_module(self, path: str, entry: Mapping[str, Any], module: nn.Module) -> None:
        super().check_module(path, entry, module)
        if not _linear_like(module):
            raise af.FormatError(f"module {path!r}: a mixture applies to linear maps (Linear, Conv1D), "
                                 f"not {type(module).__name__}")

    def bind(self, module: nn.Module, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Adds the stacked factors the CPU path multiplies by: ``[router; A_all]`` and ``B_all`` ``[out, N r]``."""
        n, r = t["lora_A"].shape[:2]
        return {**t, "_stack": torch.cat([t["router"], t["lora_A"].reshape(n * r, -1)]),
                "_b_cat": t["lora_B"].permute(1, 0, 2).reshape(t["lora_B"].shape[1], n * r)}

    def forward(self, module: nn.Module, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor], x: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
        p = entry["params"]
        n, k = len(p["experts"]), int(p["top_k"])
        sequence = p.get("granularity", "token") == "sequence"
        if sequence and x.dim() < 3:
            raise af.UnsupportedError(f"a sequence-granularity mixture needs inputs [batch, positions, features], "
                                      f"got {list(x.shape)}")
        units = x.reshape(-1, x.shape[-2], x.shape[-1]).mean(-2) if sequence else x.reshape(-1, x.shape[-1])
        scales = torch.tensor([float(s) for s in p.get("scales", [1.0] * n)], dtype=torch.float32, device=x.device)
        a, b = t["lora_A"].to(x.dtype), t["lora_B"].to(x.dtype)
        temperature = float(p.get("temperature", 1.0))
        if k > 1 and not x.is_cuda:  # the CPU: every expert in two GEMMs, gates zero off the top-k
            x2, r = x.reshape(-1, x.shape[-1]), a.shape[1]
            stack = t["_stack"].to(x.dtype)
            if sequence or torch.promote_types(x.dtype, torch.float32) != x.dtype:
                idx, w = route(units, t["router"], k, temperature)
                mid = x2 @ stack[n:].t()
            else:  # fp32 / fp64 tokens: the router's logits come out of the same GEMM
                both = x2 @ stack.t()
                idx, w = pick(both[:, :n], k, temperature)
                mid = both[:, n:]
            gates = torch.zeros(units.shape[0], n, dtype=torch.float32, device=x.device)
            gates.scatter_(1, idx, w * scales[idx])
            if sequence:
                gates = gates.repeat_interleave(x.shape[-2], dim=0)
            mid = (mid.reshape(-1, n, r) * gates.to(x.dtype).unsqueeze(-1)).view(-1, n * r)
            b_cat, y2 = t["_b_cat"].to(x.dtype).t(), y.reshape(-1, y.shape[-1])
            if y.requires_grad and torch.is_grad_enabled():
                return torch.addmm(y2, mid, b_cat).reshape(y.shape)
            return y2.addmm_(mid, b_cat).reshape(y.shape)  # in place, as the lowrank kind's inference path
        idx, w = route(units, t["router"], k, temperature)
        rows = x.reshape(-1, x.shape[-2], x.shape[-1]) if sequence else x.reshape(-1, x.shape[-1])
        out = y.reshape(*rows.shape[:-1], y.shape[-1])
        for j in range(k):  # one batched call per chosen slot; the gate weight scales that slot's input rows
            xj = rows if k == 1 else rows * w[:, j].to(x.dtype).reshape(-1, *([1] * (rows.dim() - 1)))
            out = af.multi_lora_rows(xj, out, a, b, scales, idx[:, j])
        return out.reshape(y.shape)

    def merge(self, module: nn.Module, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor]) -> Any:
        raise af.UnsupportedError("a mixture routes each token by its input, so it cannot be merged into the "
                                  "weights; keep it unmerged, or take one expert (expert_adapter)")


def route(x: torch.Tensor, router: torch.Tensor, top_k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(experts [T, top_k] int64, gate weights [T, top_k] fp32)`` for router inputs ``x [T, in]``: :func:`pick`
    on the logits ``x @ router^T``, computed in at least fp32."""
    dt = torch.promote_types(x.dtype, torch.float32)
    return pick(x.to(dt) @ router.to(device=x.device, dtype=dt).t(), top_k, temperature)


def pick(logits: torch.Tensor, top_k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top_k`` largest logits per row (ties to the lower index) and their gate weights: 1 for top-1,
    else ``softmax(chosen logits / temperature)``."""
    idx = torch.argsort(logits, dim=-1, descending=True, stable=True)[:, :top_k]
    if top_k == 1:
        return idx, torch.ones(idx.shape, dtype=torch.float32, device=logits.device)
    return idx, torch.softmax(logits.gather(-1, idx).float() / temperature, dim=-1)


def mixture_entry(shape: Sequence[int], experts: Sequence[str], *, top_k: int, scales: Sequence[float] | None = None,
                  temperature: float = 1.0, granularity: str = "token", transposed: bool = False) -> dict[str, Any]:
    """A module entry of kind ``mixture``."""
    p: dict[str, Any] = {"experts": list(experts), "scales": [float(s) for s in scales or [1.0] * len(experts)],
                         "top_k": int(top_k), "temperature": float(temperature), "granularity": granularity}
    if transposed:
        p["transposed"] = True
    return {"kind": "mixture", "shape": list(shape), "params": p}


def mixture_adapter(experts: Mapping[str, af.Adapter], routers: Mapping[str, torch.Tensor], *, top_k: int,
                    temperature: float = 1.0, granularity: str = "token") -> af.Adapter:
    """A mixture of plain ``lowrank`` adapters (by expert name) with a router ``[N, in]`` per module; every
    expert must target every routed module. Experts of lower rank are zero-padded to the largest rank."""
    names = list(experts)
    modules: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for path, router in sorted(routers.items()):
        entries = []
        for name in names:
            e = experts[name].modules.get(path)
            roles = experts[name].roles(path) if e is not None else []
            if e is None or e["kind"] != "lowrank" or sorted(roles) != ["lora_A", "lora_B"] or \
                    e.get("params", {}).get("base_part") is not None:
                raise af.UnsupportedError(f"expert {name!r} has no plain lowrank entry (lora_A, lora_B only) for "
                                          f"module {path!r}", path=experts[name].source)
            entries.append((e, experts[name].module_tensors(path)))
        first = entries[0][0]
        if any(e["shape"] != first["shape"] or bool(e.get("params", {}).get("transposed")) !=
               bool(first.get("params", {}).get("transposed")) for e, _ in entries):
            raise af.UnsupportedError(f"the experts' entries for module {path!r} differ in shape or layout")
        out_f, in_f = af.function_shape(first)
        r = max(t["lora_A"].shape[0] for _, t in entries)
        dtype = entries[0][1]["lora_A"].dtype
        a, b = torch.zeros(len(names), r, in_f, dtype=dtype), torch.zeros(len(names), out_f, r, dtype=dtype)
        for i, (_, t) in enumerate(entries):
            ri = t["lora_A"].shape[0]
            a[i, :ri], b[i, :, :ri] = t["lora_A"].reshape(ri, in_f), t["lora_B"].reshape(out_f, ri)
        modules[path] = mixture_entry(first["shape"], names, top_k=top_k, temperature=temperature,
                                      granularity=granularity, transposed=bool(first.get("params", {}).get("transposed")),
                                      scales=[float(e.get("params", {}).get("scale", 1.0)) for e, _ in entries])
        tensors.update({f"{path}.router": router.to(dtype), f"{path}.lora_A": a, f"{path}.lora_B": b})
    config = {"experts": names, "top_k": int(top_k), "temperature": float(temperature), "granularity": granularity}
    return af.Adapter(af.new_manifest("mixture", modules, config=config,
                                      base=dict(next(iter(experts.values())).base) if experts else None), tensors)


def expert_adapter(adapter: af.Adapter, name: str) -> af.Adapter:
    """Expert ``name`` of a mixture as a plain ``lowrank`` adapter (as stored: zero-padded to the mixture's rank)."""
    modules: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for path, entry in sorted(adapter.modules.items()):
        experts = entry.get("params", {}).get("experts", [])
        if entry["kind"] != "mixture" or name not in experts:
            raise af.UnsupportedError(f"module {path!r} is not a mixture with an expert named {name!r} "
                                      f"(experts: {', '.join(experts) or 'none'})", path=adapter.source)
        i, p = experts.index(name), entry["params"]
        t = adapter.module_tensors(path)
        modules[path] = af.lowrank_entry(entry["shape"], float(p.get("scales", [1.0] * len(experts))[i]),
                                         transposed=bool(p.get("transposed")))
        tensors.update({f"{path}.lora_A": t["lora_A"][i].clone(), f"{path}.lora_B": t["lora_B"][i].clone()})
    return af.Adapter(af.new_manifest("lora", modules, base=dict(adapter.base)), tensors)


class MixtureMethod(af.Method):
    name = "mixture"
    summary = "Mixture of LoRA experts with a top-k router per module (MeteoRA; kind mixture)"
    kinds = ("mixture",)
    config_schema = {
        "type": "object",
        "properties": {
            "experts": {"type": "array", "items": {"type": "string", "pattern": NAME.pattern}, "minItems": 1},
            "top_k": {"type": "integer", "minimum": 1},
            "temperature": {"type": "number", "exclusiveMinimum": 0},
            "granularity": {"enum": list(GRANULARITIES)},
        },
    }

    def merge(self, adapters: Sequence[af.Adapter], *, weights: Sequence[float] | None = None,
              strategy: str = "linear", **options: Any) -> af.Adapter:
        raise af.UnsupportedError("mixture adapters route by input and cannot be combined in delta space; merge "
                                  "their experts (expert_adapter) instead")

    def conformance_example(self) -> Any:
        """Three random rank-4 experts, top-2, on two projections of the conformance kit's tiny model."""
        from adapterfmt.authoring.conformance import Example
        from adapterfmt.tiny import TinyConfig, build_tiny

        model = build_tiny(0, TinyConfig(vocab_size=32, hidden=16, layers=1, heads=2, intermediate=32))
        gen = torch.Generator().manual_seed(3)
        experts = {}
        for name in ("e0", "e1", "e2"):
            modules, tensors = {}, {}
            for path in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
                w = model.get_submodule(path).weight
                modules[path] = af.lowrank_entry(list(w.shape), 2.0)
                tensors[f"{path}.lora_A"] = 0.1 * torch.randn(4, w.shape[1], generator=gen)
                tensors[f"{path}.lora_B"] = 0.1 * torch.randn(w.shape[0], 4, generator=gen)
            experts[name] = af.Adapter(af.new_manifest("lora", modules), tensors)
        routers = {p: torch.randn(3, model.get_submodule(p).weight.shape[1], generator=gen) for p in modules}
        inputs = torch.randint(0, 32, (3, 5), generator=torch.Generator().manual_seed(1))
        return Example(model, mixture_adapter(experts, routers, top_k=2), inputs)


@af.hookimpl
def adapterfmt_delta_kinds() -> list[af.DeltaKind]:
    return [Mixture()]


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [MixtureMethod()]
