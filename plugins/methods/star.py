"""STAR's constraint LoRA (Zhang, Wu, Zhou, Xu: "STAR: Constraint LoRA with Dynamic Active Learning for
Data-Efficient Fine-Tuning of Large Language Models", ACL Findings 2024, arXiv 2403.01165; reference code
callanwu/STAR ``src/finetuning.py``): LoRA trained with AdamW weight decay on ``B`` only, the calibration half of
STAR's hybrid regularisation; the other half, Monte-Carlo dropout, acts when the pool is scored
(:func:`adapterfmt.acquire`, ``adapter acquire``), which is also where STAR's dynamic uncertainty lives.

Stored as kind ``lowrank`` (the decay changes what is learned, not what is stored), so apply / merge / compress /
port are the kind's generic verbs; the LoRA layers are the ``lora`` method's. Defaults are the reference's: ``r``
64, ``alpha`` 16, ``dropout`` 0.1 on the seven projections of a Llama block, ``b_weight_decay`` 0.5 on every
``lora_B`` and ``a_weight_decay`` 0 on every ``lora_A`` (its three AdamW parameter groups; its third, biases and
layer norms, holds nothing a LoRA trains). The decay is AdamW's decoupled one (``p -= lr * wd * p`` before the
Adam update), as the reference's optimizer applies it, not an L2 term in the loss as the paper's wording reads.
The session builds that optimizer itself, so ``adapter train --weight-decay`` (one decay for every parameter)
is refused unless 0. Not supported here (refused as unknown keys): DoRA and LoRA biases, which the reference
does not train and whose decay group it does not define.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

import adapterfmt as af

STAR_DEFAULTS: dict[str, Any] = {
    "r": 64, "alpha": 16, "dropout": 0.1, "b_weight_decay": 0.5, "a_weight_decay": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"],
}
"""The reference's ``finetuning.py`` defaults (``lora_r`` from ``run_star.sh``)."""
SUPPORTED = (nn.Linear, "Conv1D", "QuantizedLinear")


def star_optimizer(session: af.TrainSession) -> Any:
    """The optimizer factory of a STAR session: AdamW over two groups, every ``lora_B`` with ``b_weight_decay``
    and every other trained tensor (``lora_A``) with ``a_weight_decay``."""
    cfg = session.config

    def build(params: list[nn.Parameter], *, weight_decay: float = 0.0, **kwargs: Any) -> torch.optim.Optimizer:
        if weight_decay:
            raise af.UnsupportedError(f"method star sets the weight decay per factor (config fields b_weight_decay "
                                      f"{cfg['b_weight_decay']}, a_weight_decay {cfg['a_weight_decay']}); a single "
                                      f"weight_decay {weight_decay} would override it: leave it at 0")
        names = {id(p): name for name, p in session.named_parameters()}
        b = [p for p in params if names[id(p)].endswith(".lora_B")]
        rest = [p for p in params if not names[id(p)].endswith(".lora_B")]
        return torch.optim.AdamW([{"params": rest, "weight_decay": cfg["a_weight_decay"]},
                                  {"params": b, "weight_decay": cfg["b_weight_decay"]}], **kwargs)

    return build


class STAR(af.Method):
    name = "star"
    summary = "STAR's constraint LoRA: AdamW weight decay on B only (calibration for active learning)"
    kinds = ("lowrank",)
    defaults: ClassVar[dict[str, Any]] = STAR_DEFAULTS

    @property
    def config_schema(self) -> dict[str, Any]:  # type: ignore[override]
        lora = af.registry.get_method("lora").config_schema["properties"]
        return {"type": "object", "properties": {
            **{k: v for k, v in lora.items() if k not in ("use_dora", "lora_bias")},
            "b_weight_decay": {"type": "number", "minimum": 0}, "a_weight_decay": {"type": "number", "minimum": 0}}}

    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> af.TrainSession:
        """LoRA (the ``lora`` method's layers) with the B-only decay's optimizer (module docstring)."""
        self.check_config(config)
        lora = af.registry.get_method("lora")
        cfg = {**lora.defaults, **self.defaults, **config}
        for key in ("use_dora", "lora_bias"):
            cfg.pop(key)
        lora_cfg = {**lora.defaults, **cfg}
        session = af.inject(model, method=self.name, config=cfg, build=lambda p, m: lora.layer(p, m, lora_cfg),
                            supported=SUPPORTED)
        session.optimizer_factory = star_optimizer(session)
        return session


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [STAR()]
