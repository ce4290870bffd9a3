"""LoRA: weight deltas of low rank, dW = (alpha / r) * B @ A (alpha / sqrt(r) with rsLoRA)."""

from __future__ import annotations

import adapterfmt as af


class LoRA(af.Method):
    name = "lora"
    summary = "Low-rank adaptation (LoRA, rsLoRA): dW = scale * B @ A"
    kinds = ("lowrank",)
    config_schema = {
        "type": "object",
        "properties": {
            "r": {"type": "integer", "minimum": 1},
            "alpha": {"type": "number"},
            "use_rslora": {"type": "boolean"},
        },
    }


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [LoRA()]
