"""Representation offsets and scales: IA3 (learned rescaling) and LoFiT (learned offsets), kind ``vector``.

IA3's ``train`` injects one ``vector`` per targeted module, initialised to ones: modules matched by
``feedforward_modules`` (same rules as ``target_modules``) scale their *input*, the others their output.

LoFiT's ``train`` injects offsets (``op: offset``, zeros) on the ``side`` (default ``output``) of the
targeted modules. Without ``head_dim`` every channel is trained. With ``head_dim`` the channels form heads
of that width (attention heads: the *input* of ``o_proj`` / GPT-2's ``attn.c_proj`` is the heads'
concatenated outputs) and only chosen heads are trained (the other channels' gradients are zeroed, so
they stay 0 under Adam/SGD); the choice is recorded as ``config.heads`` ``{module: [head, ...]}``:

- given: ``config.heads``;
- ``top_k_heads`` with ``loss_fn`` and ``batches`` (LoFiT's first step): per-channel scales (the ``vector``
  kind's ``op: scale``, from ones) are trained one Adam step per batch (``selection_lr``) with an L1
  penalty ``l1 * sum |scale - 1|``, and the ``top_k_heads`` heads over all modules with the largest
  ``sum |scale - 1|`` are chosen; the scales are then dropped (``selection: scale``);
- ``top_k_heads`` without calibration data: heads drawn at random, seeded by ``seed`` (``selection: random``).

Only modules with a chosen head get an entry. Offsets merge into the module's bias (``b + v`` on the
output side, ``b + W v`` on the input side), so merging needs a bias; apply / compress / port are the
kind's generic verbs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

import adapterfmt as af


class IA3(af.Method):
    name = "ia3"
    summary = "IA3: learned per-channel scaling of activations"
    kinds = ("vector",)
    config_schema = {"type": "object",
                     "properties": {"feedforward_modules": af.TARGETS_SCHEMA["target_modules"], **af.TARGETS_SCHEMA}}

    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> af.TrainSession:
        cfg = {"feedforward_modules": [], **config}
        self.check_config(cfg)
        return af.inject(model, method=self.name, config=cfg, build=lambda p, m: self.layer(p, m, cfg),
                         supported=(nn.Linear, "Conv1D", nn.Conv2d))

    @staticmethod
    def layer(path: str, module: nn.Module, cfg: dict[str, Any]) -> af.TrainableDelta:
        side = "input" if af.matches_targets(cfg["feedforward_modules"], path) else "output"
        entry = af.module_entry("vector", module, {"op": "scale", "side": side})
        fshape = af.function_shape(entry)
        n = fshape[1] if side == "input" else fshape[0]
        return af.TrainableDelta(entry, {"vector": torch.ones(n, dtype=af.adapter_dtype(module))})


def _channels(module: nn.Module, side: str) -> int:
    fshape = af.function_shape(af.module_entry("vector", module))
    return fshape[0] if side == "output" else fshape[1]


class LoFiT(af.Method):
    name = "lofit"
    summary = "LoFiT: learned per-channel offsets on selected modules or attention heads"
    kinds = ("vector",)
    config_schema = {"type": "object", "properties": {
        "side": {"enum": ["output", "input"]}, "head_dim": {"type": "integer", "minimum": 1},
        "top_k_heads": {"type": "integer", "minimum": 1}, "seed": {"type": "integer"},
        "heads": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "integer"}}},
        "l1": {"type": "number", "minimum": 0}, "selection_lr": {"type": "number"}, **af.TARGETS_SCHEMA}}

    def train(self, model: nn.Module, *, config: dict[str, Any],
              loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None, batches: Iterable[Any] | None = None,
              **options: Any) -> af.TrainSession:
        """Inject trainable offsets on the chosen modules / heads; see the plugin docstring."""
        cfg = {"side": "output", "l1": 1e-3, "selection_lr": 1e-2, "seed": 0, **config}
        self.check_config(cfg)
        if ("heads" in cfg or "top_k_heads" in cfg) and "head_dim" not in cfg:
            raise af.FormatError("choosing heads needs head_dim (the width of one head)")
        if "top_k_heads" in cfg and "heads" not in cfg:
            cfg["selection"] = "scale" if loss_fn is not None and batches is not None else "random"
            cfg["heads"] = self.choose_heads(model, cfg, loss_fn, batches)
        if "heads" in cfg:
            cfg["heads"] = {p: sorted(set(h)) for p, h in sorted(cfg["heads"].items()) if h}
            cfg = {**cfg, "candidate_modules": cfg["target_modules"], "target_modules": list(cfg["heads"])}
        return af.inject(model, method=self.name, config=cfg, build=lambda p, m: self.layer(p, m, cfg),
                         supported=(nn.Linear, "Conv1D"))

    @staticmethod
    def layer(path: str, module: nn.Module, cfg: dict[str, Any]) -> af.TrainableDelta:
        entry = af.module_entry("vector", module, {"op": "offset", "side": cfg["side"]})
        n = _channels(module, cfg["side"])
        delta = af.TrainableDelta(entry, {"vector": torch.zeros(n, dtype=af.adapter_dtype(module))})
        if "heads" in cfg:
            hd = cfg["head_dim"]
            mask = torch.zeros(n, dtype=delta.weights.vector.dtype, device=module.weight.device)
            for h in cfg["heads"][path]:
                if not 0 <= h < n // hd:
                    raise af.FormatError(f"module {path!r} has {n // hd} heads of width {hd}; no head {h}")
                mask[h * hd:(h + 1) * hd] = 1
            delta.weights.vector.register_hook(lambda g: g * mask)
        return delta

    def choose_heads(self, model: nn.Module, cfg: dict[str, Any], loss_fn: Any, batches: Any) -> dict[str, list[int]]:
        """The ``top_k_heads`` heads by the learned-scale score (or at random); ``{module: [head, ...]}``."""
        side, hd = cfg["side"], cfg["head_dim"]

        def scales(path: str, module: nn.Module) -> af.TrainableDelta:
            entry = af.module_entry("vector", module, {"op": "scale", "side": side})
            return af.TrainableDelta(entry, {"vector": torch.ones(_channels(module, side), dtype=af.adapter_dtype(module))})

        with af.inject(model, method=self.name, config=cfg, build=scales, supported=(nn.Linear, "Conv1D")) as s:
            if cfg["selection"] == "scale":
                opt = torch.optim.Adam(list(s.parameters()), lr=cfg["selection_lr"])
                for batch in batches:
                    loss = loss_fn(model, batch) + cfg["l1"] * sum((p - 1).abs().sum() for p in s.parameters())
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                score = {p: (l.weights.vector.detach() - 1).abs() for p, l in s.layers.items()}
            else:
                gen = torch.Generator().manual_seed(cfg["seed"])
                score = {p: torch.rand(l.weights.vector.shape, generator=gen) for p, l in s.layers.items()}
        ranked = [(float(v[h * hd:(h + 1) * hd].sum()), p, h) for p, v in score.items() for h in range(v.numel() // hd)]
        heads: dict[str, list[int]] = {}
        for _, p, h in sorted(ranked, key=lambda r: -r[0])[:cfg["top_k_heads"]]:
            heads.setdefault(p, []).append(h)
        return heads


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [IA3(), LoFiT()]
