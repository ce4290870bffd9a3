"""Trainable tokens: new values for a few rows of an embedding table (PEFT's ``trainable_token_indices``).

Delta kind ``rows``: roles ``indices`` (int64 ``[n]``, strictly increasing row numbers of the stored
parameter) and ``values`` (``[n, dim]``, the rows' new values). The rows are *replaced*, not added to,
so the kind is not additive; merge saves the old rows and unmerge puts them back.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import adapterfmt as af


class Rows(af.DeltaKind):
    name = "rows"
    required_roles = ("indices", "values")

    def is_additive(self, entry: Mapping[str, Any], roles: Collection[str]) -> bool:
        return False

    def check(self, module: str, entry: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> None:
        i, v, shape = shapes["indices"], shapes["values"], entry["shape"]
        if len(shape) != 2 or len(i) != 1 or len(v) != 2 or v[0] != i[0] or v[1] != shape[1]:
            raise af.FormatError(f"module {module!r}: rows needs indices [n] and values [n, {shape[-1]}] for a "
                                 f"2-D parameter, got {list(i)}, {list(v)} for shape {list(shape)}")

    def check_data(self, module: str, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor]) -> None:
        idx = t["indices"]
        if idx.dtype != torch.int64 or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= entry["shape"][0])):
            raise af.FormatError(f"module {module!r}: rows indices must be int64 row numbers of the parameter")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise af.FormatError(f"module {module!r}: rows indices must be strictly increasing")

    def _weight(self, module: nn.Module, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        w = getattr(module, entry.get("parameter", "weight"))
        return w.index_copy(0, t["indices"].to(w.device), t["values"].to(w.dtype))

    def forward(self, module: nn.Module, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor], x: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
        w = self._weight(module, entry, t)
        if isinstance(module, nn.Embedding):
            return F.embedding(x, w, module.padding_idx, module.max_norm, module.norm_type,
                               module.scale_grad_by_freq, module.sparse)
        return af.weight_function(module, x, w.t() if af.is_transposed(module) else w) + (
            module.bias if getattr(module, "bias", None) is not None else 0)

    def merge(self, module: nn.Module, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor]) -> Any:
        param = getattr(module, entry.get("parameter", "weight"))
        idx = t["indices"].to(param.device)
        saved = param.detach()[idx].clone()
        with torch.no_grad():
            param.index_copy_(0, idx, t["values"].to(param.dtype))
        return saved

    def unmerge(self, module: nn.Module, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor], state: Any) -> None:
        param = getattr(module, entry.get("parameter", "weight"))
        with torch.no_grad():
            param.index_copy_(0, t["indices"].to(param.device), state)


class TrainableTokens(af.Method):
    name = "trainable_tokens"
    summary = "Trainable tokens: new values for selected rows of an embedding (kind rows)"
    kinds = ("rows",)


@af.hookimpl
def adapterfmt_delta_kinds() -> list[af.DeltaKind]:
    return [Rows()]


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [TrainableTokens()]
