"""LoRA's relatives: AdaLoRA, VeRA, LoHa and LoKr, with the delta kinds LoHa, LoKr and VeRA need.

Kinds provided here (``adapterfmt_delta_kinds``); shapes are in function layout ``[out, in, ...]``,
``n_in`` is the product of the input dims, ``scale`` is ``params.scale`` (default 1):

- ``hadamard`` (LoHa): roles ``hada_w1_a [out, r]``, ``hada_w1_b [r, n_in]``, ``hada_w2_a [out, r]``,
  ``hada_w2_b [r, n_in]``; dW = scale * (w1_a @ w1_b) * (w2_a @ w2_b) (elementwise product), reshaped
  to the weight's function shape.
- ``kronecker`` (LoKr): ``lokr_w1`` or the pair ``lokr_w1_a`` @ ``lokr_w1_b``, and ``lokr_w2`` or
  ``lokr_w2_a`` @ ``lokr_w2_b``; dW = scale * kron(w1, w2) reshaped to the function shape (when w2 has
  4 dims, w1 gets two trailing unit dims first).
- ``vera`` (VeRA): roles ``lambda_b [out]`` and ``lambda_d [r]`` per module; the projections
  ``vera_A [r, in_max]`` and ``vera_B [out_max, r]`` are **shared**: stored once for the whole adapter and
  named by each entry's ``params.shared`` (``{"vera_A": <tensor name>, "vera_B": <tensor name>}``; this
  plugin names them ``vera_A`` and ``vera_B``). A module with ``in`` inputs and ``out`` outputs uses the
  slices ``vera_A[:, :in]`` and ``vera_B[:out, :]``, so one pair serves layers of every shape:
  dW = diag(lambda_b) @ vera_B[:out] @ diag(lambda_d) @ vera_A[:, :in].

All three are additive (merge adds dW, unmerge subtracts it). DoRA (in the ``lora``
plugin) and AdaLoRA are stored as ``lowrank``: DoRA with its ``magnitude`` role, AdaLoRA's SVD form P diag(E) Q as ``lora_A = E * Q``, ``lora_B = P``
(its pruned, zero singular values dropped) with ``scale = alpha / (ranknum + 1e-5)`` as PEFT computes it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

import adapterfmt as af


def _fail(module: str, msg: str) -> af.FormatError:
    return af.FormatError(f"module {module!r}: {msg}")


class Hadamard(af.WeightDeltaKind):
    name = "hadamard"
    required_roles = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def check(self, module: str, entry: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
        fshape = af.function_shape(entry)
        out, n_in = fshape[0], math.prod(fshape[1:])
        for w in ("hada_w1", "hada_w2"):
            a, b = shapes[f"{w}_a"], shapes[f"{w}_b"]
            if len(a) != 2 or len(b) != 2 or a[0] != out or b != (a[1], n_in):
                raise _fail(module, f"{w}_a {list(a)} and {w}_b {list(b)} must be [{out}, r] and [r, {n_in}]")

    def rank(self, entry: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> int:
        return shapes["hada_w1_a"][1]

    def function_delta(self, entry: dict[str, Any], t: dict[str, torch.Tensor]) -> torch.Tensor:
        w = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        return (self.scale(entry) * w).reshape(af.function_shape(entry))


class Kronecker(af.WeightDeltaKind):
    name = "kronecker"
    optional_roles = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")

    def check(self, module: str, entry: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
        for w in ("lokr_w1", "lokr_w2"):
            full, pair = w in shapes, f"{w}_a" in shapes and f"{w}_b" in shapes
            if full == pair or (not pair and (f"{w}_a" in shapes or f"{w}_b" in shapes)):
                raise _fail(module, f"kronecker needs exactly one of {w} or the pair {w}_a, {w}_b")
            if pair and (len(shapes[f"{w}_a"]) != 2 or shapes[f"{w}_a"][1] != shapes[f"{w}_b"][0]):
                raise _fail(module, f"{w}_a {list(shapes[f'{w}_a'])} and {w}_b {list(shapes[f'{w}_b'])} do not chain")
        w1 = shapes.get("lokr_w1") or (shapes["lokr_w1_a"][0], shapes["lokr_w1_b"][1])
        w2 = shapes.get("lokr_w2") or (shapes["lokr_w2_a"][0], *shapes["lokr_w2_b"][1:])
        if math.prod(w1) * math.prod(w2) != math.prod(entry["shape"]) or w1[0] * w2[0] != af.function_shape(entry)[0]:
            raise _fail(module, f"kron of {list(w1)} and {list(w2)} does not give shape {list(entry['shape'])}")

    def rank(self, entry: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> int | None:
        return shapes["lokr_w2_a"][1] if "lokr_w2_a" in shapes else None

    def function_delta(self, entry: dict[str, Any], t: dict[str, torch.Tensor]) -> torch.Tensor:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return (self.scale(entry) * torch.kron(w1, w2)).reshape(af.function_shape(entry))


class Vera(af.WeightDeltaKind):
    name = "vera"
    required_roles = ("lambda_b", "lambda_d")

    def check(self, module: str, entry: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
        fshape = af.function_shape(entry)
        if len(fshape) != 2:
            raise _fail(module, f"vera adapts 2-D weights, shape is {list(entry['shape'])}")
        shared = entry.get("params", {}).get("shared", {})
        if set(shared) != {"vera_A", "vera_B"}:
            raise _fail(module, "vera needs params.shared naming the vera_A and vera_B tensors")
        (out, n_in), r = fshape, shapes["lambda_d"][0]
        a, b = shapes["vera_A"], shapes["vera_B"]
        if shapes["lambda_b"] != (out,) or len(shapes["lambda_d"]) != 1:
            raise _fail(module, f"lambda_b {list(shapes['lambda_b'])} must be [{out}], lambda_d 1-D")
        if len(a) != 2 or a[0] != r or a[1] < n_in or len(b) != 2 or b[1] != r or b[0] < out:
            raise _fail(module, f"shared vera_A {list(a)} / vera_B {list(b)} must be [{r}, >={n_in}] / [>={out}, {r}]")

    def rank(self, entry: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> int:
        return shapes["lambda_d"][0]

    def param_count(self, entry: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> int:
        return shapes["lambda_b"][0] + shapes["lambda_d"][0]

    @staticmethod
    def _factors(entry: dict[str, Any], t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        out, n_in = af.function_shape(entry)
        return t["vera_A"][:, :n_in], t["vera_B"][:out, :]

    def function_delta(self, entry: dict[str, Any], t: dict[str, torch.Tensor]) -> torch.Tensor:
        a, b = self._factors(entry, t)
        return (t["lambda_b"][:, None] * b) @ (t["lambda_d"][:, None] * a)

    def forward(self, module: nn.Module, entry: dict[str, Any], t: dict[str, torch.Tensor], x: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():  # token ids into an embedding: the generic weight path
            return super().forward(module, entry, t, x, y)
        a, b = self._factors(entry, t)
        mid = (x @ a.t().to(x.dtype)) * t["lambda_d"].to(x.dtype)
        return y + ((mid @ b.t().to(x.dtype)) * t["lambda_b"].to(x.dtype)).to(y.dtype)


# ----- methods ----------------------------------------------------------------------------------------
class AdaLoRA(af.Method):
    name = "adalora"
    summary = "AdaLoRA (read and apply): adaptive-rank SVD-form LoRA, stored as lowrank"
    kinds = ("lowrank",)


def adalora_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, lora_e: torch.Tensor, *, alpha: float,
                    ranknum: float) -> tuple[dict[str, torch.Tensor], float]:
    """AdaLoRA's ``P diag(E) Q`` (PEFT's lora_B, lora_E, lora_A) as ``lowrank`` tensors and scale; the
    rows of pruned (zero) singular values are dropped, so the stored rank is the rank AdaLoRA kept."""
    e = lora_e.reshape(-1)
    keep = (e != 0).nonzero().flatten()
    if keep.numel() == 0:
        keep = torch.zeros(1, dtype=torch.int64)
    a = (lora_a * e[:, None])[keep].contiguous()
    return {"lora_A": a, "lora_B": lora_b[:, keep].contiguous()}, float(alpha) / (float(ranknum) + 1e-5)


def _rank_config(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": {"r": {"type": "integer", "minimum": 1}, "alpha": {"type": "number"},
                                             **(extra or {}), **af.TARGETS_SCHEMA}}


class LoHa(af.Method):
    name = "loha"
    summary = "LoHa: Hadamard product of two low-rank products, dW = (w1_a w1_b) * (w2_a w2_b)"
    kinds = ("hadamard",)
    config_schema = _rank_config()

    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> af.TrainSession:
        cfg = {"r": 8, "alpha": 8, **config}
        self.check_config(cfg)
        return af.inject(model, method=self.name, config=cfg, build=lambda p, m: self.layer(m, cfg),
                         supported=(nn.Linear, "Conv1D", nn.Conv2d))

    @staticmethod
    def layer(module: nn.Module, cfg: dict[str, Any]) -> af.TrainableDelta:
        entry = af.module_entry("hadamard", module, {"scale": cfg["alpha"] / cfg["r"]})
        fshape, r, dtype = af.function_shape(entry), cfg["r"], af.adapter_dtype(module)
        out, n_in = fshape[0], math.prod(fshape[1:])
        params = {"hada_w1_a": torch.empty(out, r, dtype=dtype), "hada_w1_b": torch.empty(r, n_in, dtype=dtype),
                  "hada_w2_a": torch.empty(out, r, dtype=dtype), "hada_w2_b": torch.zeros(r, n_in, dtype=dtype)}
        for role in ("hada_w1_a", "hada_w1_b", "hada_w2_a"):
            nn.init.kaiming_uniform_(params[role], a=math.sqrt(5))
        return af.TrainableDelta(entry, params)


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """``dim = m * n`` with ``m <= n`` as balanced as allowed (``m <= factor`` when ``factor > 0``)."""
    if factor > 0 and dim % factor == 0:
        return tuple(sorted((factor, dim // factor)))  # type: ignore[return-value]
    best = 1
    for m in range(1, math.isqrt(dim) + 1):
        if dim % m == 0 and (factor <= 0 or m <= factor):
            best = m
    return best, dim // best


class LoKr(af.Method):
    name = "lokr"
    summary = "LoKr: Kronecker product of a small factor and a (low-rank) factor, dW = kron(w1, w2)"
    kinds = ("kronecker",)
    config_schema = _rank_config({"decompose_factor": {"type": "integer"}})

    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> af.TrainSession:
        cfg = {"r": 8, "alpha": 8, "decompose_factor": -1, **config}
        self.check_config(cfg)
        return af.inject(model, method=self.name, config=cfg, build=lambda p, m: self.layer(m, cfg))

    @staticmethod
    def layer(module: nn.Module, cfg: dict[str, Any]) -> af.TrainableDelta:
        entry = af.module_entry("kronecker", module, {"scale": cfg["alpha"] / cfg["r"]})
        out, n_in = af.function_shape(entry)
        (out_l, out_k), (in_m, in_n) = (factorization(out, cfg["decompose_factor"]),
                                        factorization(n_in, cfg["decompose_factor"]))
        r, dtype = cfg["r"], af.adapter_dtype(module)
        params = {"lokr_w1": torch.zeros(out_l, in_m, dtype=dtype)}
        if r < max(out_k, in_n) / 2:
            params["lokr_w2_a"], params["lokr_w2_b"] = torch.empty(out_k, r, dtype=dtype), torch.empty(r, in_n, dtype=dtype)
        else:
            params["lokr_w2"] = torch.empty(out_k, in_n, dtype=dtype)
        for role in ("lokr_w2", "lokr_w2_a", "lokr_w2_b"):
            if role in params:
                nn.init.kaiming_uniform_(params[role], a=math.sqrt(5))
        return af.TrainableDelta(entry, params)


def vera_projection(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """A frozen random projection, Kaiming-uniform over its fan-in (as VeRA initialises them)."""
    bound = math.sqrt(3) * math.sqrt(2) / math.sqrt(shape[1])
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


class VeRA(af.Method):
    name = "vera"
    summary = "VeRA: frozen random projections shared by all layers, trained per-layer scaling vectors"
    kinds = ("vera",)
    config_schema = _rank_config({"d_initial": {"type": "number"}, "projection_seed": {"type": "integer"}})

    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> af.TrainSession:
        """Targets share one pair of projections sized for the largest targeted layer (seeded, frozen)."""
        cfg = {"r": 256, "d_initial": 0.1, "projection_seed": 0, **config}
        self.check_config(cfg)
        chosen = af.select_targets(model, cfg)
        shapes = [af.function_shape(af.module_entry("vera", m)) for m in chosen.values()]
        gen = torch.Generator().manual_seed(cfg["projection_seed"])
        r = cfg["r"]
        vera_b = vera_projection((max(s[0] for s in shapes), r), gen)
        vera_a = vera_projection((r, max(s[1] for s in shapes)), gen)
        shared = {"vera_A": ("vera_A", vera_a), "vera_B": ("vera_B", vera_b)}

        def build(path: str, module: nn.Module) -> af.TrainableDelta:
            entry = af.module_entry("vera", module)
            dtype = af.adapter_dtype(module)
            params = {"lambda_b": torch.zeros(af.function_shape(entry)[0], dtype=dtype),
                      "lambda_d": torch.full((r,), float(cfg["d_initial"]), dtype=dtype)}
            return af.TrainableDelta(entry, params, shared={k: (n, v.to(dtype)) for k, (n, v) in shared.items()})

        return af.inject(model, method=self.name, config=cfg, build=build)


@af.hookimpl
def adapterfmt_delta_kinds() -> list[af.DeltaKind]:
    return [Hadamard(), Kronecker(), Vera()]


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [AdaLoRA(), LoHa(), LoKr(), VeRA()]


__all__ = ["Hadamard", "Kronecker", "Vera", "AdaLoRA", "LoHa", "LoKr", "VeRA", "adalora_factors", "factorization"]
