"""DEFT (Runwal, Pedapati, Chen: "From PEFT to DEFT: Parameter Efficient Finetuning for Reducing Activation
Density in Transformers", AAAI 2025; reference code IBM/DEFT): LoRA trained with a density loss on the MLP
activations, so the fine-tuned model's MLPs fire fewer neurons. Not PEFT's DEFT.

Stored as kind ``lowrank`` (the density loss changes what is learned, not what is stored), so apply / merge /
compress / port / extract are the kind's generic verbs; this plugin supplies ``train`` and the loss term.

The loss, as the reference computes it (``compute_l0_penalty`` in ``GLUE/lora.py`` and ``SQuAD/deft_trainer.py``):
for each watched activation tensor ``a`` ``[batch, tokens, channels]`` of the last forward pass, per sample the
mean over tokens and channels of ``a^2 / (a^2 + eps)`` (a smooth count of the non-zeros); the term is
``density_weight`` times the mean of that over samples and layers, added to the task loss. As in the reference
the mean runs over every position of the batch, padding included (so with ``adapter train --processes N`` each
process pads its own share, and the term differs slightly from one process's). The watched activations are the outputs of
the modules named ``activations`` (the reference's ``intermediate_act_fn`` / ``DenseReluDense.act``; for
Llama-style MLPs ``mlp.act_fn``), or their inputs with ``capture: input`` (e.g. ``mlp.down_proj``, for models
that apply the activation as a function). :func:`activation_density` is the reference's evaluation metric:
the fraction of exactly non-zero activations, per sample and layer, averaged.

Only training forward passes (gradients on) are watched, and ``session.regularization()`` takes what the last
one kept (an eval pass under ``torch.no_grad()`` changes nothing). The LoRA options are the ``lora`` method's (its
layers build the deltas); DEFT adds no trainable parameter, so it is compared with LoRA at equal budget.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

import adapterfmt as af

DEFT_DEFAULTS: dict[str, Any] = {"density_weight": 1.0, "eps": 1e-7, "activations": "mlp.act_fn", "capture": "output"}
"""The reference's defaults (``--weight_l 1.0``, ``--eps 1e-07``) and the Llama name of the MLP activation."""


def activation_modules(model: nn.Module, suffix: str) -> dict[str, nn.Module]:
    """The modules whose name is ``suffix`` or ends with ``.suffix``, in model order (one ``FormatError`` if none)."""
    found = {n: m for n, m in model.named_modules() if n == suffix or n.endswith("." + suffix)}
    if not found:
        raise af.FormatError(f"deft: no module named '*.{suffix}' in the model (config field activations)")
    return found


def smooth_density(acts: list[torch.Tensor], eps: float) -> torch.Tensor:
    """The reference's differentiable density: per sample and layer the mean of ``a^2 / (a^2 + eps)`` over all
    but the first axis, then the mean over samples and layers."""
    per = [(a.float() ** 2 / (a.float() ** 2 + eps)).flatten(1).mean(1) for a in acts]
    return torch.stack(per, dim=1).mean()


class Probe:
    """The watched activations of the last training forward pass of a model."""

    def __init__(self, model: nn.Module, cfg: dict[str, Any]) -> None:
        self.acts: list[torch.Tensor] = []
        self.modules = activation_modules(model, cfg["activations"])
        self.capture = cfg["capture"]

    def handles(self, model: nn.Module) -> Iterator[tuple[str, Any]]:
        """Register the hooks: a pre-hook on the model starts a new pass, one hook per watched module."""

        def start(m: nn.Module, args: Any) -> None:
            if torch.is_grad_enabled():
                self.acts = []

        def watch(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if torch.is_grad_enabled():
                self.acts.append(args[0] if self.capture == "input" else out)

        yield "deft:start", model.register_forward_pre_hook(start)
        for name, module in self.modules.items():
            yield f"deft:{name}", module.register_forward_hook(watch)


class DEFT(af.Method):
    name = "deft"
    summary = "DEFT: LoRA with a density loss on the MLP activations (fewer active neurons after fine-tuning)"
    kinds = ("lowrank",)
    _probes: ClassVar[weakref.WeakKeyDictionary[Any, Probe]] = weakref.WeakKeyDictionary()

    @property
    def config_schema(self) -> dict[str, Any]:  # type: ignore[override]
        lora = af.registry.get_method("lora").config_schema
        return {**lora, "properties": {
            **lora["properties"], "density_weight": {"type": "number", "minimum": 0},
            "eps": {"type": "number", "exclusiveMinimum": 0}, "activations": {"type": "string", "minLength": 1},
            "capture": {"enum": ["output", "input"]}}}

    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> af.TrainSession:
        """LoRA (the ``lora`` method's layers and options) and hooks that keep the activations for the loss."""
        self.check_config(config)
        lora = af.registry.get_method("lora")
        cfg = {**lora.defaults, **DEFT_DEFAULTS, **config}
        probe = Probe(model, cfg)
        lora_cfg = {k: v for k, v in cfg.items() if k not in DEFT_DEFAULTS}
        session = af.inject(model, method=self.name, config=cfg, build=lambda p, m: lora.layer(p, m, lora_cfg),
                            supported=(nn.Linear, nn.Embedding, "Conv1D", nn.Conv2d, "QuantizedLinear"))
        for name, handle in probe.handles(model):
            session.keep_hook(name, handle)
        self._probes[session] = probe
        return session

    def regularization(self, session: Any, **outputs: Any) -> torch.Tensor:
        """``density_weight`` times the smooth density of the last training pass's activations (0 without one).
        It takes them: a second call before the next training pass is 0, and none are held between steps."""
        probe = self._probes.get(session)
        if probe is None or not probe.acts:
            return torch.zeros(())
        acts, probe.acts = probe.acts, []
        return session.config["density_weight"] * smooth_density(acts, session.config["eps"])


@contextmanager
def _watching(model: nn.Module, suffix: str, capture: str) -> Iterator[list[torch.Tensor]]:
    acts: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda m, a, o: acts.append(a[0] if capture == "input" else o))
               for m in activation_modules(model, suffix).values()]
    try:
        yield acts
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def activation_density(model: nn.Module, ids: torch.Tensor, *, activations: str = "mlp.act_fn",
                       capture: str = "output") -> float:
    """The reference's evaluation density (``compute_eval_sparsity``): the fraction of exactly non-zero
    activations per sample and watched module over ``model(ids)``, averaged over samples and modules."""
    with _watching(model, activations, capture) as acts:
        model(ids)
    return float(torch.stack([(a != 0).flatten(1).float().mean(1) for a in acts], dim=1).mean())


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [DEFT()]
