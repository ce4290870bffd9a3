"""A call of a transformers model whose sequence an adapter extends by ``n`` positions in front of the real tokens:
a prompt (virtual tokens in the input embeddings, :func:`adapterfmt.deltas.prompt.prompted_call`) or a prefix
(keys and values in the attention cache, the ``prefix`` kind). Their forward pre-hooks share it."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedError

if TYPE_CHECKING:
    from torch import nn


@dataclass
class PrefixedCall:
    """The arguments of one call of ``module`` by name, with what extending its sequence needs."""

    args: dict[str, Any]
    """Every argument by name (positional ones named from the forward's signature)."""
    cache_arg: str
    """The name of the cache argument: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    past: int
    """Positions already in the given cache (0 without one)."""
    batch: int
    steps: int
    """New positions of this call (``input_ids`` or ``inputs_embeds``)."""
    n: int

    @classmethod
    def of(cls, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], n: int) -> PrefixedCall | None:
        """``module``'s call with ``n`` positions in front; None when it has neither ``input_ids`` nor
        ``inputs_embeds``."""
        params = inspect.signature(module.forward).parameters
        named = [p.name for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(args) > len(named):
            raise UnsupportedError(f"{type(module).__name__} called with {len(args)} positional arguments; an "
                                   f"adapter that extends its sequence needs them by name")
        a = {**dict(zip(named, args)), **kwargs}
        x = a.get("input_ids") if a.get("inputs_embeds") is None else a["inputs_embeds"]
        if x is None:
            return None
        arg = "cache" if "cache" in params else "past_key_values"
        cache = a.get(arg)
        return cls(a, arg, cache.get_seq_length() if cache is not None else 0, x.shape[0], x.shape[1], n)

    def extend_mask(self) -> None:
        """Put ``n`` ones in front of a 2-D ``attention_mask`` that covers the real tokens only: on a first call,
        or a later call of cached generation whose mask does not count the ``n`` positions."""
        import torch

        mask = self.args.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and \
                mask.shape[1] == max(self.past - self.n, 0) + self.steps:
            self.args["attention_mask"] = torch.cat([mask.new_ones(self.batch, self.n), mask], dim=1)
