"""Which modules of a torch model an adapter targets: names, suffixes, regex, ``all-linear``, layer indices.

Rules (the same for ``target_modules`` and ``exclude_modules``):

- a string is a regular expression matched against the whole module path, except ``"all-linear"``:
  every ``nn.Linear`` and GPT-2 ``Conv1D`` but the output head (``model.get_output_embeddings()`` when
  the model has it, else a module named ``lm_head``);
- a list holds module paths or path suffixes (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``,
  never ``model.layers.0.self_attn.xq_proj``); an item starting with ``re:`` is a regular expression.

``layers`` (an int or a list of ints) keeps only modules inside those blocks: a path segment
``<layers_pattern>.<index>`` (by default any of ``layers``, ``h``, ``blocks``, ``block``, ``layer``).
Per-module values (``rank_pattern``, ``alpha_pattern``) use list-item rules on their keys; the longest
matching key wins.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from ..errors import FormatError, UnsupportedError

ALL_LINEAR = "all-linear"
LAYER_CONTAINERS = ("layers", "h", "blocks", "block", "layer")

Targets = str | Sequence[str]
_NAMES: dict[str, Any] = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
TARGETS_SCHEMA: dict[str, Any] = {
    "target_modules": _NAMES, "exclude_modules": _NAMES, "layers_pattern": _NAMES,
    "layers_to_transform": {"anyOf": [{"type": "integer"}, {"type": "array", "items": {"type": "integer"}}]},
}
"""JSON Schema properties of the target fields every injecting method's config shares."""


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _item_matches(item: str, path: str) -> bool:
    if item.startswith("re:"):
        return re.fullmatch(item[3:], path) is not None
    return path == item or path.endswith("." + item)


def matches_targets(spec: Targets | None, path: str) -> bool:
    """Whether ``path`` is selected by ``spec`` (a regex string or a list of names / suffixes / ``re:`` items)."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(_item_matches(item, path) for item in spec)


def layer_index(path: str, layers_pattern: str | Sequence[str] | None = None) -> int | None:
    """The block index in ``path`` (``model.layers.3.mlp`` -> 3), or None outside numbered blocks."""
    names = (layers_pattern,) if isinstance(layers_pattern, str) else tuple(layers_pattern or LAYER_CONTAINERS)
    parts = path.split(".")
    for i in range(len(parts) - 1):
        if parts[i] in names and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            return get()
        except (AttributeError, NotImplementedError):
            return None
    return getattr(model, "lm_head", None)


def select_modules(model: nn.Module, target_modules: Targets, *, exclude_modules: Targets | None = None,
                   layers: int | Iterable[int] | None = None, layers_pattern: str | Sequence[str] | None = None,
                   supported: tuple[type | str, ...] = (nn.Linear, "Conv1D")) -> dict[str, nn.Module]:
    """Modules of ``model`` selected by the rules above, by path, in model order.

    ``supported`` lists the module classes (or class names, for classes outside torch) the method can
    adapt. A selected module of another class raises :class:`UnsupportedError`, except container
    modules whose children match; no selected module at all raises :class:`FormatError`.
    """
    if not isinstance(target_modules, str) and not isinstance(target_modules, Sequence):
        raise FormatError(f"target_modules must be a string or a list of strings, got {target_modules!r}")
    keep_layers = None if layers is None else ({layers} if isinstance(layers, int) else set(layers))
    head = _output_head(model) if target_modules == ALL_LINEAR else None
    chosen: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if not path:
            continue
        if target_modules == ALL_LINEAR:
            hit = is_linear(module) and module is not head
        else:
            hit = matches_targets(target_modules, path)
        if not hit or matches_targets(exclude_modules, path):
            continue
        if keep_layers is not None and layer_index(path, layers_pattern) not in keep_layers:
            continue
        if not _supported(module, supported):
            if any(True for _ in module.children()):
                continue
            names = ", ".join(s if isinstance(s, str) else s.__name__ for s in supported)
            raise UnsupportedError(f"module {path!r} is a {type(module).__name__}; this method adapts {names}")
        chosen[path] = module
    if not chosen:
        raise FormatError(f"no module of the model matches target_modules={target_modules!r}"
                          + (f" with layers={sorted(keep_layers)}" if keep_layers is not None else ""))
    return chosen


def select_targets(model: nn.Module, config: Mapping[str, Any], *,
                   supported: tuple[type | str, ...] = (nn.Linear, "Conv1D")) -> dict[str, nn.Module]:
    """:func:`select_modules` by a method config's target fields (``target_modules``, ``exclude_modules``,
    ``layers_to_transform``, ``layers_pattern``; see :data:`TARGETS_SCHEMA`)."""
    if "target_modules" not in config:
        raise FormatError("the training config needs target_modules (names, suffixes, a regex or 'all-linear')")
    return select_modules(model, config["target_modules"], exclude_modules=config.get("exclude_modules"),
                          layers=config.get("layers_to_transform"), layers_pattern=config.get("layers_pattern"),
                          supported=supported)


def _supported(module: nn.Module, supported: tuple[type | str, ...]) -> bool:
    return any(type(module).__name__ == s if isinstance(s, str) else isinstance(module, s) for s in supported)


def pattern_value(patterns: Mapping[str, Any] | None, path: str, default: Any) -> Any:
    """The value of the longest key of ``patterns`` matching ``path`` (list-item rules), else ``default``."""
    best: tuple[int, Any] | None = None
    for key, value in (patterns or {}).items():
        if _item_matches(key, path) and (best is None or len(key) > best[0]):
            best = (len(key), value)
    return default if best is None else best[1]
