"""Small adapters with known deltas for merge and bake tests, and a plain reference of each delta."""

from __future__ import annotations

import math
from typing import Any

import torch

import adapterfmt as af

LINEAR = ("m.a", [24, 16], False)  # Linear: weight [out 24, in 16]
CONV1D = ("m.t", [16, 24], True)  # GPT-2 Conv1D: weight stored [in 16, out 24]
CONV2D = ("m.c", [8, 4, 3, 3], False)


def lowrank(shape: list[int], r: int, scale: float, gen: torch.Generator, *, transposed: bool = False,
            bias: bool = False, dtype: torch.dtype = torch.float32) -> tuple[dict, dict]:
    fshape = shape[::-1] if transposed else shape
    a = torch.randn(r, *fshape[1:], generator=gen)
    b = torch.randn(fshape[0], r, *([1] * (len(fshape) - 2)), generator=gen)
    t = {"lora_A": a.to(dtype), "lora_B": b.to(dtype)}
    if bias:
        t["bias"] = torch.randn(fshape[0], generator=gen).to(dtype)
    return af.lowrank_entry(shape, scale, transposed=transposed), t


def dense(shape: list[int], gen: torch.Generator) -> tuple[dict, dict]:
    return {"kind": "dense", "shape": shape, "params": {"mode": "add", "scale": 0.5}}, \
        {"delta": torch.randn(shape, generator=gen)}


def sparse(shape: list[int], gen: torch.Generator, density: float = 0.3) -> tuple[dict, dict]:
    n = math.prod(shape)
    idx = torch.randperm(n, generator=gen)[: int(density * n)].sort().values
    return {"kind": "sparse", "shape": shape, "params": {"scale": 2.0}}, \
        {"indices": idx, "values": torch.randn(idx.numel(), generator=gen)}


def make(modules: dict[str, tuple[dict, dict]], *, base: dict[str, Any] | None = None, method: str = "lora") -> af.Adapter:
    tensors = {f"{m}.{role}": v for m, (_, t) in modules.items() for role, v in t.items()}
    manifest = af.new_manifest(method, {m: e for m, (e, _) in modules.items()}, base=base)
    return af.Adapter(manifest, tensors)


def ref_delta(entry: dict, t: dict) -> torch.Tensor:
    """dW in the stored layout, fp64, computed from the raw tensors (independent of the delta kinds)."""
    scale = float(entry.get("params", {}).get("scale", 1.0))
    shape = entry["shape"]
    if entry["kind"] == "dense":
        return scale * t["delta"].double()
    if entry["kind"] == "sparse":
        flat = torch.zeros(math.prod(shape), dtype=torch.float64)
        flat[t["indices"]] = t["values"].double()
        return scale * flat.reshape(shape)
    a, b = t["lora_A"].double(), t["lora_B"].double()
    r = a.shape[0]
    f = scale * (b.reshape(b.shape[0], r) @ a.reshape(r, -1))
    if entry.get("params", {}).get("transposed"):
        return f.T.contiguous()
    return f.reshape(shape)


def ref_bias(entry: dict, t: dict) -> torch.Tensor | None:
    role = {"lowrank": "bias", "dense": "bias_delta"}.get(entry["kind"])
    if role not in t:
        return None
    return float(entry.get("params", {}).get("scale", 1.0)) * t[role].double()


def adapter_delta(adapter: af.Adapter, module: str) -> torch.Tensor:
    """dW of one module of an adapter through its delta kind (fp64)."""
    entry = adapter.modules[module]
    return af.registry.get_kind(entry["kind"]).delta(entry, adapter.module_tensors(module)).double()
