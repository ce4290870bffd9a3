"""The contract every delta kind follows.

A delta kind turns the tensors stored for one module (``roles``) into a change of that module: the
weight delta ``dW`` (for additive kinds), an unmerged forward contribution, and merge / unmerge of the
module's parameters. The spec (``spec/adapterfmt-1.md``) gives each kind's exact math; the classes in
this package are its one implementation.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import FormatError, UnsupportedError
from .modules import held_quantized, is_transposed, to_function_layout, weight_shape

if TYPE_CHECKING:
    import torch
    from torch import nn

ROWS_CACHE_ATTR = "_adapterfmt_rows_cache"
"""Attribute of a live module where a kind's ``forward_rows`` may cache data built from the attached
adapters (e.g. stacked factors); :mod:`adapterfmt.verbs.apply` drops it whenever adapters are attached or detached."""

Tensors = Mapping[str, "torch.Tensor"]
Entry = Mapping[str, Any]


class DeltaKind:
    """Base class of delta kinds. Subclasses set ``name`` and override what their math needs."""

    name: str = ""
    required_roles: tuple[str, ...] = ()
    optional_roles: tuple[str, ...] = ()
    additive: bool = True
    """True when the kind's effect is ``W + dW`` (so merge strategies can combine it in delta space)."""
    merge_hint: str = ""
    """What a refused delta-space merge of a non-additive entry of this kind says to do instead (default: bake)."""
    layout_sensitive: bool = False
    """True when the kind's tensors are in function layout, so ``params.transposed`` must match the module."""
    on_quantized: bool = False
    """True when the kind attaches (unmerged) to a module that holds its weight quantised
    (:func:`~adapterfmt.deltas.modules.held_quantized`), computing on the module's own dequantisation."""

    exact_roles: tuple[str, ...] = ()
    """Roles that compression keeps exactly as stored (never quantised or ternarised), e.g. a mixture's router."""
    stacked_lowrank: bool = False
    """True when ``lora_A`` ``[N, r, in]`` and ``lora_B`` ``[N, out, r]`` stack N low-rank pairs (a mixture's
    experts): compress resizes each pair on its own and ComPEFT refuses the entry."""

    has_data_rules: bool = False
    """Whether :meth:`check_data` checks anything (worked out for each subclass): full validation reads a
    module's values only for a kind that has data rules, or an encoded entry."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.has_data_rules = cls.check_data is not DeltaKind.check_data

    # ----- schema -----------------------------------------------------------------------------------
    def roles(self, entry: Entry) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(required, optional) tensor roles for a module entry."""
        return self.required_roles, self.optional_roles

    def check(self, module: str, entry: Entry, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Raise :class:`FormatError` when stored tensor shapes do not fit the entry."""

    def check_data(self, module: str, entry: Entry, t: Tensors) -> None:
        """Raise :class:`FormatError` when stored values break the kind's rules (read by full validation)."""

    def param_count(self, entry: Entry, shapes: Mapping[str, tuple[int, ...]]) -> int:
        return sum(math.prod(s) for s in shapes.values())

    def rank(self, entry: Entry, shapes: Mapping[str, tuple[int, ...]]) -> int | None:
        return None

    # ----- math -------------------------------------------------------------------------------------
    def bind(self, module: nn.Module, entry: Entry, t: Tensors) -> Tensors:
        """The tensors kept while attached to ``module`` (already on its device and dtype); :meth:`delta`,
        :meth:`forward`, :meth:`merge` and :meth:`unmerge` then receive these. Default: as stored."""
        return t

    def delta(self, entry: Entry, t: Tensors) -> torch.Tensor:
        """dW in the stored layout of the target parameter (fp32)."""
        raise UnsupportedError(f"delta kind {self.name!r} has no additive weight delta")

    def forward(self, module: nn.Module, entry: Entry, t: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Output of ``module`` with the delta applied unmerged, given its input ``x`` and base output ``y``."""
        raise UnsupportedError(f"delta kind {self.name!r} cannot be applied unmerged")

    def prepends(self, entry: Entry, t: Tensors) -> int:
        """How many positions :meth:`forward` puts in front of its module's output sequence (a prompt), 0 for
        none. On a model whose forward takes ``inputs_embeds``, such an entry acts on the model's inputs
        (:func:`adapterfmt.deltas.prompt.prompted_call`)."""
        return 0

    def merge(self, module: nn.Module, entry: Entry, t: Tensors) -> Any:
        """Fold the delta into the module's parameters; returns what :meth:`unmerge` needs."""
        import torch

        param = getattr(module, entry.get("parameter", "weight"))
        with torch.no_grad():
            param.add_(self.delta(entry, t).to(param.dtype))
        return None

    def unmerge(self, module: nn.Module, entry: Entry, t: Tensors, state: Any) -> None:
        """Undo :meth:`merge`."""
        import torch

        param = getattr(module, entry.get("parameter", "weight"))
        with torch.no_grad():
            param.sub_(self.delta(entry, t).to(param.dtype))

    def check_module(self, path: str, entry: Entry, module: nn.Module) -> None:
        """Raise when ``module`` of the live model cannot take this entry (shape or layout mismatch)."""
        import torch

        pname = entry.get("parameter", "weight")
        if held_quantized(module):
            if not (self.on_quantized and pname == "weight"):
                raise UnsupportedError(f"module {path!r} ({type(module).__name__}) holds its weight quantised; "
                                       f"kind {self.name!r} does not attach to a quantised {pname}")
        elif not isinstance(getattr(module, pname, None), torch.Tensor):
            raise FormatError(f"module {path!r} has no parameter {pname!r}")
        shape = weight_shape(module, pname)
        if not shape_fits(entry["shape"], shape):
            raise FormatError(f"module {path!r}: adapter expects {pname} of shape {list(entry['shape'])}, "
                              f"the model has {shape}")
        if self.layout_sensitive and self.transposed(entry) != is_transposed(module):
            raise FormatError(f"module {path!r} ({type(module).__name__}) stores its weight "
                              f"{'[in, out]' if is_transposed(module) else '[out, in]'} but the entry says "
                              f"params.transposed={self.transposed(entry)}")

    def is_additive(self, entry: Entry, roles: Collection[str]) -> bool:
        """Whether this entry, with tensors of these ``roles``, acts as ``W + dW`` (mergeable in delta space)."""
        return self.additive

    def acts_first(self, entry: Entry) -> bool:
        """Whether this entry's unmerged forward is defined only as the first active unmerged entry on its module
        (it reads the module's bare output or input, e.g. a rotation of the input); attach refuses it after another."""
        return False

    @staticmethod
    def transposed(entry: Entry) -> bool:
        """``params.transposed``: the target parameter is stored ``[in, out]`` (Conv1D, Embedding)."""
        return bool(entry.get("params", {}).get("transposed", False))


class RewritesWeight(DeltaKind):
    """A kind whose merge rewrites the target weight (and the module's bias) in place: :meth:`original` copies
    them for :meth:`merge` to return, and :meth:`unmerge` writes the copies back."""

    def _weight(self, module: nn.Module, entry: Entry) -> torch.Tensor:
        """The target parameter in function layout (a view: writing to it writes the module's)."""
        return to_function_layout(getattr(module, entry.get("parameter", "weight")), self.transposed(entry))

    def original(self, module: nn.Module, entry: Entry) -> dict[str, torch.Tensor | None]:
        """Copies of the target weight (function layout) and of the module's bias (None without one)."""
        bias = getattr(module, "bias", None)
        return {"weight": self._weight(module, entry).detach().clone(),
                "bias": None if bias is None else bias.detach().clone()}

    def unmerge(self, module: nn.Module, entry: Entry, t: Tensors, state: Any) -> None:
        """Write back what :meth:`original` copied."""
        import torch

        with torch.no_grad():
            self._weight(module, entry).copy_(state["weight"])
            if state["bias"] is not None:
                module.bias.copy_(state["bias"])


def shape_fits(expected: Sequence[int], actual: Sequence[int]) -> bool:
    """Whether a parameter of shape ``actual`` fits an entry's ``shape``. A 0 there matches any size: a
    ``vector`` entry may leave the dimensions it does not span unknown (spec 6.6)."""
    return len(expected) == len(actual) and all(e in (0, a) for e, a in zip(expected, actual))


def fail(module: str, msg: str) -> FormatError:
    return FormatError(f"module {module!r}: {msg}")
