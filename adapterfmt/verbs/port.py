"""Port an adapter to another base model (PortLLM: a patch made on base v1 applied to its evolved v2).

Steps, in :func:`plan_port` then :func:`port_adapter`:

1. Fingerprint the new base (a safetensors checkpoint or a live module) and compare it with the one the
   patch records: ``same``, ``new-weights`` (same architecture, other values), or a structural change.
2. Map each patched module to a module of the new base: by an explicit mapping (``{old: new}``; a key
   ending in ``.`` renames a prefix), else by name, else by position (the i-th parameter of the old base
   is the i-th of the new one; needs ``old_base`` and bases of the same length and shapes). Parameter
   order is registration order for a live module; for a checkpoint, the numbers in the name (layer
   indices), then the name (see :func:`position_key`).
3. Refuse, listing every one, modules that are missing or whose shape differs; nothing is written.
4. Recompute stored tensors that depend on the base weights, per kind (``old_base`` gives ``W_old``):
   - ``lowrank`` with ``magnitude`` (DoRA): ``m' = m * ||W_new + dW|| / ||W_old + dW||`` per output row,
     so the learnt per-row rescaling ``m / ||W + dW||`` carries over. Without ``old_base`` the magnitude
     is kept as stored (reported as ``kept-magnitude``).
   - ``dense`` mode ``replace`` (absolute weights): ``value' = W_new + (value - W_old)``; needs ``old_base``.
   - a plugin kind defining ``port_tensors(entry, tensors, old_weight, new_weight) -> tensors``: its rule.
   - ``lowrank`` with a derived base part (spec 6.2.1): the recipe is kept, so readers recompute the part
     on the new base; the port checks it is well defined there (spectral gap, pivots).
   - every other kind stores a base-independent change (lowrank, dense ``add`` — PortLLM's
     ``finetuned - base`` patch —, sparse, vector, prompt) and is kept as is.
5. Record the new base (name, fingerprint) and a ``provenance`` entry describing the port.

A method whose math differs overrides its ``port`` verb; this module is the generic implementation.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..deltas import function_shape
from ..deltas.base import shape_fits
from ..deltas.base_part import derived_tensors, is_derived
from ..errors import BaseMismatchError, FormatError, UnsupportedError, first_few
from ..format.adapter import Adapter
from ..format.fingerprint import compare, fingerprint_checkpoint, fingerprint_module, read_checkpoint_headers
from ..format.manifest import copy_manifest, shared_tensors
from ..format.safetensors_io import Header, read_tensor
from ..plugin.registry import get_kind

CHANGES = ("same", "new-weights", "renamed-modules", "changed-shapes", "other-structure", "unknown")
"""What a port reports about the new base, from the recorded fingerprint and the module mapping."""


# ----- a base model, from disk or memory --------------------------------------------------------------
class BaseModel:
    """Names, shapes and (on demand) values of a base model's tensors, in parameter order."""

    def __init__(self, source: str | os.PathLike[str] | nn.Module) -> None:
        self.module: nn.Module | None = None
        self._where: dict[str, Header] = {}
        if isinstance(source, nn.Module):
            self.module = source
            state = source.state_dict()
            self.name = type(source).__name__
            self.shapes = {n: tuple(t.shape) for n, t in state.items()}
            self.order = [n for n, _ in source.named_parameters(remove_duplicate=False)]
            self.order += [n for n in state if n not in set(self.order)]
            self.fingerprint = fingerprint_module(source)
        else:
            self.name = str(source)
            for h in read_checkpoint_headers(source):
                self._where.update(dict.fromkeys(h.tensors, h))
            self.shapes = {n: h.tensors[n].shape for n, h in self._where.items()}
            self.order = sorted(self.shapes, key=position_key)
            self.fingerprint = fingerprint_checkpoint(source)

    def tensor(self, name: str) -> torch.Tensor:
        if self.module is not None:
            return self.module.state_dict()[name].detach()
        return read_tensor(self._where[name], name)


def position_key(name: str) -> tuple[tuple[int, ...], str]:
    """Checkpoint tensor order for position mapping: by the numbers in the name (layer indices), then name.

    A renamed prefix (``transformer.h.3`` -> ``model.layers.3``) keeps each tensor's place.
    """
    return tuple(int(p) for p in re.findall(r"\d+", name)), name


def load_mapping(path: str | os.PathLike[str]) -> dict[str, str]:
    """A module mapping file: a JSON (or YAML) object of ``old module path -> new module path``."""
    path = Path(path)
    text = path.read_text("utf-8")
    try:
        data = json.loads(text)
    except ValueError:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise FormatError(f"mapping file is neither JSON nor YAML: {e}", path=path) from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise FormatError("mapping file must be an object of old module path -> new module path", path=path)
    return data


# ----- planning ---------------------------------------------------------------------------------------
@dataclass
class PortPlan:
    """Where each patched module goes in the new base, and what kind of change the new base is."""

    change: str
    fingerprint: str
    """The fingerprint comparison: ``same``, ``new-weights``, ``different`` or ``unknown``."""
    targets: dict[str, str] = field(default_factory=dict)
    how: dict[str, str] = field(default_factory=dict)
    """Per module: ``name``, ``mapping`` or ``position``."""
    notes: list[str] = field(default_factory=list)


def _apply_mapping(path: str, mapping: Mapping[str, str]) -> str | None:
    if path in mapping:
        return mapping[path]
    prefixes = [k for k in mapping if k.endswith(".") and path.startswith(k)]
    if prefixes:
        k = max(prefixes, key=len)
        return mapping[k] + path[len(k):]
    return None


def _positions(old: BaseModel, new: BaseModel) -> tuple[dict[str, str], str | None]:
    """old tensor name -> new tensor name by position, or the reason it cannot be done."""
    if len(old.order) != len(new.order):
        return {}, f"old base has {len(old.order)} tensors, new base {len(new.order)}"
    for i, (a, b) in enumerate(zip(old.order, new.order)):
        if old.shapes[a] != new.shapes[b]:
            return {}, f"position {i}: old {a} {list(old.shapes[a])} vs new {b} {list(new.shapes[b])}"
    return dict(zip(old.order, new.order)), None


def _compatible(entry: Mapping[str, Any], shape: tuple[int, ...]) -> bool:
    if entry["kind"] == "prompt":  # virtual tokens only need the embedding width
        return len(shape) == 2 and shape[-1] == entry["shape"][-1]
    return shape_fits(entry["shape"], shape)


def plan_port(adapter: Adapter, new: BaseModel, *, old: BaseModel | None = None,
              mapping: Mapping[str, str] | None = None) -> PortPlan:
    """Map the adapter's modules onto ``new``; raises :class:`BaseMismatchError` listing every misfit."""
    fp = compare((adapter.base or {}).get("fingerprint"), new.fingerprint)
    plan = PortPlan(change="unknown", fingerprint=fp)
    if old is not None and (adapter.base or {}).get("fingerprint"):
        if compare(adapter.base["fingerprint"], old.fingerprint) == "different":
            raise BaseMismatchError(f"the old base {old.name} is not the base this adapter records "
                                    "(its fingerprint structure differs)")
    by_pos: dict[str, str] = {}
    pos_problem = "no old base given"
    if old is not None:
        by_pos, pos_problem = _positions(old, new)
    problems: list[str] = []
    for path, entry in sorted(adapter.modules.items()):
        pname = entry.get("parameter", "weight")
        target = _apply_mapping(path, mapping or {})
        how = "mapping"
        if target is None and f"{path}.{pname}" in new.shapes:
            target, how = path, "name"
        if target is None and f"{path}.{pname}" in by_pos:
            target, how = by_pos[f"{path}.{pname}"].removesuffix(f".{pname}"), "position"
        if target is None:
            problems.append(f"{path}: no tensor {path}.{pname} in the new base (map it by a mapping file, "
                            f"or give the old base to map by position: {pos_problem})")
            continue
        shape = new.shapes.get(f"{target}.{pname}")
        where = path if target == path else f"{path} -> {target}"
        if shape is None:
            problems.append(f"{where}: the new base has no tensor {target}.{pname}")
        elif not _compatible(entry, shape):
            problems.append(f"{where}: patch expects {pname} of shape {list(entry['shape'])}, "
                            f"the new base has {list(shape)}")
        plan.targets[path], plan.how[path] = target, how
    clashes = {}
    for path, target in plan.targets.items():
        clashes.setdefault(target, []).append(path)
    problems += [f"{', '.join(ps)}: all map to {t}" for t, ps in sorted(clashes.items()) if len(ps) > 1]
    if problems:
        what = {"different": " (a different architecture: its tensor names or shapes differ)",
                "unknown": " (the patch records no base fingerprint)"}.get(fp, "")
        raise BaseMismatchError(f"cannot port to {new.name}{what}: {len(problems)} module(s) do not fit: "
                                + first_few(problems))
    renamed = any(plan.targets[p] != p for p in plan.targets)
    if fp in ("same", "new-weights") and not renamed:
        plan.change = fp
    elif renamed:
        plan.change = "renamed-modules"
    elif old is not None and any(old.shapes.get(n) not in (None, s) for n, s in new.shapes.items()):
        plan.change = "changed-shapes"
        changed = sorted(n for n, s in new.shapes.items() if old.shapes.get(n) not in (None, s))
        plan.notes.append(f"{len(changed)} untargeted tensor(s) changed shape, e.g. {changed[0]}")
    elif fp == "different":
        plan.change = "other-structure"
        plan.notes.append("the base's tensor list differs, but every patched module is there with its shape")
    return plan


# ----- recomputing base-dependent tensors --------------------------------------------------------------
def _rows_norm(w_f: torch.Tensor) -> torch.Tensor:
    return w_f.reshape(w_f.shape[0], -1).norm(dim=1)


def _function_weight(entry: Mapping[str, Any], w: torch.Tensor) -> torch.Tensor:
    w = w.double()
    return w.T if entry.get("params", {}).get("transposed") else w


def recompute(entry: Mapping[str, Any], tensors: dict[str, torch.Tensor], old_w: torch.Tensor | None,
              new_w: torch.Tensor) -> tuple[dict[str, torch.Tensor], str]:
    """A module's tensors re-targeted from ``old_w`` to ``new_w`` (stored layout) and the action taken."""
    kind = get_kind(entry["kind"])
    if hasattr(kind, "port_tensors"):
        return kind.port_tensors(entry, tensors, old_w, new_w), "recomputed"
    if entry["kind"] == "lowrank" and is_derived(entry):
        # the recipe is kept and recomputed from the new base by its readers; check it is well defined there
        f = _function_weight(entry, new_w)
        derived_tensors(entry, f.reshape(f.shape[0], -1), dtype=torch.float64)
        if "magnitude" not in tensors:
            return tensors, "recomputed"
    if entry["kind"] == "lowrank" and "magnitude" in tensors:
        if old_w is None:
            return tensors, "kept-magnitude"
        dw = kind.function_delta(entry, tensors).double().reshape(function_shape(entry))
        n_old = _rows_norm(_function_weight(entry, old_w) + dw)
        n_new = _rows_norm(_function_weight(entry, new_w) + dw)
        m = tensors["magnitude"]
        return {**tensors, "magnitude": (m.double().reshape(-1) * n_new / n_old).reshape(m.shape).to(m.dtype)}, \
            "recomputed"
    if entry["kind"] == "dense" and entry.get("params", {}).get("mode") == "replace":
        if old_w is None:
            raise UnsupportedError("a dense 'replace' patch stores absolute weights; porting it needs the old base")
        v = tensors["value"]
        return {**tensors, "value": (new_w.double() + (v.double() - old_w.double())).to(v.dtype)}, "recomputed"
    return tensors, "kept"


def _needs_recompute(entry: Mapping[str, Any], roles: list[str]) -> bool:
    kind = get_kind(entry["kind"])
    return (hasattr(kind, "port_tensors") or (entry["kind"] == "lowrank" and ("magnitude" in roles or is_derived(entry)))
            or (entry["kind"] == "dense" and entry.get("params", {}).get("mode") == "replace"))


# ----- the verb ---------------------------------------------------------------------------------------
def port_adapter(adapter: Adapter, *, new_base: str | os.PathLike[str] | nn.Module,
                 old_base: str | os.PathLike[str] | nn.Module | None = None,
                 mapping: Mapping[str, str] | str | os.PathLike[str] | None = None,
                 base_name: str | None = None) -> Adapter:
    """``adapter`` re-targeted to ``new_base`` (checkpoint path or live module); see the module docstring.

    ``mapping`` is a dict or a mapping file. The port's findings (change kind, module mapping, actions)
    are the last ``provenance`` entry of the result. Raises :class:`BaseMismatchError` (every module
    that does not fit) or :class:`UnsupportedError` (a base-dependent patch without ``old_base``).
    """
    if mapping is not None and not isinstance(mapping, Mapping):
        mapping = load_mapping(mapping)
    new = new_base if isinstance(new_base, BaseModel) else BaseModel(new_base)
    old = None if old_base is None else old_base if isinstance(old_base, BaseModel) else BaseModel(old_base)
    plan = plan_port(adapter, new, old=old, mapping=mapping)
    manifest = copy_manifest(adapter.manifest)
    modules: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    actions: dict[str, str] = {}
    unsupported = []
    for path, entry in sorted(adapter.modules.items()):
        target = plan.targets[path]
        entry = copy_manifest(entry)
        pname = entry.get("parameter", "weight")
        if plan.fingerprint != "same" and _needs_recompute(entry, adapter.roles(path)):
            old_w = None if old is None else old.tensor(_old_tensor(old, f"{path}.{pname}"))
            try:
                t, actions[path] = recompute(entry, adapter.module_tensors(path), old_w,
                                             new.tensor(f"{target}.{pname}"))
            except UnsupportedError as e:
                unsupported.append(f"{path}: {e.message}")
                continue
            entry.pop("encoding", None)
            shared = shared_tensors(entry)
            tensors.update({f"{target}.{role}": v for role, v in t.items() if role not in shared})
        else:
            actions[path] = "kept"
            prefix = path + "."
            tensors.update({target + "." + n[len(prefix):]: adapter.tensor(n)
                            for n in adapter.tensor_names() if n.startswith(prefix)})
        if entry["kind"] == "prompt":
            entry["shape"] = list(new.shapes[f"{target}.{pname}"])
        modules[target] = entry
    owned = tuple(p + "." for p in adapter.modules)
    tensors.update({n: adapter.tensor(n) for n in adapter.tensor_names() if not n.startswith(owned)})  # shared
    if unsupported:
        raise UnsupportedError("cannot port: " + "; ".join(unsupported)
                               + " (give the old base: port_adapter(old_base=...), CLI --old-base)")
    old_record = dict(adapter.base or {})
    manifest["modules"] = modules
    manifest["base"] = {"name": base_name or new.name, "revision": None, "fingerprint": new.fingerprint}
    if old_record.get("quantization") is not None:  # spec 6.12: the grid stays stated; attach checks it
        manifest["base"]["quantization"] = old_record["quantization"]
    record: dict[str, Any] = {
        "tool": "adapterfmt port", "change": plan.change, "fingerprint": plan.fingerprint,
        "from_base": {"name": old_record.get("name"), "fingerprint": old_record.get("fingerprint")},
        "to_base": manifest["base"]["name"],
        "mapped_by": {h: sum(1 for v in plan.how.values() if v == h) for h in sorted(set(plan.how.values()))},
        "renamed": {p: t for p, t in sorted(plan.targets.items()) if p != t},
        "actions": {a: sorted(p for p, v in actions.items() if v == a) for a in sorted(set(actions.values()))
                    if a != "kept"},
    }
    if plan.notes:
        record["notes"] = plan.notes
    manifest.setdefault("provenance", []).append(record)
    manifest["files"] = {}
    return Adapter(manifest, tensors)


def record_base(adapter: Adapter, base: str | os.PathLike[str] | nn.Module, *, base_name: str | None = None
                ) -> Adapter:
    """``adapter`` with ``base``'s fingerprint recorded (an adapter converted without ``--base`` has none), so
    merge, bake and port can check the base later. Every module must fit ``base`` by name and shape
    (:class:`BaseMismatchError` naming the first few misfits and the count); an adapter that records another
    base's fingerprint is refused (``port`` re-targets it). The name kept is ``base_name``, else the recorded
    one, else the base's path."""
    new = base if isinstance(base, BaseModel) else BaseModel(base)
    recorded = dict(adapter.base or {})
    verdict = compare(recorded.get("fingerprint"), new.fingerprint)
    if recorded.get("fingerprint") and verdict != "same":
        raise BaseMismatchError(f"the adapter records another base ({verdict} fingerprint than {new.name}); "
                                "`adapter port` re-targets an adapter to a new base", path=adapter.source)
    problems = []
    for path, entry in sorted(adapter.modules.items()):
        pname = entry.get("parameter", "weight")
        shape = new.shapes.get(f"{path}.{pname}")
        if shape is None:
            problems.append(f"{path}: the base has no tensor {path}.{pname}")
        elif not _compatible(entry, shape):
            problems.append(f"{path}: the adapter expects {pname} of shape {list(entry['shape'])}, "
                            f"the base has {list(shape)}")
    if problems:
        raise BaseMismatchError(f"{new.name} is not a base of this adapter: {len(problems)} module(s) do not fit: "
                                + first_few(problems), path=adapter.source)
    manifest = copy_manifest(adapter.manifest)
    manifest["base"] = {"name": base_name or recorded.get("name") or new.name, "revision": recorded.get("revision"),
                        "fingerprint": new.fingerprint}
    if recorded.get("quantization") is not None:
        manifest["base"]["quantization"] = recorded["quantization"]
    return Adapter(manifest, {n: adapter.tensor(n) for n in adapter.tensor_names()})


def port_live(adapter: Adapter, *, new_base: nn.Module, **options: Any) -> Adapter:
    """``adapter`` re-targeted to a live ``new_base`` by module path, for kinds that act on a module's inputs or
    outputs rather than on a weight of their own (a prefix, a bottleneck): each entry's kind checks the module
    (``check_module``); tensors and entries are kept, the new fingerprint and an ``adapterfmt port`` provenance
    entry recorded. Refuses a checkpoint path, a mapping or an old base (nothing to map them by)."""
    if not isinstance(new_base, nn.Module) or options:
        raise UnsupportedError(f"a {adapter.method} adapter ports only to a live model by module path (no "
                               f"checkpoint path, mapping or old base): its kinds fit modules, not weights")
    for path, entry in sorted(adapter.modules.items()):
        try:
            get_kind(entry["kind"]).check_module(path, entry, new_base.get_submodule(path))
        except (AttributeError, FormatError, UnsupportedError) as e:
            raise BaseMismatchError(f"cannot port to {type(new_base).__name__}: module {path!r}: {e}") from None
    manifest = copy_manifest(adapter.manifest)
    manifest["base"] = {**(manifest.get("base") or {"name": None, "revision": None}),
                        "fingerprint": fingerprint_module(new_base)}
    manifest.setdefault("provenance", []).append({"tool": "adapterfmt port", "change": "modules fit by path"})
    return Adapter(manifest, {n: adapter.tensor(n) for n in adapter.tensor_names()})


def _old_tensor(old: BaseModel, name: str) -> str:
    if name not in old.shapes:
        raise BaseMismatchError(f"the old base {old.name} has no tensor {name}, which the patch was made for")
    return name


def port_record(adapter: Adapter) -> dict[str, Any]:
    """The provenance entry of the latest port (what :func:`port_adapter` found and did)."""
    for rec in reversed(adapter.manifest.get("provenance", [])):
        if rec.get("tool") == "adapterfmt port":
            return rec
    raise FormatError("this adapter has not been ported (no 'adapterfmt port' provenance entry)")
