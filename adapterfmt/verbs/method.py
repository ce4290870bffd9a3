"""The :class:`Method` base class: the five verbs every method supplies or inherits.

A method plugin subclasses :class:`Method`, sets ``name`` / ``kinds`` / ``config_schema`` and overrides
only the verbs whose math differs from the generic delta-kind behaviour it inherits.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import jsonschema
import torch
from torch import nn

from ..errors import FormatError, UnsupportedError

if TYPE_CHECKING:
    from ..format.adapter import Adapter


class Method:
    """An adaptation method (LoRA, IA3, task vectors ...) and its five verbs."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    summary: ClassVar[str] = ""
    kinds: ClassVar[tuple[str, ...]] = ()
    """Delta kinds this method's adapters are stored as."""
    config_schema: ClassVar[dict[str, Any] | None] = None
    """JSON Schema of ``manifest.method.config`` for this method (checked by :meth:`check_config`)."""

    def check_config(self, config: dict[str, Any], *, path: object = None) -> None:
        """Raise :class:`FormatError` when ``config`` does not follow :attr:`config_schema`.

        Unknown top-level keys are refused, naming the nearest known key, unless the schema allows extra
        properties explicitly: a misspelt option must never fall back to its default silently.
        """
        if self.config_schema is None:
            return
        known = self.config_schema.get("properties")
        if known is not None and self.config_schema.get("additionalProperties", False) is False:
            unknown = sorted(set(config) - set(known))
            if unknown:
                raise FormatError(f"{self.name} config has unknown key(s): "
                                  + ", ".join(_unknown_key(k, known) for k in unknown), path=path)
        err = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(self.config_schema).iter_errors(config))
        if err is not None:
            where = "/".join(map(str, err.absolute_path)) or "(top level)"
            raise FormatError(f"{self.name} config field {where}: {err.message}", path=path)

    file_fields: ClassVar[tuple[str, ...]] = ()
    """Config fields naming files the ``train`` verb reads (a path, or a mapping of names to paths), e.g. a source
    adapter: :meth:`resolve_paths` makes them absolute, and ``adapter train`` records their sha256 in its
    checkpoints and refuses a resumed run whose files changed (:meth:`input_files`)."""

    def resolve_paths(self, config: dict[str, Any], folder: Path) -> dict[str, Any]:
        """``config`` with the relative paths of its :attr:`file_fields` made absolute against ``folder`` (a config
        file's folder, or the working directory), so a run records where they are; a URL (``hf://...``) is kept."""

        def resolved(v: Any) -> Any:
            return str((folder / v).resolve()) if isinstance(v, str) and "://" not in v else v

        out = dict(config)
        for field in set(self.file_fields) & set(out):
            value = out[field]
            out[field] = ({n: resolved(v) for n, v in value.items()} if isinstance(value, Mapping)
                          else resolved(value))
        return out

    def input_files(self, config: dict[str, Any]) -> dict[str, Path]:
        """The files ``config``'s :attr:`file_fields` name, by field (``field.name`` for a mapping's entries)."""
        files = {}
        for field in self.file_fields:
            value = config.get(field)
            items = value.items() if isinstance(value, Mapping) else [(None, value)]
            files.update({field if n is None else f"{field}.{n}": Path(v) for n, v in items if isinstance(v, str)})
        return files

    def regularization(self, session: Any, **outputs: Any) -> Any:
        """The method's regularisation term for :meth:`TrainSession.regularization` (0 by default): a 0-dim
        tensor computed from ``session.layers`` and any model ``outputs`` the method documents."""
        return torch.zeros(())

    # ----- the five verbs -----------------------------------------------------------------------------
    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> Any:
        """Make ``model`` trainable for this method; returns a session whose ``extract()`` gives the adapter."""
        raise UnsupportedError(f"method {self.name!r} is not trained by injection; see `adapter extract`")

    def apply(self, model: nn.Module, adapter: Adapter, *, name: str | None = None, merge: bool = False) -> str:
        """Attach ``adapter`` to a live model (unmerged, or merged into the weights); returns its name."""
        from .apply import attach

        return attach(model, adapter, name=name, merge=merge)

    def merge(self, adapters: Sequence[Adapter], *, weights: Sequence[float] | None = None,
              strategy: str = "linear", **options: Any) -> Adapter:
        """Combine adapters into one, defined on each module's dW."""
        from .merge import merge_adapters

        return merge_adapters(adapters, weights=weights, strategy=strategy, **options)

    def compress(self, adapter: Adapter, *, steps: Sequence[dict[str, Any]], **options: Any) -> Adapter:
        """Make ``adapter`` smaller (each step a dict like ``{"method": "resize", "rank": 8}``)."""
        from .compress import compress_adapter

        return compress_adapter(adapter, steps=steps, **options)

    def port(self, adapter: Adapter, *, new_base: Any, **options: Any) -> Adapter:
        """Re-target ``adapter`` to another base model (a checkpoint path or live module)."""
        from .port import port_adapter

        return port_adapter(adapter, new_base=new_base, **options)


def _unknown_key(key: str, known: Any) -> str:
    near = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"{key!r} (did you mean {near[0]!r}?)" if near else f"{key!r} (known: {', '.join(sorted(known))})"
