"""Representation offsets and scales: IA3 (learned rescaling) and LoFiT-style offsets.

IA3's ``train`` injects one ``vector`` per targeted module, initialised to ones: modules matched by
``feedforward_modules`` (same rules as ``target_modules``) scale their *input*, the others their output.
"""

from __future__ import annotations

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


class LoFiT(af.Method):
    name = "lofit"
    summary = "LoFiT: learned per-channel offsets added to selected outputs"
    kinds = ("vector",)


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [IA3(), LoFiT()]
