"""Prefix tuning (Li & Liang 2021, as PEFT implements it): learned key/value prefixes for every attention layer.

Kind ``prefix`` (spec 6.10.14) targets the decoder stack of a transformers causal LM (the module that takes
``past_key_values`` and ``attention_mask``: ``model`` of Llama, ``transformer`` of GPT-2). Roles ``keys`` and
``values``, each ``[layers, n, kv_heads, head_dim]``; the entry's ``shape`` is ``[layers, kv_heads, head_dim]``.
Attached, a forward pre-hook on that module passes a ``DynamicCache`` holding, for layer ``l``, key
``keys[l]`` and value ``values[l]`` (as ``[batch, kv_heads, n, head_dim]``, the same for every row), prepends
``n`` ones to the attention mask and adds ``n`` to given ``position_ids`` — what PEFT's
``PeftModelForCausalLM.forward`` does, so the logits are PEFT's. The model's positions then start at ``n``;
with ``params.positions = "from_zero"`` (AdapterHub's ``adapters``, which concatenates the prefix to the
keys inside attention) they start at 0: given ``position_ids`` are kept, absent ones passed as ``0 ... T - 1``.
A later call of cached generation brings a cache that starts with the prefix: it is passed on, the mask
extended when it covers the real tokens only.

The method has no train verb (its adapters come from ``adapter convert``); a prefix does not merge into
weights, and per-row adapter ids are refused (one cache serves the whole batch).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, ClassVar

import torch
from torch import nn

import adapterfmt as af

ROLES = ("keys", "values")
POSITIONS = ("after_prefix", "from_zero")
"""``params.positions``: the real tokens' positions start after the prefix (PEFT, the default) or at 0."""


def cache_geometry(module: nn.Module) -> list[int]:
    """``[layers, kv_heads, head_dim]`` of a transformers decoder stack, from its ``config``."""
    cfg = getattr(module, "config", None)
    if cfg is None or not hasattr(cfg, "num_attention_heads"):
        raise af.UnsupportedError(f"{type(module).__name__} has no transformers config: a prefix needs the "
                                  "decoder stack of a transformers model")
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return [cfg.num_hidden_layers, kv, head_dim]


class PrefixKind(af.DeltaKind):
    """Kind ``prefix``: per-layer key/value prefixes passed as the attention cache (module docstring)."""

    name = "prefix"
    required_roles = ROLES

    def is_additive(self, entry: dict[str, Any], roles: Collection[str]) -> bool:
        return False

    def check(self, module: str, entry: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
        positions = entry.get("params", {}).get("positions", "after_prefix")
        if positions not in POSITIONS:
            raise af.FormatError(f"module {module!r}: prefix params.positions must be one of {list(POSITIONS)}, "
                                 f"got {positions!r}")
        geo = list(entry["shape"])
        k, v = list(shapes["keys"]), list(shapes["values"])
        if len(geo) != 3 or len(k) != 4 or k != v or [k[0], k[2], k[3]] != geo:
            raise af.FormatError(f"module {module!r}: prefix keys {k} and values {v} must both be "
                                 f"[layers, n, kv_heads, head_dim] with shape {geo} = [layers, kv_heads, head_dim]")

    def check_module(self, path: str, entry: dict[str, Any], module: nn.Module) -> None:
        found = cache_geometry(module)
        if found != list(entry["shape"]):
            raise af.FormatError(f"module {path!r}: the prefix is for [layers, kv_heads, head_dim] "
                                 f"{list(entry['shape'])}, the model has {found}")

    def bind(self, module: nn.Module, entry: dict[str, Any], t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ref = next(module.parameters())
        return {r: t[r].to(device=ref.device, dtype=ref.dtype) for r in ROLES}

    def pre_forward(self, module: nn.Module, entry: dict[str, Any], t: dict[str, torch.Tensor],
                    args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The module's call with the prefix cache, the extended mask and offset positions (spec 6.10.14)."""
        from transformers import DynamicCache

        call = af.PrefixedCall.of(module, args, kwargs, t["keys"].shape[1])
        if call is None:
            return args, kwargs
        a, n, batch, past, steps = call.args, call.n, call.batch, call.past, call.steps
        if past == 0:  # a later call (generation) brings the cache that already starts with the prefix
            cache = a.get(call.cache_arg)
            cache = DynamicCache() if cache is None else cache
            for layer, (k, v) in enumerate(zip(t["keys"], t["values"])):
                cache.update(k.transpose(0, 1).expand(batch, -1, -1, -1), v.transpose(0, 1).expand(batch, -1, -1, -1),
                             layer)
            a[call.cache_arg] = cache
        call.extend_mask()
        if entry.get("params", {}).get("positions") == "from_zero":
            if a.get("position_ids") is None:  # else the model would number the new positions after the cache
                start = max(past - n, 0)
                a["position_ids"] = torch.arange(start, start + steps, device=t["keys"].device).expand(batch, -1)
        elif a.get("position_ids") is not None:
            a["position_ids"] = a["position_ids"] + n
        return (), a

    def forward(self, module: nn.Module, entry: dict[str, Any], t: dict[str, torch.Tensor], x: torch.Tensor,
                y: Any) -> Any:
        return y  # the prefix acted through the inputs

    def merge(self, module: nn.Module, entry: dict[str, Any], t: dict[str, torch.Tensor]) -> Any:
        raise af.UnsupportedError("a prefix adapter cannot be merged into weights; attach it unmerged")


def prefix_adapter(model: nn.Module, keys: torch.Tensor, values: torch.Tensor, *, module: str | None = None,
                   config: dict[str, Any] | None = None, provenance: list[dict[str, Any]] | None = None) -> af.Adapter:
    """A ``prefix_tuning`` adapter for transformers ``model``: ``keys`` / ``values`` ``[layers, n, kv_heads,
    head_dim]`` on its decoder stack (``module``, default ``model.base_model_prefix``)."""
    path = module or model.base_model_prefix
    entry = {"kind": "prefix", "shape": cache_geometry(model.get_submodule(path)), "params": {}}
    manifest = af.new_manifest("prefix_tuning", {path: entry}, config=config or {}, provenance=provenance or [],
                               base={"name": None, "revision": None, "fingerprint": af.base_fingerprint(model)})
    return af.Adapter(manifest, {f"{path}.keys": keys, f"{path}.values": values})


class PrefixTuning(af.Method):
    name = "prefix_tuning"
    summary = "Prefix tuning: learned key/value prefixes for every attention layer (PEFT's form)"
    kinds = ("prefix",)
    config_schema: ClassVar[dict[str, Any]] = {
        "type": "object", "properties": {"num_virtual_tokens": {"type": "integer", "minimum": 1}}}

    def port(self, adapter: af.Adapter, *, new_base: Any, **options: Any) -> af.Adapter:
        """A prefix fits a decoder stack of the same cache geometry (:func:`adapterfmt.port_live`)."""
        return af.port_live(adapter, new_base=new_base, **options)

    def conformance_example(self) -> Any:
        """A random 3-token prefix on a tiny transformers Llama (the kit's own tiny model takes no cache)."""
        from transformers import LlamaConfig, LlamaForCausalLM

        from adapterfmt.authoring.conformance import Example

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, vocab_size=32,
                                             max_position_embeddings=64)).float().eval()
        gen = torch.Generator().manual_seed(3)
        keys, values = torch.randn(2, 2, 3, 1, 8, generator=gen)
        ids = torch.randint(0, 32, (3, 5), generator=torch.Generator().manual_seed(1))
        return Example(model, prefix_adapter(model, keys, values, config={"num_virtual_tokens": 3}), ids)


@af.hookimpl
def adapterfmt_delta_kinds() -> list[af.DeltaKind]:
    return [PrefixKind()]


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [PrefixTuning()]
