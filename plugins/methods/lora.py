"""LoRA and DoRA: weight deltas of low rank, dW = (alpha / r) * B @ A (alpha / sqrt(r) with rsLoRA).

Stored as kind ``lowrank``, so apply / merge / compress / port are the kind's generic verbs; this plugin
supplies ``train``: it injects A and B into ``nn.Linear``, ``nn.Embedding``, GPT-2's ``Conv1D`` and
``nn.Conv2d`` modules. Per-module rank and alpha (``rank_pattern`` / ``alpha_pattern``), an optional
trainable bias on B (``lora_bias``, scaled like B) and DoRA's magnitude (``use_dora``) are options.

Initialisation follows PEFT: A Kaiming-uniform and B zero (so training starts at the base model); for
embeddings A zero and B normal. A trained adapter therefore matches a PEFT LoRA of the same config.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

import adapterfmt as af

SUPPORTED = (nn.Linear, nn.Embedding, "Conv1D", nn.Conv2d, "QuantizedLinear")
DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 8, "dropout": 0.0, "use_rslora": False, "lora_bias": False,
                            "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}}


def lowrank_params(module: nn.Module, r: int, fshape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Initial ``lora_A`` ``[r, *in]`` and ``lora_B`` ``[out, r(, 1, 1)]`` for a module (PEFT's init)."""
    dtype = af.adapter_dtype(module)
    out, rest = fshape[0], fshape[1:]
    if isinstance(module, nn.Embedding):
        return {"lora_A": torch.zeros(r, *rest, dtype=dtype), "lora_B": torch.randn(out, r, dtype=dtype)}
    a = torch.empty(r, *rest, dtype=dtype)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    b = torch.zeros(out, r, *([1] * (len(fshape) - 2)), dtype=dtype)
    return {"lora_A": a, "lora_B": b}


class LoRA(af.Method):
    name = "lora"
    summary = "Low-rank adaptation (LoRA, rsLoRA, LoRA bias): dW = scale * B @ A"
    kinds = ("lowrank",)
    defaults: dict[str, Any] = DEFAULTS
    config_schema = {
        "type": "object",
        "properties": {
            "r": {"type": "integer", "minimum": 1},
            "alpha": {"type": "number"},
            "dropout": {"type": "number", "minimum": 0, "maximum": 1},
            "use_rslora": {"type": "boolean"},
            "lora_bias": {"type": "boolean"},
            "use_dora": {"type": "boolean"},
            "rank_pattern": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 1}},
            "alpha_pattern": {"type": "object", "additionalProperties": {"type": "number"}},
            **af.TARGETS_SCHEMA,
        },
    }

    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> af.TrainSession:
        """Inject LoRA into the modules ``config`` selects; see the plugin docstring for the options."""
        cfg = {**self.defaults, **config}
        self.check_config(cfg)
        return af.inject(model, method=self.name, config=cfg, build=lambda p, m: self.layer(p, m, cfg),
                         supported=SUPPORTED)

    def layer(self, path: str, module: nn.Module, cfg: dict[str, Any]) -> af.TrainableDelta:
        r = af.pattern_value(cfg["rank_pattern"], path, cfg["r"])
        alpha = af.pattern_value(cfg["alpha_pattern"], path, cfg["alpha"])
        scale = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
        entry = af.module_entry("lowrank", module, {"scale": scale})
        fshape = af.function_shape(entry)
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise af.UnsupportedError(f"module {path!r}: LoRA on a grouped Conv2d (groups={module.groups})")
        embedding = isinstance(module, nn.Embedding)
        params = lowrank_params(module, r, fshape)
        if cfg["lora_bias"] or cfg["use_dora"]:
            if embedding:
                raise af.UnsupportedError(f"module {path!r}: lora_bias and DoRA are not defined for embeddings")
        if cfg["lora_bias"]:
            params["bias"] = torch.zeros(fshape[0], dtype=params["lora_A"].dtype)
        if cfg["use_dora"]:
            w = af.function_weight(module).detach()
            params["magnitude"] = w.float().reshape(w.shape[0], -1).norm(dim=1).to(params["lora_A"].dtype)
        return af.TrainableDelta(entry, params, dropout=0.0 if embedding else cfg["dropout"])


class DoRA(LoRA):
    name = "dora"
    summary = "DoRA: LoRA with a learned per-output magnitude (weight-decomposed low-rank adaptation)"
    defaults = {**DEFAULTS, "use_dora": True}


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [LoRA(), DoRA()]
