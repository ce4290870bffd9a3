"""Sparse fine-tuning: train a chosen few weights of each targeted module, stored as kind ``sparse``.

``train(model, config=..., loss_fn=..., batches=...)`` first chooses each module's mask, then injects a
trainable ``values`` vector (zeros: training starts at the base model) scattered into the weight at the
mask's flat row-major ``indices`` through the ``sparse`` kind's own forward, so what is trained is what
``attach`` applies. Apply, merge (scatter-add), compress and port are the ``sparse`` kind's generic verbs.

Selection (``config.selection``, recorded in the manifest's config with ``seed`` / ``calibration_batches``):

- ``gradient`` (the default when ``loss_fn`` and ``batches`` are given): score = |sum of the weight's
  gradients| over the calibration ``batches`` (``loss_fn(model, batch) -> scalar loss``, one backward per
  batch, the model's other gradients left as they were);
- ``random`` (the default otherwise): uniform noise from a generator seeded by ``seed`` and the module path.

Methods differ in what the score picks, in the weight's function layout ``[out, n_in]``:

- ``sparse_ft``: the ``k`` highest-scoring entries per module (or ``density`` of them, default 0.01);
- ``structured_ft``: ``structure`` ``rows`` (output channels, row score = sum of its entries' scores),
  ``columns`` (input channels) — ``k`` of them per module, or ``density`` —, or ``"N:M"`` (the N
  best of every M consecutive inputs of each row; ``n_in`` must divide by M).

Structured masks are stored as ``sparse`` too (every element of the chosen rows / columns): the simplest
form every verb already handles (CSR apply kernel, scatter merge, composition, port); the price is one int64
index per value, about 3x the bytes of a dense ``[k, n_in]`` block for fp32 values.

Composable masks: ``adapter merge`` (strategy ``linear``) of sparse adapters is their masks' union, entries
present in several inputs summed (weights applied), and stays ``sparse`` while that is smaller than dense.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

import adapterfmt as af

SUPPORTED = (nn.Linear, "Conv1D", nn.Embedding, nn.Conv2d)
SELECTIONS = ("gradient", "random")
DENSITY = 0.01
LossFn = Callable[[nn.Module, Any], torch.Tensor]


def _config_schema(extra: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {
        "k": {"type": "integer", "minimum": 1}, "density": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "selection": {"enum": list(SELECTIONS)}, "seed": {"type": "integer"}, **extra, **af.TARGETS_SCHEMA}}


def function_2d(t: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A stored-layout weight-shaped tensor viewed in function layout ``[out, n_in]``."""
    f = t.t() if af.module_entry("sparse", module)["params"].get("transposed") else t
    return f.reshape(f.shape[0], -1)


def stored_indices(mask: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Sorted flat row-major indices, in the weight's stored layout, of a function-layout ``[out, n_in]`` mask."""
    weight = module.weight
    transposed = bool(af.module_entry("sparse", module)["params"].get("transposed"))
    fshape = weight.shape[::-1] if transposed else weight.shape
    m = mask.reshape(fshape)
    return (m.t() if transposed else m).reshape(-1).nonzero().reshape(-1).to(torch.int64)


def gradient_scores(model: nn.Module, modules: dict[str, nn.Module], loss_fn: LossFn | None,
                    batches: Iterable[Any] | None) -> tuple[dict[str, torch.Tensor], int]:
    """|accumulated gradient| of each module's weight over ``batches``, and the number of batches used."""
    if loss_fn is None or batches is None:
        raise af.FormatError("selection 'gradient' needs calibration data: train(..., loss_fn=, batches=); "
                             "or choose selection 'random'")
    params = list(model.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    for p in params:
        p.requires_grad_(False)
    weights = {path: m.weight for path, m in modules.items()}
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    try:
        n = 0
        for batch in batches:
            loss_fn(model, batch).backward()
            n += 1
        if n == 0:
            raise af.FormatError("selection 'gradient' got no calibration batch")
        return {path: w.grad.detach().abs() for path, w in weights.items()}, n
    finally:
        for p, (flag, grad) in zip(params, saved, strict=True):
            p.requires_grad_(flag)
            p.grad = grad


def random_score(module: nn.Module, path: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(path.encode())) % 2**63)
    return torch.rand(module.weight.shape, generator=gen)


def count(cfg: dict[str, Any], units: int, what: str) -> int:
    """How many of ``units`` to keep: ``k`` or ``density`` (default :data:`DENSITY`) of them, at least one."""
    if "k" in cfg and "density" in cfg:
        raise af.FormatError(f"give one of k (number of {what} per module) or density (their fraction), not both")
    return min(units, cfg["k"]) if "k" in cfg else max(1, round(cfg.get("density", DENSITY) * units))


class SparseFT(af.Method):
    name = "sparse_ft"
    summary = "Sparse fine-tuning: k chosen weights per module trained, stored as sorted indices + values"
    kinds = ("sparse",)
    config_schema = _config_schema({})
    unit = "entries"

    def train(self, model: nn.Module, *, config: dict[str, Any], loss_fn: LossFn | None = None,
              batches: Iterable[Any] | None = None, **options: Any) -> af.TrainSession:
        """Choose each targeted module's mask (see the plugin docstring), then inject trainable values."""
        calibrated = loss_fn is not None and batches is not None
        cfg = {"selection": "gradient" if calibrated else "random", "seed": 0, **config}
        self.check_config(cfg)
        chosen = af.select_targets(model, cfg, supported=SUPPORTED)
        if cfg["selection"] == "gradient":
            scores, cfg["calibration_batches"] = gradient_scores(model, chosen, loss_fn, batches)
        else:
            scores = {path: random_score(m, path, cfg["seed"]) for path, m in chosen.items()}
        masks = {path: self.mask(function_2d(scores[path], m), cfg) for path, m in chosen.items()}

        def build(path: str, module: nn.Module) -> af.TrainableDelta:
            idx = stored_indices(masks[path], module)
            entry = {"kind": "sparse", "shape": list(module.weight.shape), "params": {"scale": 1.0}}
            return af.TrainableDelta(entry, {"values": torch.zeros(idx.numel(), dtype=af.adapter_dtype(module))},
                                     frozen={"indices": idx})

        return af.inject(model, method=self.name, config=cfg, build=build, supported=SUPPORTED)

    def mask(self, score: torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
        """Boolean function-layout ``[out, n_in]`` mask of the entries to train, from their scores."""
        k = count(cfg, score.numel(), self.unit)
        mask = torch.zeros(score.numel(), dtype=torch.bool)
        mask[score.reshape(-1).topk(k).indices] = True
        return mask.reshape(score.shape)


class StructuredFT(SparseFT):
    name = "structured_ft"
    summary = "Structured sparse fine-tuning: whole rows, columns or N:M groups trained, stored as sparse"
    config_schema = _config_schema({"structure": {"type": "string", "pattern": r"^(rows|columns|\d+:\d+)$"}})

    def mask(self, score: torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
        structure = cfg.get("structure", "rows")
        if structure in ("rows", "columns"):
            axis = 1 if structure == "rows" else 0
            units = score.sum(axis)
            keep = units.topk(count(cfg, units.numel(), structure)).indices
            mask = torch.zeros_like(score, dtype=torch.bool)
            if structure == "rows":
                mask[keep] = True
            else:
                mask[:, keep] = True
            return mask
        n, m = map(int, structure.split(":"))
        if not 0 < n <= m or score.shape[1] % m:
            raise af.FormatError(f"structure {structure!r} needs 0 < N <= M and M dividing the {score.shape[1]} "
                                 "inputs of each targeted module")
        groups = score.reshape(score.shape[0], -1, m)
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(n, dim=2).indices, True)
        return mask.reshape(score.shape)


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [SparseFT(), StructuredFT()]


__all__ = ["SparseFT", "StructuredFT", "gradient_scores", "stored_indices", "function_2d"]
