"""Prompt tuning and DePT: learned virtual tokens prepended to the input embeddings.

``prompt_tuning`` trains kind ``prompt`` on the model's input embedding module (``get_input_embeddings()``,
or ``config.embedding_module``): ``num_virtual_tokens`` rows initialised at random (``init: random``,
standard normal as PEFT) or from the embeddings of ``init_token_ids`` (repeated to fill, as PEFT does).

``dept`` (Decomposed Prompt Tuning, Shi & Lipani 2023) trains a shorter prompt *and* a low-rank update
of the embedded input sequence. One module has one entry, and both act on the input embedding, so the
plugin supplies kind ``dept`` (roles ``embeddings [n, dim]``, ``offset_A [max_length, r]``,
``offset_B [r, dim]``, ``params.scale``, ``params.position = "prefix"``): applied, the embedding output
``y [batch, T, dim]`` becomes ``concat(embeddings, y + scale * (offset_A @ offset_B)[:T])`` — the update is
per *position* (as in the paper: ``E + A B`` on the padded ``[s, dim]`` input), positions past
``max_length`` are left as they are; inputs should be right-padded. ``offset_B`` starts at zero, so
training starts at plain prompt tuning. Training writes ``scale = alpha / sqrt(r)`` with ``alpha = 8``, as the
authors' code does (``PromptEmbeddingLoRA.scaling`` in DePT's ``peft/tuners/prompt_tuning_lora.py``, whose
``lora_alpha`` keeps its default 8); the applied scale is always the file's ``params.scale``. Neither kind
merges into weights (attach unmerged).

The model's sequence grows by ``n`` positions: pass no attention mask, or one extended by ``n`` ones in
front (``torch.cat([mask.new_ones(batch, n), mask], 1)``, which is what PEFT builds); outputs for the
real tokens are the last ``T`` positions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from typing import Any

import torch
from torch import nn

import adapterfmt as af

_PROMPT_SCHEMA: dict[str, Any] = {
    "num_virtual_tokens": {"type": "integer", "minimum": 1}, "embedding_module": {"type": "string"},
    "init": {"enum": ["random", "tokens"]}, "init_token_ids": {"type": "array", "items": {"type": "integer"}},
    "seed": {"type": "integer"}}


def _embedding_path(model: nn.Module, cfg: dict[str, Any]) -> str:
    if "embedding_module" in cfg:
        return cfg["embedding_module"]
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    path = next((p for p, m in model.named_modules() if m is emb and p), None)
    if path is None:
        paths = [p for p, m in model.named_modules() if isinstance(m, nn.Embedding)]
        if len(paths) != 1:
            raise af.FormatError(f"cannot tell the input embedding among {paths or 'no nn.Embedding'}; "
                                 "give config.embedding_module")
        path = paths[0]
    return path


class PromptTuning(af.Method):
    name = "prompt_tuning"
    summary = "Prompt tuning: virtual token embeddings prepended to the input embeddings"
    kinds = ("prompt",)
    config_schema = {"type": "object", "properties": _PROMPT_SCHEMA}
    defaults: dict[str, Any] = {"num_virtual_tokens": 8, "init": "random", "seed": 0}

    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> af.TrainSession:
        """Inject trainable virtual tokens on the input embedding; see the plugin docstring."""
        cfg = {**self.defaults, **config}
        self.check_config(cfg)
        if cfg["init"] == "tokens" and not cfg.get("init_token_ids"):
            raise af.FormatError("init 'tokens' needs init_token_ids")
        cfg["embedding_module"] = _embedding_path(model, cfg)
        return af.inject(model, method=self.name, config=cfg, build=lambda p, m: self.layer(m, cfg),
                         supported=(nn.Embedding,), targets={"target_modules": re.escape(cfg["embedding_module"])})

    def layer(self, module: nn.Module, cfg: dict[str, Any]) -> af.TrainableDelta:
        entry = {"kind": self.kinds[0], "shape": list(module.weight.shape), "params": {"position": "prefix"}}
        return af.TrainableDelta(entry, {"embeddings": self.prompt(module, cfg)})

    @staticmethod
    def prompt(module: nn.Module, cfg: dict[str, Any]) -> torch.Tensor:
        n, dtype = cfg["num_virtual_tokens"], af.adapter_dtype(module)
        if cfg["init"] == "tokens":
            ids = cfg["init_token_ids"]
            ids = (ids * math.ceil(n / len(ids)))[:n]
            return module.weight.detach()[torch.tensor(ids, device=module.weight.device)].to(dtype).clone()
        gen = torch.Generator().manual_seed(cfg["seed"])
        return torch.randn(n, module.weight.shape[1], generator=gen).to(dtype)


class DePTKind(af.DeltaKind):
    """Kind ``dept``: a prompt plus a low-rank per-position update of the embedded input (plugin docstring)."""

    name = "dept"
    required_roles = ("embeddings", "offset_A", "offset_B")

    def is_additive(self, entry: dict[str, Any], roles: Collection[str]) -> bool:
        return False

    def check(self, module: str, entry: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
        af.registry.get_kind("prompt").check(module, entry, shapes)
        a, b, dim = shapes["offset_A"], shapes["offset_B"], entry["shape"][1]
        if len(a) != 2 or len(b) != 2 or a[1] != b[0] or b[1] != dim:
            raise af.FormatError(f"module {module!r}: dept offset_A {list(a)} and offset_B {list(b)} must be "
                                 f"[max_length, r] and [r, {dim}]")

    def forward(self, module: nn.Module, entry: dict[str, Any], t: dict[str, torch.Tensor], x: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
        scale = float(entry.get("params", {}).get("scale", 1.0))
        offset = (scale * (t["offset_A"] @ t["offset_B"])).to(y.dtype)
        n = min(y.shape[-2], offset.shape[0])
        pad = y.new_zeros(y.shape[-2] - n, y.shape[-1])
        y = y + torch.cat([offset[:n], pad])
        return af.registry.get_kind("prompt").forward(module, entry, t, x, y)

    def merge(self, module: nn.Module, entry: dict[str, Any], t: dict[str, torch.Tensor]) -> Any:
        raise af.UnsupportedError("a DePT adapter cannot be merged into weights; attach it unmerged")


class DePT(PromptTuning):
    name = "dept"
    summary = "DePT: a shorter prompt plus a low-rank per-position update of the input embeddings"
    kinds = ("dept",)
    config_schema = {"type": "object", "properties": {
        **_PROMPT_SCHEMA, "r": {"type": "integer", "minimum": 1}, "alpha": {"type": "number"},
        "max_length": {"type": "integer", "minimum": 1}}}
    defaults = {**PromptTuning.defaults, "num_virtual_tokens": 4, "r": 4, "alpha": 8, "max_length": 256}

    def layer(self, module: nn.Module, cfg: dict[str, Any]) -> af.TrainableDelta:
        entry = {"kind": "dept", "shape": list(module.weight.shape),
                 "params": {"position": "prefix", "scale": cfg["alpha"] / math.sqrt(cfg["r"])}}
        dtype = af.adapter_dtype(module)
        a = torch.empty(cfg["max_length"], cfg["r"], dtype=dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        params = {"embeddings": self.prompt(module, cfg), "offset_A": a,
                  "offset_B": torch.zeros(cfg["r"], module.weight.shape[1], dtype=dtype)}
        return af.TrainableDelta(entry, params)


@af.hookimpl
def adapterfmt_delta_kinds() -> list[af.DeltaKind]:
    return [DePTKind()]


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [PromptTuning(), DePT()]
