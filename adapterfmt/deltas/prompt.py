"""``prompt``: virtual token embeddings prepended to the output of the input embedding module.

On a model whose forward takes ``inputs_embeds`` (a transformers model) the prompt acts on the model's inputs
instead, as PEFT's prompt learning does: :func:`prompted_call` (used by :mod:`adapterfmt.verbs.apply` and the
train sessions) embeds the ids, prepends the prompt and extends the mask, labels and token types, so ``model(ids)``
and ``generate`` give PEFT's outputs ``[batch, n + T, ...]`` whatever the model does with the ids' shape.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedError
from .base import DeltaKind, Entry, Tensors, fail
from .prefixed import PrefixedCall

if TYPE_CHECKING:
    import torch
    from torch import nn


class Prompt(DeltaKind):
    name = "prompt"
    required_roles = ("embeddings",)

    def is_additive(self, entry: Entry, roles: Collection[str]) -> bool:
        return False

    def check(self, module: str, entry: Entry, shapes: dict[str, tuple[int, ...]]) -> None:
        pos = entry.get("params", {}).get("position", "prefix")
        if pos != "prefix":
            raise fail(module, f"prompt params.position must be 'prefix', got {pos!r}")
        e, shape = shapes["embeddings"], entry["shape"]
        if len(e) != 2 or len(shape) != 2 or e[1] != shape[1]:
            raise fail(module, f"embeddings has shape {list(e)}, expected [n_tokens, {shape[-1]}]")

    def forward(self, module: nn.Module, entry: Entry, t: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import torch

        emb = t["embeddings"].to(y.dtype)
        if y.dim() == 2:
            return torch.cat([emb, y], dim=0)
        return torch.cat([emb.expand(y.shape[0], *emb.shape), y], dim=1)

    def prepends(self, entry: Entry, t: Tensors) -> int:
        return int(t["embeddings"].shape[0])

    def merge(self, module: nn.Module, entry: Entry, t: Tensors) -> Any:
        raise UnsupportedError("a prompt adapter cannot be merged into weights; attach it unmerged")


def on_model_inputs(model: nn.Module, source: str | None = None) -> bool:
    """Whether a prompt acts on ``model``'s inputs (:func:`prompted_call`): its forward takes ``inputs_embeds``.
    An encoder-decoder model is refused (its labels and cache are the decoder's); ``source`` names the adapter."""
    if "inputs_embeds" not in inspect.signature(model.forward).parameters:
        return False
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise UnsupportedError(f"{type(model).__name__} is an encoder-decoder model; a prompt adapter attaches to "
                               "decoder-only and encoder-only models", path=source)
    return True


def prompted_call(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], n: int,
                  embed: Callable[[torch.Tensor], torch.Tensor],
                  prepend: Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor],
                  ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The arguments of a call of ``model`` (a forward pre-hook's) with a prompt of ``n`` positions in front of
    its input embeddings, as PEFT's prompt learning ``forward`` and ``generate`` pass them to the base model
    (``PeftModelForCausalLM`` for a model that can generate, the encoder task classes otherwise):

    - a call without a cache, or with an empty one, gets ``inputs_embeds = prepend(input_ids, E)`` with ``E``
      the given ``inputs_embeds`` or ``embed(input_ids)``; a later call of cached generation keeps its inputs;
    - a 2-D ``attention_mask`` gets ``n`` ones in front (on a later call, when it covers the real tokens only);
      a mask of another rank is refused;
    - a generating model's ``labels`` get ``n`` times -100 in front and its ``token_type_ids`` are dropped;
      other models' ``token_type_ids`` get ``n`` zeros in front;
    - ``position_ids`` are dropped: positions count from the first virtual token, left padding or not.

    Returns None when the call has neither ``input_ids`` nor ``inputs_embeds``.
    """
    import torch

    call = PrefixedCall.of(model, args, kwargs, n)
    if call is None:
        return None
    a = call.args
    ids, embeds = a.pop("input_ids", None), a.pop("inputs_embeds", None)
    generates = bool(getattr(model, "can_generate", lambda: False)())
    if call.past == 0:
        a["inputs_embeds"] = prepend(ids, embed(ids) if embeds is None else embeds)
    elif embeds is None:
        a["input_ids"] = ids
    else:
        a["inputs_embeds"] = embeds
    mask = a.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
        got = f"{mask.dim()}-D" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise UnsupportedError(f"a prompt adapter puts {n} ones in front of a 2-D attention mask; got {got}")
    call.extend_mask()
    labels = a.get("labels")
    if generates and labels is not None and call.past == 0:
        a["labels"] = torch.cat([labels.new_full((call.batch, n), -100), labels], dim=1)
    types = a.pop("token_type_ids", None)
    if types is not None and not generates:
        a["token_type_ids"] = torch.cat([types.new_zeros(call.batch, n), types], dim=1) if call.past == 0 else types
    a.pop("position_ids", None)
    a.pop("cache_position", None)
    return (), a
