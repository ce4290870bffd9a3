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
delta space (both refused); with fixed gates it is one LoRA (:func:`collapse`; ``adapter merge MIX --gates``).
Compress resizes / quantises each expert and keeps the router exact (the kind's ``stacked_lowrank`` and
``exact_roles``); port keeps every tensor (a mixture depends on no base weight).

Training (:class:`MixtureMethod`, ``adapter train --method mixture``): MeteoRA's recipe, routers on frozen
experts or experts and routers jointly, through :func:`gemm_forward` (differentiable in the gate weights and
factors) and :func:`gate_loss`.
"""

from __future__ import annotations

import functools
import math
import re
import tempfile
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

import adapterfmt as af

GRANULARITIES = ("token", "sequence")
LOGITS = ("dot", "abs")
"""Router logits: ``router @ x`` (MeteoRA), or its absolute value (Arrow: sign-free similarity to prototypes)."""
NAME = re.compile(r"^[A-Za-z0-9_]+$")


def _fail(module: str, msg: str) -> af.FormatError:
    return af.FormatError(f"module {module!r}: {msg}")


def _linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and module.weight.dim() == 2)


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


COLLAPSE = "adapter merge MIX --gates name=w,... --out LORA"
"""How to turn a mixture into one LoRA (:func:`collapse`), as refusals say it."""


class Mixture(af.DeltaKind):
    name = "mixture"
    required_roles = ("router", "lora_A", "lora_B")
    layout_sensitive = True
    exact_roles = ("router",)
    stacked_lowrank = True
    merge_hint = f"a routed mixture is not merged or baked; collapse it first with fixed gates: {COLLAPSE}"

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
        if p.get("logits", "dot") not in LOGITS:
            raise _fail(module, f"mixture params.logits must be 'dot' or 'abs', got {p.get('logits')!r}")
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
        k, sequence = int(p["top_k"]), p.get("granularity", "token") == "sequence"
        if sequence and x.dim() < 3:
            raise af.UnsupportedError(f"a sequence-granularity mixture needs inputs [batch, positions, features], "
                                      f"got {list(x.shape)}")
        if k > 1 and not x.is_cuda:  # the CPU: every expert in two GEMMs, gates zero off the top-k
            return gemm_forward(p, t, x, y)[1]
        n = len(p["experts"])
        units = x.reshape(-1, x.shape[-2], x.shape[-1]).mean(-2) if sequence else x.reshape(-1, x.shape[-1])
        scales = torch.tensor([float(s) for s in p.get("scales", [1.0] * n)], dtype=torch.float32, device=x.device)
        a, b = t["lora_A"].to(x.dtype), t["lora_B"].to(x.dtype)
        idx, w = route(units, t["router"], k, float(p.get("temperature", 1.0)), absolute=p.get("logits") == "abs")
        rows = x.reshape(-1, x.shape[-2], x.shape[-1]) if sequence else x.reshape(-1, x.shape[-1])
        out = y.reshape(*rows.shape[:-1], y.shape[-1])
        for j in range(k):  # one batched call per chosen slot; the gate weight scales that slot's input rows
            xj = rows if k == 1 else rows * w[:, j].to(x.dtype).reshape(-1, *([1] * (rows.dim() - 1)))
            out = af.multi_lora_rows(xj, out, a, b, scales, idx[:, j])
        return out.reshape(y.shape)

    def merge(self, module: nn.Module, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor]) -> Any:
        raise af.UnsupportedError("a mixture routes each token by its input, so it cannot be merged into the "
                                  f"weights; keep it unmerged, or collapse it with fixed gates first ({COLLAPSE})")


def collapse(adapter: af.Adapter, gates: Mapping[str, float], *, strategy: str = "cat",
             **options: Any) -> af.Adapter:
    """The mixture with its gate weights fixed to ``gates`` (``{expert: g}``, the same for every token and
    module; experts left out weigh 0) as one ``lowrank`` adapter, ``sum_e g_e s_e B_e A_e``: the experts
    (:func:`expert_adapter`) merged by ``af.merge_adapters`` with weights ``g_e``. ``cat`` (default) is exact, of
    rank (experts used) x r; ``svd`` / ``rank`` / ``energy`` and the other ``options`` act as in that merge."""
    names = list(dict.fromkeys(e for entry in adapter.modules.values()
                               for e in entry.get("params", {}).get("experts", [])))
    unknown = sorted(set(gates) - set(names))
    if unknown:
        raise af.FormatError(f"gates name no expert {unknown[0]!r} of this mixture (experts: {', '.join(names)})",
                             path=adapter.source)
    if not all(_number(g) for g in gates.values()):
        raise af.FormatError(f"gates must be finite numbers, got {dict(gates)}", path=adapter.source)
    used = {name: float(gates[name]) for name in names if gates.get(name, 0) != 0}
    if not used:
        raise af.FormatError("every gate is 0: the collapsed mixture would change nothing", path=adapter.source)
    merged = af.merge_adapters([expert_adapter(adapter, name) for name in used], weights=list(used.values()),
                               strategy=strategy, **options)
    record = {**merged.manifest["provenance"][-1], "gates": used,
              "mixture": str(adapter.source) if adapter.source else None}
    merged.manifest["provenance"] = [*adapter.manifest.get("provenance", ()), record]
    return merged


def gemm_forward(p: Mapping[str, Any], t: Mapping[str, torch.Tensor], x: torch.Tensor,
                 y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(router logits [..., N] (sequence granularity: [batch, N]), y + the mixture's update)`` with every
    expert in two GEMMs (``x @ A_all^T``, gated to zero off the top-k, then ``@ B_all^T``); differentiable in
    the router and the factors (the training path). ``t`` may hold :meth:`Mixture.bind`'s stacked tensors."""
    n, k, temperature = len(p["experts"]), int(p["top_k"]), float(p.get("temperature", 1.0))
    sequence = p.get("granularity", "token") == "sequence"
    scales = torch.tensor([float(s) for s in p.get("scales", [1.0] * n)], dtype=torch.float32, device=x.device)
    a = t["lora_A"]
    r = a.shape[1]
    stack = (t["_stack"] if "_stack" in t else torch.cat([t["router"], a.reshape(n * r, -1)])).to(x.dtype)
    b_cat = (t["_b_cat"] if "_b_cat" in t else t["lora_B"].permute(1, 0, 2).reshape(-1, n * r)).to(x.dtype).t()
    x2 = x.reshape(-1, x.shape[-1])
    if sequence or torch.promote_types(x.dtype, torch.float32) != x.dtype:
        units = x.reshape(-1, x.shape[-2], x.shape[-1]).mean(-2) if sequence else x2
        dt = torch.promote_types(x.dtype, torch.float32)
        logits = units.to(dt) @ t["router"].to(device=x.device, dtype=dt).t()
        mid = x2 @ stack[n:].t()
    else:  # fp32 / fp64 tokens: the router's logits come out of the same GEMM
        both = x2 @ stack.t()
        logits, mid = both[:, :n], both[:, n:]
    if p.get("logits") == "abs":
        logits = logits.abs()
    idx, w = pick(logits, k, temperature)
    gates = torch.zeros(logits.shape[0], n, dtype=w.dtype, device=x.device).scatter(1, idx, w * scales[idx])
    if sequence:
        gates = gates.repeat_interleave(x.shape[-2], dim=0)
    mid = (mid.reshape(-1, n, r) * gates.to(x.dtype).unsqueeze(-1)).view(-1, n * r)
    y2 = y.reshape(-1, y.shape[-1])
    if torch.is_grad_enabled() and (y.requires_grad or mid.requires_grad):
        out = torch.addmm(y2, mid, b_cat)
    else:
        out = y2.addmm_(mid, b_cat)  # in place, as the lowrank kind's inference path
    return logits.reshape(*(x.shape[:-2] if sequence else x.shape[:-1]), n), out.reshape(y.shape)


def route(x: torch.Tensor, router: torch.Tensor, top_k: int, temperature: float, *,
          absolute: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(experts [T, top_k] int64, gate weights [T, top_k])`` for router inputs ``x [T, in]``: :func:`pick`
    on the logits ``x @ router^T`` (``absolute``: their absolute values), computed in at least fp32."""
    dt = torch.promote_types(x.dtype, torch.float32)
    logits = x.to(dt) @ router.to(device=x.device, dtype=dt).t()
    return pick(logits.abs() if absolute else logits, top_k, temperature)


def pick(logits: torch.Tensor, top_k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top_k`` largest logits per row (ties to the lower index) and their gate weights: 1 for top-1,
    else ``softmax(chosen logits / temperature)``, in at least fp32 (fp64 logits: fp64)."""
    idx = torch.argsort(logits, dim=-1, descending=True, stable=True)[:, :top_k]
    dt = torch.promote_types(logits.dtype, torch.float32)
    if top_k == 1:
        return idx, torch.ones(idx.shape, dtype=dt, device=logits.device)
    return idx, torch.softmax(logits.gather(-1, idx).to(dt) / temperature, dim=-1)


def mixture_entry(shape: Sequence[int], experts: Sequence[str], *, top_k: int, scales: Sequence[float] | None = None,
                  temperature: float = 1.0, granularity: str = "token", transposed: bool = False,
                  logits: str = "dot") -> dict[str, Any]:
    """A module entry of kind ``mixture``."""
    p: dict[str, Any] = {"experts": list(experts), "scales": [float(s) for s in scales or [1.0] * len(experts)],
                         "top_k": int(top_k), "temperature": float(temperature), "granularity": granularity}
    if transposed:
        p["transposed"] = True
    if logits != "dot":
        p["logits"] = logits
    return {"kind": "mixture", "shape": list(shape), "params": p}


def mixture_adapter(experts: Mapping[str, af.Adapter], routers: Mapping[str, torch.Tensor], *, top_k: int,
                    temperature: float = 1.0, granularity: str = "token", logits: str = "dot") -> af.Adapter:
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
                                      logits=logits,
                                      scales=[float(e.get("params", {}).get("scale", 1.0)) for e, _ in entries])
        tensors.update({f"{path}.router": router.to(dtype), f"{path}.lora_A": a, f"{path}.lora_B": b})
    config = {"experts": names, "top_k": int(top_k), "temperature": float(temperature), "granularity": granularity}
    if logits != "dot":
        config["logits"] = logits
    return af.Adapter(af.new_manifest("mixture", modules, config=config,
                                      base=dict(next(iter(experts.values())).base) if experts else None), tensors)


def arrow_prototype(a: torch.Tensor, b: torch.Tensor, seed: int | None, iters: int = 15) -> torch.Tensor:
    """The top right singular vector of ``B A`` (``A [r, in]``, ``B [out, r]``) as PEFT's Arrow computes it: ``iters``
    power iterations on ``A^T (B^T B) A`` in fp32 from a unit Gaussian start drawn from a generator seeded with
    ``seed``. Without a seed PEFT draws from the global generator (not reproducible); then the iteration's
    limit, the exact singular vector from an SVD, is returned. The sign is arbitrary (Arrow uses ``|x . p|``)."""
    a32, b32 = a.to(torch.float32), b.to(torch.float32)
    if seed is None:
        return torch.linalg.svd(b32 @ a32, full_matrices=False).Vh[0]
    c = b32.T @ b32
    v = torch.randn(a32.shape[1], dtype=torch.float32, generator=torch.Generator().manual_seed(int(seed)))
    v = v / (v.norm() + 1e-8)
    for _ in range(iters):
        w = a32.T @ (c @ (a32 @ v))
        v = w / (w.norm() + 1e-8)
    return v


def arrow_adapter(experts: Mapping[str, af.Adapter], *, top_k: int, temperature: float = 1.0,
                  general: Sequence[af.Adapter] = (), seed: int | None = None) -> af.Adapter:
    """Arrow routing over a library of LoRAs (Ostapenko et al. 2024, as PEFT 0.21's ``ArrowConfig``): per module,
    each expert's prototype is the top right singular vector of its ``B A`` (:func:`arrow_prototype`), the router
    logits are ``|x . prototype|`` (``params.logits = "abs"``), top-k with a softmax over the chosen logits /
    ``temperature``. ``general`` LoRAs turn on GenKnowSub: their mean ``A`` and mean ``B`` are subtracted from every
    expert's ``A`` and ``B`` (factor space, as PEFT) before the prototypes are taken. Every expert and general
    LoRA must be plain ``lowrank`` of one rank on the same modules."""
    experts = dict(experts)
    if general:
        experts = {name: _subtract_mean_factors(adapter, general) for name, adapter in experts.items()}
    first = next(iter(experts.values()))
    routers = {}
    for path in sorted(first.modules):
        protos = []
        for name, adapter in experts.items():
            if path not in adapter.modules:
                raise af.UnsupportedError(f"Arrow expert {name!r} does not target module {path!r}; every expert must "
                                          "target the same modules", path=adapter.source)
            t = adapter.module_tensors(path)
            r, fshape = t["lora_A"].shape[0], af.function_shape(adapter.modules[path])
            protos.append(arrow_prototype(t["lora_A"].reshape(r, fshape[1]), t["lora_B"].reshape(fshape[0], r), seed))
        routers[path] = torch.stack(protos)
    return mixture_adapter(experts, routers, top_k=top_k, temperature=temperature, logits="abs")


def _subtract_mean_factors(adapter: af.Adapter, general: Sequence[af.Adapter]) -> af.Adapter:
    """``adapter`` with the mean ``lora_A`` and mean ``lora_B`` of the ``general`` LoRAs subtracted, per module."""
    tensors = adapter.tensors()
    for path in adapter.modules:
        for role in ("lora_A", "lora_B"):
            parts = []
            for g in general:
                if path not in g.modules or g.modules[path]["kind"] != "lowrank":
                    raise af.UnsupportedError(f"general LoRA has no lowrank entry for module {path!r}", path=g.source)
                parts.append(g.module_tensors(path)[role])
            own = tensors[f"{path}.{role}"]
            if any(p.shape != own.shape for p in parts):
                raise af.UnsupportedError(f"module {path!r}: general LoRAs' {role} shapes differ from the expert's "
                                          f"{list(own.shape)} (GenKnowSub needs one rank)", path=general[0].source)
            tensors[f"{path}.{role}"] = own - torch.stack(parts).mean(0)
    return af.Adapter(adapter.manifest, tensors, source=adapter.source)


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


class MixtureTrainable(af.TrainableDelta):
    """One module's mixture in training: always :func:`gemm_forward` (differentiable), and it keeps the router
    logits of its last forward pass in training mode for the gate loss (:func:`gate_loss`)."""

    logits: torch.Tensor | None = None

    def forward(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits, out = gemm_forward(self.entry["params"], self.tensors(), x, y)
        self.logits = logits if self.training and torch.is_grad_enabled() else None
        return out


def gate_loss(logits: Sequence[torch.Tensor], task_ids: torch.Tensor) -> torch.Tensor:
    """MeteoRA's gate loss (``lora_gate_loss_func``): the cross-entropy of every routed module's logits
    ``[B, T, N]`` at position ``t`` against the task of token ``t + 1`` (``task_ids [B, T]``, -100: none),
    pooled over modules and positions (one mean)."""
    if not logits:
        raise af.UnsupportedError("gate loss: no router logits recorded; compute it after a forward pass in "
                                  "training mode with gradients on")
    n = logits[0].shape[-1]
    if any(l.dim() != 3 or l.shape[:2] != task_ids.shape for l in logits):
        raise af.UnsupportedError(f"gate loss: router logits {[list(l.shape) for l in logits][:1]} do not match "
                                  f"task ids {list(task_ids.shape)} (the gate loss needs granularity 'token' and "
                                  "inputs [batch, positions, features])")
    flat = torch.cat([l[:, :-1].reshape(-1, n).float() for l in logits])
    targets = task_ids[:, 1:].reshape(-1).to(flat.device).repeat(len(logits))
    if not bool((targets != -100).any()):
        return flat.sum() * 0.0
    return nn.functional.cross_entropy(flat, targets, ignore_index=-100)


TRAIN_DEFAULTS: dict[str, Any] = {"top_k": 2, "temperature": 1.0, "granularity": "token", "train": "router",
                                  "gate_loss_weight": 50.0}
"""MeteoRA's settings: top-2, T = 1 in training, gate loss weight 50 (``moe_aux_loss_coef``); router only."""


class MixtureMethod(af.Method):
    """Training (:meth:`train`), MeteoRA's recipe: the base frozen, N trained LoRA experts loaded (config
    ``expert_adapters``: ``{name: path}``, a relative path taken from the config file's folder under ``adapter
    train --config``, else from the working directory, and recorded absolute so a resumed run finds them from
    anywhere; or ``experts=`` adapters), a router per module initialised
    ``N(0, 1)`` as MeteoRA's gate. ``train: router`` (default) trains the routers alone on frozen experts (the
    paper's recipe); ``train: joint`` trains the experts' factors too (what the repository's
    ``meteora_train.py`` does: every ``moe_gate`` and ``lora_`` parameter). The loss is the language-model
    loss plus ``gate_loss_weight`` times :func:`gate_loss` when the data names each record's ``task`` (an
    expert name; ``adapter train`` hands them to :meth:`regularization` as ``task_ids``). Gradients reach the
    router as in MeteoRA: through the softmax over the chosen logits for top-k >= 2, and for top-1 (gate
    weight 1) only through the gate loss. Not done here: MeteoRA's lora dropout (0.1, on the experts' input)."""

    name = "mixture"
    summary = "Mixture of LoRA experts with a top-k router per module (MeteoRA; kind mixture)"
    kinds = ("mixture",)
    file_fields = ("expert_adapters",)
    config_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "experts": {"type": "array", "items": {"type": "string", "pattern": NAME.pattern}, "minItems": 1},
            "top_k": {"type": "integer", "minimum": 1},
            "temperature": {"type": "number", "exclusiveMinimum": 0},
            "granularity": {"enum": list(GRANULARITIES)},
            "logits": {"enum": list(LOGITS)},
            "expert_adapters": {"type": "object", "minProperties": 1, "propertyNames": {"pattern": NAME.pattern},
                                "additionalProperties": {"type": "string", "minLength": 1}},
            "train": {"enum": ["router", "joint"]},
            "gate_loss_weight": {"type": "number", "minimum": 0},
        },
    }

    def train(self, model: nn.Module, *, config: dict[str, Any], experts: Mapping[str, af.Adapter] | None = None,
              **options: Any) -> af.TrainSession:
        """A session training the routers (and, ``train: joint``, the experts) of a mixture of ``experts`` (or
        config ``expert_adapters``); see the class docstring. The session's ``tasks`` are the expert names."""
        cfg = {**TRAIN_DEFAULTS, **config}
        self.check_config(cfg)
        cfg = self.resolve_paths(cfg, Path.cwd())
        paths = cfg.get("expert_adapters")
        if (paths is None) == (experts is None):
            raise af.FormatError("mixture training needs its experts: config expert_adapters ({name: path}) or "
                                 "experts= (adapters by name), not both")
        experts = {name: af.load(path) for name, path in paths.items()} if paths is not None else dict(experts or {})
        names = list(experts)
        if cfg.setdefault("experts", names) != names:
            raise af.FormatError(f"mixture config experts {cfg['experts']} differ from the expert adapters' names "
                                 f"{names}")
        if not all(NAME.match(n) for n in names):
            raise af.FormatError(f"mixture expert names must match {NAME.pattern}, got {names}")
        if cfg["top_k"] > len(names):
            raise af.FormatError(f"mixture config top_k {cfg['top_k']} exceeds the {len(names)} experts")
        first = set(experts[names[0]].modules)
        for name in names[1:]:
            odd = sorted(first ^ set(experts[name].modules))
            if odd:
                raise af.UnsupportedError(f"experts {names[0]!r} and {name!r} target different modules (e.g. "
                                          f"{odd[0]!r}); every expert must target the same modules",
                                          path=experts[name].source)
        missing = sorted(p for p in first if not _has_module(model, p))
        if missing:
            raise af.BaseMismatchError(f"the experts target module {missing[0]!r}, which the model does not have",
                                       path=experts[names[0]].source)
        routers = {p: torch.randn(len(names), af.function_shape(experts[names[0]].modules[p])[1]) for p in sorted(first)}
        mix = mixture_adapter(experts, routers, top_k=cfg["top_k"], temperature=cfg["temperature"],
                              granularity=cfg["granularity"], logits=cfg.get("logits", "dot"))
        joint = cfg["train"] == "joint"

        def build(path: str, module: nn.Module) -> af.TrainableDelta:
            entry, t = mix.modules[path], mix.module_tensors(path)
            Mixture().check_module(path, entry, module)
            dtype = af.adapter_dtype(module)
            t = {role: v.to(dtype) for role, v in t.items()}
            factors = {"lora_A": t["lora_A"], "lora_B": t["lora_B"]}
            return MixtureTrainable(entry, {"router": t["router"], **(factors if joint else {})},
                                    frozen=None if joint else factors)

        session = af.inject(model, method=self.name, config=cfg, build=build, targets={"target_modules": sorted(first)})
        session.tasks = tuple(names)
        return session

    def regularization(self, session: Any, *, task_ids: torch.Tensor | None = None, **outputs: Any) -> torch.Tensor:
        """``gate_loss_weight *`` :func:`gate_loss` over the session's modules, given ``task_ids`` ``[B, T]``
        (indices into the experts, -100: no label); 0 without them."""
        weight = float(session.config.get("gate_loss_weight", TRAIN_DEFAULTS["gate_loss_weight"]))
        if task_ids is None or weight == 0:
            return torch.zeros(())
        logits = [layer.logits for layer in session.layers.values() if layer.logits is not None]
        return weight * gate_loss(logits, task_ids)

    def arrow(self, experts: Mapping[str, af.Adapter], *, top_k: int, temperature: float = 1.0,
              general: Sequence[af.Adapter] = (), seed: int | None = None) -> af.Adapter:
        """:func:`arrow_adapter`: Arrow routing over a library of LoRAs, as a mixture (for other plugins: the PEFT
        codec reads PEFT's Arrow models through it)."""
        return arrow_adapter(experts, top_k=top_k, temperature=temperature, general=general, seed=seed)

    def merge(self, adapters: Sequence[af.Adapter], *, weights: Sequence[float] | None = None,
              strategy: str = "linear", gates: Mapping[str, float] | None = None, **options: Any) -> af.Adapter:
        """Only with ``gates`` (``{expert: weight}``): one mixture collapsed to a LoRA (:func:`collapse`)."""
        if gates is None:
            raise af.UnsupportedError("mixture adapters route by input and cannot be combined in delta space; "
                                      f"collapse one with fixed gates ({COLLAPSE}) or take an expert (expert_adapter)")
        if len(adapters) != 1 or weights is not None:
            raise af.UnsupportedError(f"gates collapse one mixture, with no weights; got {len(adapters)} adapter(s)"
                                      + (f" and weights {list(weights)}" if weights is not None else ""))
        return collapse(adapters[0], gates, strategy=strategy, **options)

    def conformance_example(self) -> Any:
        """Three random rank-4 experts, top-2, on two projections of the conformance kit's tiny model; the
        training config names the same experts, saved to a folder that lives as long as the process."""
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
        folder = Path(_conformance_folder().name)
        paths = {name: str(af.save(a, folder / f"{name}.safetensors", overwrite=True)) for name, a in experts.items()}
        return Example(model, mixture_adapter(experts, routers, top_k=2), inputs,
                       train_config={"expert_adapters": paths})


@functools.cache
def _conformance_folder() -> tempfile.TemporaryDirectory[str]:
    """Where :meth:`MixtureMethod.conformance_example` saves its experts (removed when the process exits)."""
    return tempfile.TemporaryDirectory(prefix="adapterfmt-mixture-conformance-")


@af.hookimpl
def adapterfmt_delta_kinds() -> list[af.DeltaKind]:
    return [Mixture()]


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [MixtureMethod()]
