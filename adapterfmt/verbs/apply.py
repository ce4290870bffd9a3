"""Attaching adapters to a live torch model: unmerged (switchable, several at once, per-row ids in a
batch) or merged into the weights, and back.

Adapters act through forward hooks on the targeted modules (plus a forward pre-hook where a kind has
``pre_forward``: it changes the module's inputs, as a prefix passes its cache), so module names, ``state_dict`` keys and
the model's own code are left untouched. The math of each delta kind lives in :mod:`adapterfmt.deltas`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..deltas.base import ROWS_CACHE_ATTR
from ..deltas.base_part import is_derived
from ..deltas.modules import is_transposed
from ..deltas.prompt import on_model_inputs, prompted_call
from ..errors import AdapterError, BaseMismatchError, UnsupportedError
from ..format.adapter import Adapter
from ..format.fingerprint import compare, fingerprint_module
from ..format.quant import QuantSpec, fits_grid
from ..plugin.registry import get_kind

STATE_ATTR = "_adapterfmt_state"


@dataclass
class Bound:
    """One adapter's entry for one module, with its tensors on the module's device and dtype."""

    kind: Any
    entry: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    merged: bool = False
    merge_state: Any = None
    dropout: float = 0.0
    """Input dropout applied in every forward, eval mode included (Monte-Carlo dropout; ``attach(dropout=)``)."""


class Slot:
    """The adapters attached to one module, and the forward hook that applies the active ones."""

    def __init__(self, owner: ModelState, path: str, module: nn.Module) -> None:
        self.owner, self.path, self.module = owner, path, module
        self.bound: dict[str, Bound] = {}
        self.busy = False
        self.handle = module.register_forward_hook(self._hook)
        self.pre_handle: Any = None
        """A forward pre-hook, registered once a bound kind has ``pre_forward`` (it changes the module's inputs)."""
        self.model_handle: Any = None
        """A forward pre-hook on the attached model, registered once a bound kind prepends positions (a prompt)
        and the model takes ``inputs_embeds``: such entries then act on the model's inputs, not in :meth:`_hook`."""

    def watch_inputs(self) -> None:
        if self.pre_handle is None:
            self.pre_handle = self.module.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    def watch_model(self, model: nn.Module) -> None:
        if self.model_handle is None:
            self.model_handle = model.register_forward_pre_hook(self._model_hook, with_kwargs=True)

    def remove(self) -> None:
        self.handle.remove()
        for handle in (self.pre_handle, self.model_handle):
            if handle is not None:
                handle.remove()

    def _at_model(self, b: Bound) -> bool:
        return self.model_handle is not None and b.kind.prepends(b.entry, b.tensors) > 0

    def _model_hook(self, model: nn.Module, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """The model's call with the active prompts in front of its input embeddings (:func:`prompted_call`)."""
        rows = self.owner.row_ids
        names = self.owner.active if rows is None else self.owner.row_names
        present = {i: self.bound[n] for i, n in enumerate(names) if n in self.bound and not self.bound[n].merged
                   and self._at_model(self.bound[n])}
        if self.busy or not present:
            return None
        lengths = {i: b.kind.prepends(b.entry, b.tensors) for i, b in present.items()}
        if rows is not None and (len(set(lengths.values())) != 1 or not set(rows.tolist()) <= set(present)):
            raise UnsupportedError(f"module {self.path!r}: per-row prompts need a prompt of one length on every "
                                   "row of the batch (a row without one would be shorter)")
        n = next(iter(lengths.values())) if rows is not None else sum(lengths.values())
        return prompted_call(model, args, kwargs, n, self.module,
                             lambda ids, y: self._apply(self.module, ids, y, at_model=True))

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if self.busy:
            return None
        names = self.owner.active if self.owner.row_ids is None else self.owner.row_names
        bounds = [(n, self.bound[n]) for n in names if n in self.bound and not self.bound[n].merged
                  and hasattr(self.bound[n].kind, "pre_forward")]
        if not bounds:
            return None
        if self.owner.row_ids is not None or len(bounds) > 1:
            raise UnsupportedError(f"module {self.path!r}: adapter {bounds[0][0]!r} (kind {bounds[0][1].kind.name}) "
                                   "changes the module's inputs for the whole batch; it cannot serve per-row "
                                   "adapter ids or act together with another such adapter")
        b = bounds[0][1]
        return b.kind.pre_forward(module, b.entry, b.tensors, args, kwargs)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        if self.busy or not args:
            return None
        return self._apply(module, args[0], output, at_model=False)

    def _apply(self, module: nn.Module, x: Any, y: torch.Tensor, *, at_model: bool) -> torch.Tensor:
        """The active unmerged entries' forward on ``y``: those that act on the model's inputs when ``at_model``,
        the others otherwise."""
        ids = self.owner.row_ids
        self.busy = True
        try:
            if ids is None:
                bounds = [(n, self.bound[n]) for n in self.owner.active if n in self.bound and not self.bound[n].merged
                          and self._at_model(self.bound[n]) == at_model]
                for i, (name, b) in enumerate(bounds):
                    if i and b.kind.acts_first(b.entry):
                        raise UnsupportedError(f"module {self.path!r}: adapter {name!r} (kind {b.kind.name}) must be "
                                               f"the first unmerged adapter on it, after {bounds[0][0]!r}; merge the "
                                               "earlier ones first (spec 6.10.7)")
                    xb = nn.functional.dropout(x, b.dropout, training=True) if b.dropout else x
                    y = b.kind.forward(module, b.entry, b.tensors, xb, y)
                return y
            return self._rows(module, x, y, ids, at_model)
        finally:
            self.busy = False

    def _rows(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor,
              at_model: bool) -> torch.Tensor:
        """Per-row adapters: row i of the batch gets adapter ``names[ids[i]]`` (-1: base only)."""
        names = self.owner.row_names
        present = [(i, self.bound[n]) for i, n in enumerate(names) if n in self.bound
                   and self._at_model(self.bound[n]) == at_model]
        if not present:
            return y
        if any(b.dropout for _, b in present):
            raise UnsupportedError(f"module {self.path!r}: an adapter attached with dropout cannot serve per-row "
                                   "adapter ids")
        batched = getattr(present[0][1].kind, "forward_rows", None)
        if batched is not None and all(type(b.kind) is type(present[0][1].kind) for _, b in present):
            out = batched(module, present, x, y, ids)
            if out is not None:  # None: the kind cannot batch this case; group rows by adapter instead
                return out
        out = y.clone()
        for i, b in present:
            rows = (ids == i).nonzero().flatten()
            if rows.numel():
                out[rows] = b.kind.forward(module, b.entry, b.tensors, x[rows], y[rows]).to(y.dtype)
        return out


@dataclass
class ModelState:
    """Everything attached to one model."""

    slots: dict[str, Slot] = field(default_factory=dict)
    adapters: dict[str, Adapter] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    row_ids: torch.Tensor | None = None
    row_names: list[str] = field(default_factory=list)


def _state(model: nn.Module, create: bool = False) -> ModelState:
    st = model.__dict__.get(STATE_ATTR)
    if st is None:
        if not create:
            raise AdapterError("no adapter is attached to this model")
        st = ModelState()
        model.__dict__[STATE_ATTR] = st
    return st


def attached(model: nn.Module) -> list[str]:
    """Names of the adapters attached to ``model``, in attach order."""
    st = model.__dict__.get(STATE_ATTR)
    return list(st.adapters) if st else []


def _bind(module: nn.Module, path: str, adapter: Adapter, entry: dict[str, Any]) -> Bound:
    kind = get_kind(entry["kind"], path=adapter.source)
    try:
        kind.check_module(path, entry, module)
    except AdapterError as e:
        raise BaseMismatchError(e.message, path=adapter.source) from None
    ref = next((p for p in module.parameters(recurse=False)), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    tensors = {
        role: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        for role, t in adapter.module_tensors(path).items()
    }
    return Bound(kind, entry, kind.bind(module, entry, tensors))


def check_derived_base(adapter: Adapter, model: nn.Module) -> None:
    """Spec 6.2.1: a derived base part is computed only on the base the adapter records (fingerprint "same")."""
    derived = sorted(m for m, e in adapter.modules.items() if is_derived(e))
    if not derived:
        return
    recorded = (adapter.manifest.get("base") or {}).get("fingerprint")
    found = compare(recorded, fingerprint_module(model))
    if found != "same" or not (recorded or {}).get("values"):
        raise BaseMismatchError(f"module {derived[0]!r} has a derived params.base_part, computed from the base "
                                f"weights, and this model is not the base the adapter records (fingerprint: "
                                f"{found}); attach it to that base, or make it explicit with it first", path=adapter.source)


def check_base_grid(adapter: Adapter, model: nn.Module) -> None:
    """Spec 6.12: an adapter made on a quantised base (``base.quantization``) is refused on a model whose
    targeted weights do not lie on that grid (an fp16 base, another bit width or group size)."""
    record = (adapter.manifest.get("base") or {}).get("quantization")
    if record is None:
        return
    spec = QuantSpec.from_json(record, path=adapter.source, what="base.quantization")
    for path, entry in sorted(adapter.modules.items()):
        w = getattr(model.get_submodule(path), entry.get("parameter", "weight"), None)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() < 2:
            continue
        w = w.detach().t() if is_transposed(model.get_submodule(path)) else w.detach()
        if not fits_grid(w, spec):
            raise BaseMismatchError(f"module {path!r}: the adapter was made on a base quantised to {spec.bits} "
                                    f"bits (group {spec.group_size or 'per channel'}, {spec.zero_point}) and this "
                                    f"weight is not on that grid; pass force=True to attach anyway",
                                    path=adapter.source)


def attach(model: nn.Module, adapter: Adapter, *, name: str | None = None, merge: bool = False,
           activate: bool = True, force: bool = False, dropout: float = 0.0) -> str:
    """Attach ``adapter`` to ``model``; returns the name it is attached under (default: the method's name).

    ``dropout`` > 0 drops each delta's inputs with that probability in every forward pass, in eval mode too,
    so repeated passes give Monte-Carlo dropout samples (such an adapter is never merged).

    Raises :class:`BaseMismatchError` naming every targeted module the model lacks or whose shape differs,
    or, unless ``force``, a targeted weight off the grid of the adapter's ``base.quantization``.
    """
    name = name or adapter.method
    if not 0.0 <= dropout < 1.0:
        raise AdapterError(f"attach: dropout {dropout} is outside [0, 1)")
    if dropout and merge:
        raise UnsupportedError("attach: an adapter with Monte-Carlo dropout acts unmerged; pass merge=False")
    if name in attached(model):
        raise AdapterError(f"an adapter named {name!r} is already attached; detach it or pick another name")
    check_derived_base(adapter, model)
    if not force:
        with contextlib.suppress(AttributeError):  # a missing module is reported below
            check_base_grid(adapter, model)
    missing, bound = [], {}
    for path, entry in sorted(adapter.modules.items()):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            missing.append(path)
            continue
        b = _bind(module, path, adapter, entry)
        bound[path] = (module, b, b.kind.prepends(b.entry, b.tensors) > 0 and on_model_inputs(model, adapter.source))
    if missing:
        raise BaseMismatchError(f"the model has no module {missing[0]!r}"
                                + (f" (and {len(missing) - 1} more targeted modules)" if len(missing) > 1 else ""),
                                path=adapter.source)
    ids = next((p for p, (m, _, _) in bound.items() if isinstance(m, nn.Embedding)), None) if dropout else None
    if ids is not None:
        raise UnsupportedError(f"attach: Monte-Carlo dropout drops a delta's inputs, and module {ids!r} takes token "
                               "ids; attach this adapter without dropout", path=adapter.source)
    st = _state(model, create=True)  # only once everything bound: a failed attach leaves the model untouched
    for path, (module, b, at_model) in bound.items():
        slot = st.slots.get(path)
        if slot is None:
            slot = st.slots[path] = Slot(st, path, module)
        b.dropout = float(dropout)
        slot.bound[name] = b
        if hasattr(b.kind, "pre_forward"):
            slot.watch_inputs()
        if at_model:
            slot.watch_model(model)
        module.__dict__.pop(ROWS_CACHE_ATTR, None)
    st.adapters[name] = adapter
    if activate:
        st.active.append(name)
    if merge:
        merge_into(model, name)
    return name


def _bounds(model: nn.Module, name: str) -> Iterator[tuple[Slot, Bound]]:
    st = _state(model)
    if name not in st.adapters:
        raise AdapterError(f"no adapter named {name!r} is attached (attached: {', '.join(st.adapters) or 'none'})")
    for slot in st.slots.values():
        if name in slot.bound:
            yield slot, slot.bound[name]


def merge_into(model: nn.Module, name: str) -> None:
    """Fold adapter ``name`` into the weights of the modules it targets."""
    done: list[tuple[Slot, Bound]] = []
    if any(b.dropout for _, b in _bounds(model, name)):
        raise UnsupportedError(f"adapter {name!r} was attached with Monte-Carlo dropout, which acts unmerged")
    try:
        for slot, b in _bounds(model, name):
            if not b.merged:
                b.merge_state = b.kind.merge(slot.module, b.entry, b.tensors)
                b.merged = True
                done.append((slot, b))
    except UnsupportedError:
        for slot, b in reversed(done):
            b.kind.unmerge(slot.module, b.entry, b.tensors, b.merge_state)
            b.merged = False
        raise


def unmerge(model: nn.Module, name: str) -> None:
    """Take adapter ``name`` back out of the weights (it stays attached, unmerged)."""
    for slot, b in reversed(list(_bounds(model, name))):
        if b.merged:
            b.kind.unmerge(slot.module, b.entry, b.tensors, b.merge_state)
            b.merged, b.merge_state = False, None


def detach(model: nn.Module, name: str | None = None) -> None:
    """Remove adapter ``name`` (all adapters when None), unmerging it first; the model is left as it was."""
    st = _state(model)
    for n in ([name] if name else list(st.adapters)):
        unmerge(model, n)
        for path, slot in list(st.slots.items()):
            slot.bound.pop(n, None)
            slot.module.__dict__.pop(ROWS_CACHE_ATTR, None)
            if not slot.bound:
                slot.remove()
                del st.slots[path]
        del st.adapters[n]
        if n in st.active:
            st.active.remove(n)
    if not st.adapters:
        del model.__dict__[STATE_ATTR]


def activate(model: nn.Module, names: str | Sequence[str] | None) -> None:
    """Choose which attached (unmerged) adapters act; ``None`` or ``[]`` runs the bare base."""
    st = _state(model)
    names = [names] if isinstance(names, str) else list(names or [])
    unknown = [n for n in names if n not in st.adapters]
    if unknown:
        raise AdapterError(f"no adapter named {unknown[0]!r} is attached")
    st.active = names


@contextlib.contextmanager
def adapter_ids(model: nn.Module, rows: Sequence[str | None]) -> Iterator[None]:
    """Within the block, batch row ``i`` uses adapter ``rows[i]`` (``None``: the bare base).

    All named adapters must be attached unmerged; the rows of one forward pass are served together
    (batched per adapter kind), not by a loop of masked forward passes.
    """
    st = _state(model)
    names = [n for n in dict.fromkeys(r for r in rows if r is not None)]
    for n in names:
        if n not in st.adapters:
            raise AdapterError(f"no adapter named {n!r} is attached")
        if any(b.merged for _, b in _bounds(model, n)):
            raise AdapterError(f"adapter {n!r} is merged; unmerge it before per-row use")
    index = {n: i for i, n in enumerate(names)}
    ids = torch.tensor([-1 if r is None else index[r] for r in rows], dtype=torch.int64)
    prev = (st.row_ids, st.row_names)
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    st.row_ids, st.row_names = ids.to(dev), names
    try:
        yield
    finally:
        st.row_ids, st.row_names = prev
