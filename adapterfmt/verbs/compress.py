"""``compress``: make an adapter smaller, and say what it cost.

Steps run in order on every module (each a dict ``{"method": name, **options}``):

- ``resize``: SVD rank reduction of ``lowrank`` modules (kohya's resize_lora) to ``rank`` and/or the rank a
  threshold on the singular values picks: ``energy`` (smallest rank whose energy fraction sum s_i^2 / sum s^2
  reaches it, as ``merge`` and ``extract`` count it), ``sv_ratio`` (keep s_i >= s_max / ratio), ``sv_fro``
  (kohya's: the same rule on the unsquared fraction sqrt(sum s_i^2 / sum s^2)), ``sv_cumulative`` (smallest rank whose
  sum s_i / sum s reaches it). With several, the smallest rank wins; ``params.scale`` is kept, the
  factors are ``U sqrt(S)`` and ``sqrt(S) V^T``. A kind of stacked pairs (``stacked_lowrank``: a mixture's
  experts) has each pair resized on its own, zero-padded to the largest rank kept.
- ``compeft``: ComPEFT (Yadav et al. 2023) as its reference code computes it (``get_compressed_lora_weights``
  in ``src/qlora/ties_utils.py``): the update tau is every stored factor of the adapter (lora_A, lora_B, a
  dense delta ...; float tensors of 2+ dims, concatenated in sorted name order); keep the magnitudes at or
  above the ``(n - int(n * density))``-th smallest (``topk_values_mask``, ties kept), store their signs and
  ONE scale ``factor * std(tau)`` (alpha; ``torch.std``) for all of them. Options: ``scope="tensor"``
  takes the top-k and the scale per tensor instead; ``scale="stc"`` (older spelling ``"mean"``) is the STC
  baseline, the mean kept magnitude (as STC defines it; the reference's STC branch averages signed
  values); ``group_size`` gives one scale per that many elements of each tensor. Refused for a kind of stacked
  pairs behind a router (a mixture). ``target="params"``
  (default, as the reference: on the factors) encodes each factor with the ``ternary`` codec;
  ``target="delta"`` turns each additive module's dW into a ``ternary`` delta kind. 1-D roles (DoRA
  magnitude, biases, IA3 vectors) are left as stored and are not part of tau.
- ``quantize``: ``bits=8`` (int8 per output channel) or ``bits=4`` (int4, ``group_size`` scales; or
  ``codec="nf4"`` / ``"fp4"``, ``group_size`` values per absmax) codecs on every stored float tensor of 2+ dims
  not already encoded, except the roles a kind keeps exact (``exact_roles``: a mixture's router).

A codec step (``quantize``, ``compeft`` on the factors) that finds no tensor it may encode (e.g. S2-LoRA: its
factors are shared, which stay plain, and its coefficients are 1-D) leaves the adapter as it was and says why
in one note (``compression.notes``): the output is then no smaller, only the compression record is added.

The record of what was done goes in the manifest's ``compression``: the steps, tensor bytes before and
after, and the relative error of each module's dW, ``||dW' - dW|| / ||dW||`` (for modules without an
additive dW, e.g. DoRA, the same over the kind's stored effect; for stacked pairs, the worst pair's, and each
pair's in ``expert_errors``); with ``base`` also how far the model's
outputs moved (see :func:`output_divergence`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..deltas.base_part import is_derived
from ..deltas.lowrank import LowRank, function_shape
from ..errors import FormatError, UnsupportedError
from ..format import codecs
from ..format.adapter import Adapter
from ..format.jsontext import read_json_object
from ..format.limits import check_dense
from ..format.manifest import copy_manifest, shared_tensors
from ..format.safetensors_io import ITEMSIZE, dtype_name
from ..format.ternary import ternary_encode
from ..plugin.registry import get_kind
from .explicit import make_explicit
from .extract import factored_norm, factored_svd


@dataclass
class Work:
    """One module while being compressed: its entry, logical tensors by role, and roles stored encoded."""

    entry: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    encoded: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = field(default_factory=dict)

    def shared(self) -> dict[str, str]:
        """Roles read from tensors shared by several modules (``params.shared``): stored once, left as they are."""
        return shared_tensors(self.entry)

    def unshare(self, *roles: str) -> None:
        """``roles`` are now this module's own tensors (a step rewrote them): no longer read from shared ones."""
        params = self.entry.get("params", {})
        left = {r: n for r, n in params.get("shared", {}).items() if r not in roles}
        if "shared" in params:
            self.entry["params"] = {k: v for k, v in params.items() if k != "shared"} | ({"shared": left} if left else {})

    def float_roles(self) -> list[str]:
        """Roles a codec may encode: float tensors of 2+ dims not encoded yet (shared ones and the kind's
        ``exact_roles`` excluded)."""
        exact = get_kind(self.entry["kind"]).exact_roles
        return [r for r, t in sorted(self.tensors.items()) if t.is_floating_point() and t.dim() >= 2
                and r not in self.encoded and r not in self.shared() and r not in exact]

    def stored(self) -> dict[str, torch.Tensor]:
        """The module's own stored tensors by name suffix (shared tensors are stored under their own names)."""
        out = {r: t for r, t in self.tensors.items() if r not in self.encoded and r not in self.shared()}
        for role, (parts, _) in self.encoded.items():
            out.update({f"{role}.{p}": t for p, t in parts.items()})
        return out


# ----- resize -------------------------------------------------------------------------------------------
def resize_rank(s: torch.Tensor, *, rank: int | None = None, energy: float | None = None,
                sv_ratio: float | None = None, sv_fro: float | None = None, sv_cumulative: float | None = None) -> int:
    """The rank kept from descending singular values ``s`` (at least 1, at most ``len(s)``)."""
    s = s.double()
    picks = [s.numel()]
    if rank is not None:
        picks.append(rank)
    if float(s[0]) > 0:
        if sv_ratio is not None:
            picks.append(int((s >= s[0] / sv_ratio).sum()))
        if energy is not None:
            frac = s.square().cumsum(0) / s.square().sum()
            picks.append(int((frac < energy - 1e-12).sum()) + 1)
        if sv_fro is not None:
            frac = (s.square().cumsum(0) / s.square().sum()).sqrt()
            picks.append(int((frac < sv_fro - 1e-12).sum()) + 1)
        if sv_cumulative is not None:
            frac = s.cumsum(0) / s.sum()
            picks.append(int((frac < sv_cumulative - 1e-12).sum()) + 1)
    return max(1, min(picks))


def resize(works: dict[str, Work], *, rank: int | None = None, energy: float | None = None,
           sv_ratio: float | None = None, sv_fro: float | None = None, sv_cumulative: float | None = None) -> None:
    if rank is None and energy is None and sv_ratio is None and sv_fro is None and sv_cumulative is None:
        raise UnsupportedError("resize needs rank, energy, sv_ratio, sv_fro or sv_cumulative")
    thresholds = {"rank": rank, "energy": energy, "sv_ratio": sv_ratio, "sv_fro": sv_fro, "sv_cumulative": sv_cumulative}
    for path, w in works.items():
        if get_kind(w.entry["kind"]).stacked_lowrank:
            _resize_stacked(w, thresholds)
            continue
        if w.entry["kind"] != "lowrank":
            continue
        if not LowRank.plain(w.entry, w.tensors):
            try:
                _plain_lowrank(w)
            except UnsupportedError as e:
                raise UnsupportedError(f"resize of module {path!r}: {e.message}") from None
        a, b = w.tensors["lora_A"], w.tensors["lora_B"]
        r = a.shape[0]
        u, s, vh = factored_svd(b.reshape(b.shape[0], r), a.reshape(r, -1))  # never forms dW
        k = min(r, resize_rank(s[:r], **thresholds))
        root = s[:k].sqrt()
        w.tensors["lora_B"] = (u[:, :k] * root).reshape(b.shape[0], k, *b.shape[2:]).to(b.dtype).contiguous()
        w.tensors["lora_A"] = (root[:, None] * vh[:k]).reshape(k, *a.shape[1:]).to(a.dtype).contiguous()
        w.unshare("lora_A", "lora_B")
        w.encoded.pop("lora_A", None)
        w.encoded.pop("lora_B", None)


def _resize_stacked(w: Work, thresholds: Mapping[str, Any]) -> None:
    """Resize each of the N pairs ``(lora_B[i], lora_A[i])`` of a stacked entry on its own (:func:`resize_rank`),
    zero-padding every pair to the largest rank kept (zero rows and columns add nothing)."""
    a, b = w.tensors["lora_A"], w.tensors["lora_B"]
    n, r = a.shape[:2]
    pairs = []
    for i in range(n):
        u, s, vh = factored_svd(b[i], a[i])
        k = min(r, resize_rank(s[:r], **thresholds))
        root = s[:k].sqrt()
        pairs.append((u[:, :k] * root, root[:, None] * vh[:k]))
    k = max(p[1].shape[0] for p in pairs)
    new_a, new_b = a.new_zeros(n, k, a.shape[2]), b.new_zeros(n, b.shape[1], k)
    for i, (bi, ai) in enumerate(pairs):
        new_a[i, :ai.shape[0]], new_b[i, :, :ai.shape[0]] = ai.to(a.dtype), bi.to(b.dtype)
    w.tensors["lora_A"], w.tensors["lora_B"] = new_a, new_b
    w.unshare("lora_A", "lora_B")
    w.encoded.pop("lora_A", None)
    w.encoded.pop("lora_B", None)


def _plain_lowrank(w: Work) -> None:
    """Turn an entry with a middle factor or an (explicit) base part into ``scale * B @ A`` of rank ``r + r0``
    (the kind's factors, the scale divided back out of B), so resize refactors its complete dW."""
    kind = get_kind("lowrank")
    b, a = kind.factors(w.entry, w.tensors)
    old_a, old_b = w.tensors.get("lora_A"), w.tensors.get("lora_B")
    scale = LowRank.scale(w.entry)
    if scale == 0.0:
        w.entry["params"] = {**w.entry["params"], "scale": 1.0}
        scale = 1.0
    dtype = old_a.dtype if old_a is not None else torch.float32
    k, shape = a.shape[0], function_shape(w.entry)
    w.entry["params"] = {p: v for p, v in w.entry["params"].items() if p != "base_part"}
    for role in ("lora_mid", "init_A", "init_B", "init_mid"):
        w.tensors.pop(role, None)
        w.encoded.pop(role, None)
    w.tensors["lora_A"] = a.reshape(k, *shape[1:]).to(dtype).contiguous()
    tail = old_b.shape[2:] if old_b is not None else (1,) * (len(shape) - 2)
    w.tensors["lora_B"] = (b / scale).reshape(b.shape[0], k, *tail).to(dtype).contiguous()
    w.unshare("lora_A", "lora_B")


# ----- compeft ------------------------------------------------------------------------------------------
SCALE_RULES = {"std": "std", "stc": "mean", "mean": "mean"}
"""compeft ``scale`` options and the ternary rule each stands for (``"mean"`` is the older spelling of ``"stc"``)."""


def compeft_keep(t: torch.Tensor, density: float) -> torch.Tensor:
    """Flat bool mask of what ComPEFT keeps of ``t``: ``topk_values_mask`` of the reference code (every
    magnitude >= the ``(n - int(n * density))``-th smallest, ties included; all when that is 0), less exact
    zeros, whose sign is 0."""
    flat = t.reshape(-1).float()
    n = flat.numel()
    rank = n - int(n * density)
    if rank <= 0:
        return flat != 0
    return (flat.abs() >= flat.abs().kthvalue(rank).values) & (flat != 0)


def _scale_value(flat: torch.Tensor, keep: torch.Tensor, rule: str, factor: float) -> float:
    """One scale over ``flat`` (fp32): ``factor * std`` (``torch.std``, as the reference) or the mean kept magnitude."""
    if rule == "std":
        return float(factor * flat.std()) if flat.numel() > 1 else 0.0
    return float(flat[keep].abs().mean()) if bool(keep.any()) else 0.0


def _keep_and_scale(tensors: list[torch.Tensor], *, density: float, scope: str, rule: str, factor: float,
                    group_size: int | None) -> list[tuple[torch.Tensor, str | float]]:
    """Per tensor: the keep mask and the ``scale`` argument of :func:`ternary_encode`, both taken over all
    ``tensors`` together (``scope="adapter"``) or over each one; with ``group_size``, the rule (per group)."""
    if scope == "adapter":
        flat = torch.cat([t.reshape(-1).float() for t in tensors]) if tensors else torch.zeros(0)
        keep = compeft_keep(flat, density)
        masks = list(keep.split([t.numel() for t in tensors]))
        scales = [_scale_value(flat, keep, rule, factor)] * len(tensors)
    elif scope == "tensor":
        masks = [compeft_keep(t, density) for t in tensors]
        scales = [_scale_value(t.reshape(-1).float(), m, rule, factor) for t, m in zip(tensors, masks, strict=True)]
    else:
        raise UnsupportedError(f"compeft scope must be 'adapter' or 'tensor', got {scope!r}")
    return [(m, rule if group_size else s) for m, s in zip(masks, scales, strict=True)]


def compeft(works: dict[str, Work], *, density: float, scope: str = "adapter", scale: str = "std",
            factor: float = 1.0, group_size: int | None = None, target: str = "params") -> list[str]:
    if not 0 <= density <= 1:
        raise UnsupportedError(f"compeft density must be in [0, 1], got {density}")
    rule = SCALE_RULES.get(scale)
    if rule is None:
        raise UnsupportedError(f"compeft scale must be 'std' (ComPEFT) or 'stc' (alias 'mean'), got {scale!r}")
    stacked = sorted(path for path, w in works.items() if get_kind(w.entry["kind"]).stacked_lowrank)
    if stacked:
        raise UnsupportedError(f"compeft does not apply to module {stacked[0]!r} (kind "
                               f"{works[stacked[0]].entry['kind']}): its experts sit behind a router, and one "
                               "ternary scale over every factor is not ComPEFT's update; use resize or quantize")
    opts = {"density": density, "scope": scope, "rule": rule, "factor": factor, "group_size": group_size}
    if target == "params":
        slots = sorted(((path, r) for path, w in works.items() for r in w.float_roles()),
                       key=lambda pr: f"{pr[0]}.{pr[1]}")  # the order of the reference's sorted state dict
        if not slots:
            return [nothing_encoded(works, "compeft (ternary)")]
        picks = _keep_and_scale([works[p].tensors[r] for p, r in slots], **opts)
        for (path, role), (keep, how) in zip(slots, picks, strict=True):
            w = works[path]
            parts, spec = codecs.encode("ternary", w.tensors[role], keep=keep, scale=how, factor=factor,
                                        group_size=group_size)
            w.encoded[role] = (parts, spec)
            w.tensors[role] = codecs.get_codec("ternary").decode(parts, spec)
        return []
    if target != "delta":
        raise UnsupportedError(f"compeft target must be 'params' or 'delta', got {target!r}")
    deltas = {path: d for path, w in sorted(works.items()) if (d := _additive_delta(w)) is not None}
    picks = _keep_and_scale(list(deltas.values()), **opts)
    for (path, d), (keep, how) in zip(deltas.items(), picks, strict=True):
        w = works[path]
        parts, params = ternary_encode(d, keep, scale=how, factor=factor, group_size=group_size)
        entry = {"kind": "ternary", "shape": list(w.entry["shape"]), "params": params}
        if "parameter" in w.entry:
            entry["parameter"] = w.entry["parameter"]
        works[path] = Work(entry, parts)
    return []


def _additive_delta(w: Work) -> torch.Tensor | None:
    """dW of a module that is exactly ``W + dW`` and has no bias role, else None (left as it is)."""
    kind = get_kind(w.entry["kind"])
    if any(r.startswith("bias") for r in w.tensors) or not kind.is_additive(w.entry, list(w.tensors)):
        return None
    try:
        return kind.delta(w.entry, w.tensors)
    except UnsupportedError:
        return None


# ----- quantize -----------------------------------------------------------------------------------------
def quantize(works: dict[str, Work], *, bits: int | None = None, group_size: int | None = None,
             codec: str | None = None) -> list[str]:
    name = codec or {None: "int8", 8: "int8", 4: "int4"}.get(bits)
    if name not in CODEC_BITS or bits not in (None, CODEC_BITS[name]):
        raise UnsupportedError(f"quantize supports bits=8 or bits=4 (codec int8; int4, nf4 or fp4), got bits={bits}"
                               + (f" with codec {codec!r}" if codec else ""))
    opts = {} if name == "int8" else {"block_size" if name in ("nf4", "fp4") else "group_size": group_size}
    if not any(w.float_roles() for w in works.values()):
        return [nothing_encoded(works, f"quantize ({name})")]
    for w in works.values():
        for role in w.float_roles():
            parts, spec = codecs.encode(name, w.tensors[role], **opts)
            w.encoded[role] = (parts, spec)
            w.tensors[role] = codecs.get_codec(name).decode(parts, spec)
    return []


def nothing_encoded(works: Mapping[str, Work], step: str) -> str:
    """The note of a codec ``step`` that found no tensor it may encode: why each tensor stays as it is."""
    shared = {name for w in works.values() for name in w.shared().values()}
    why: dict[str, int] = {}
    for w in works.values():
        exact = get_kind(w.entry["kind"]).exact_roles
        for role, t in w.tensors.items():
            if role in w.shared():
                continue
            reason = ("already encoded" if role in w.encoded else "kept exact by their kind" if role in exact
                      else "not floating point" if not t.is_floating_point() else "1-D (vectors are not encoded)")
            why[reason] = why.get(reason, 0) + 1
    reasons = ([f"{len(shared)} shared tensor(s) stay plain (params.shared, spec section 5)"] if shared else []) + \
        [f"{n} tensor(s) {reason}" for reason, n in sorted(why.items())]
    return (f"{step} encoded no tensor: {'; '.join(reasons) or 'the adapter has none'}; the output is not smaller "
            "(only the compression record is added)")


CODEC_BITS = {"int8": 8, "int4": 4, "nf4": 4, "fp4": 4}
"""The codecs the ``quantize`` step uses, by bits per value."""
STEP_METHODS: dict[str, Callable[..., list[str] | None]] = {"resize": resize, "compeft": compeft,
                                                            "quantize": quantize}
"""Compression step methods by name; each takes the modules being compressed and its options, and may return
notes (one line each) for the record."""


# ----- errors -------------------------------------------------------------------------------------------
def _plain_factors(entry: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(scale * B, A)`` as 2-D function-layout factors of a plain LoRA entry (dW = B @ A), else None."""
    if entry["kind"] != "lowrank" or set(tensors) != {"lora_A", "lora_B"} or \
            set(entry.get("params", {})) - {"scale", "transposed"}:
        return None
    a, b = tensors["lora_A"], tensors["lora_B"]
    r = a.shape[0]
    return float(entry.get("params", {}).get("scale", 1.0)) * b.double().reshape(b.shape[0], r), a.reshape(r, -1)


def module_error(old_entry: Mapping[str, Any], old: Mapping[str, torch.Tensor], new_entry: Mapping[str, Any],
                 new: Mapping[str, torch.Tensor]) -> float:
    """``||effect' - effect|| / ||effect||`` of one module (:func:`module_effect`); between two plain LoRA
    entries through their stacked factors (:func:`factored_norm`), never forming dW."""
    if get_kind(old_entry["kind"]).stacked_lowrank and new_entry["kind"] == old_entry["kind"]:
        return max(stacked_errors(old, new), default=0.0)
    before, after = _plain_factors(old_entry, old), _plain_factors(new_entry, new)
    if before is None or after is None or before[1].shape[1:] != after[1].shape[1:]:
        return relative_error(module_effect(new_entry, new), module_effect(old_entry, old))
    return _factored_error(*before, *after)


def _factored_error(b0: torch.Tensor, a0: torch.Tensor, b1: torch.Tensor, a1: torch.Tensor) -> float:
    """``||b1 a1 - b0 a0|| / ||b0 a0||`` through stacked factors (:func:`factored_norm`), never forming either."""
    ref = factored_norm(b0.double(), a0.double())
    diff = factored_norm(torch.cat([b1.double(), -b0.double()], 1), torch.cat([a1.double(), a0.double()]))
    return diff / ref if ref > 0 else (0.0 if diff == 0 else math.inf)


def stacked_errors(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> list[float]:
    """The relative dW error of each pair ``lora_B[i] @ lora_A[i]`` of a stacked entry (a mixture's experts, in
    order; each expert's scale cancels out)."""
    return [_factored_error(old["lora_B"][i], old["lora_A"][i], new["lora_B"][i], new["lora_A"][i])
            for i in range(old["lora_A"].shape[0])]


def module_effect(entry: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """What a module's tensors do, flat fp64: dW for additive entries, else the kind's stored effect
    (for DoRA: scale * B @ A and the magnitude; otherwise the floating-point tensors in role order, or all of
    them for a kind with integer roles only, e.g. ``mask``)."""
    kind = get_kind(entry["kind"])
    if kind.is_additive(entry, list(tensors)):
        try:
            return kind.delta(entry, tensors).double().reshape(-1)
        except UnsupportedError:
            pass
    if isinstance(kind, LowRank) and not is_derived(entry):
        return torch.cat([kind.function_delta(entry, tensors).double().reshape(-1),
                          *(tensors[r].double().reshape(-1) for r in ("magnitude", "bias", "bias_value")
                            if r in tensors)])
    floats = [r for r in sorted(tensors) if tensors[r].is_floating_point()]
    return torch.cat([tensors[r].double().reshape(-1) for r in floats or sorted(tensors)])


def relative_error(new: torch.Tensor, old: torch.Tensor) -> float:
    if new.shape != old.shape:
        return math.inf
    ref = float(old.norm())
    diff = float((new - old).norm())
    return diff / ref if ref > 0 else (0.0 if diff == 0 else math.inf)


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * ITEMSIZE[dtype_name(t.dtype)] for t in tensors.values())


# ----- the driver ---------------------------------------------------------------------------------------
_OPTION_TYPES: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "str": str}
"""Python types of step options by annotation (the step functions' annotations are strings)."""


def normalize_steps(steps: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check step dicts (known method, options it takes); returns them with None options dropped."""
    import inspect

    out = []
    for i, step in enumerate(steps):
        step = {k: v for k, v in dict(step).items() if v is not None}
        method = step.pop("method", None)
        fn = STEP_METHODS.get(method)
        if fn is None:
            raise UnsupportedError(f"compress step {i + 1}: unknown method {method!r} "
                                   f"(methods: {', '.join(STEP_METHODS)})")
        takes = set(inspect.signature(fn).parameters) - {"works"}
        unknown = sorted(set(step) - takes)
        if unknown:
            raise UnsupportedError(f"compress step {i + 1} ({method}): unknown option {unknown[0]!r} "
                                   f"(options: {', '.join(sorted(takes))})")
        params = inspect.signature(fn).parameters
        missing = [n for n in sorted(takes) if params[n].default is inspect.Parameter.empty and n not in step]
        if missing:
            raise UnsupportedError(f"compress step {i + 1} ({method}): option {missing[0]!r} is required")
        for name, value in step.items():
            want = _OPTION_TYPES.get(params[name].annotation.split(" |")[0])
            if want is not None and (isinstance(value, bool) or not isinstance(value, want)):
                raise UnsupportedError(f"compress step {i + 1} ({method}): option {name!r} must be "
                                       f"{params[name].annotation.split(' |')[0]}, got {value!r}")
        out.append({"method": method, **step})
    if not out:
        raise UnsupportedError("compress needs at least one step (resize, compeft or quantize)")
    return out


def compress_adapter(adapter: Adapter, *, steps: Sequence[Mapping[str, Any]],
                     base: nn.Module | str | os.PathLike[str] | None = None,
                     inputs: torch.Tensor | None = None) -> Adapter:
    """Run ``steps`` on every module of ``adapter``; returns the compressed adapter (in memory).

    Its manifest's ``compression`` records the steps, tensor bytes before / after and the dW error per
    module; with ``base`` (a live model or a checkpoint folder) also the output divergence on it.
    """
    plan = normalize_steps(steps)
    if base is not None:  # a derived base part is computed on it (else resize refuses it; quantize works as stored)
        adapter = make_explicit(adapter, base)
    originals = {path: adapter.module_tensors(path) for path in sorted(adapter.modules)}
    for path, entry in sorted(adapter.modules.items()):  # module_effect forms these modules' dW in fp64
        kind = get_kind(entry["kind"])
        if isinstance(kind, LowRank) or kind.is_additive(entry, list(originals[path])):
            check_dense(entry["shape"], f"module {path!r}", itemsize=8, path=adapter.source)
    works = {path: Work({k: v for k, v in entry.items() if k != "encoding"}, dict(originals[path]))
             for path, entry in sorted(adapter.modules.items())}
    notes: list[str] = []
    for step in plan:
        opts = {k: v for k, v in step.items() if k != "method"}
        notes += STEP_METHODS[step["method"]](works, **opts) or []
    manifest = copy_manifest(adapter.manifest)
    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, float | None] = {}
    pair_errors: dict[str, list[float | None]] = {}
    for path, w in works.items():
        entry = dict(w.entry)
        if w.encoded:
            entry["encoding"] = {role: spec for role, (_, spec) in sorted(w.encoded.items())}
        manifest["modules"][path] = entry
        tensors.update({f"{path}.{name}": t for name, t in w.stored().items()})
        tensors.update({name: adapter.tensor(name) for name in w.shared().values()})
        errors[path] = _finite(module_error(adapter.modules[path], originals[path], entry, w.tensors))
        if get_kind(entry["kind"]).stacked_lowrank:
            pair_errors[path] = [_finite(e) for e in stacked_errors(originals[path], w.tensors)]
    before = adapter.nbytes()
    after = tensor_bytes(tensors)
    finite = [e for e in errors.values() if e is not None]
    record: dict[str, Any] = {
        "steps": plan,
        "source_tensor_bytes": before,
        "tensor_bytes": after,
        "tensor_ratio": round(before / after, 4) if after else None,
        "dW_rel_error_max": max(finite, default=0.0) if len(finite) == len(errors) else None,
        "dW_rel_error_mean": sum(finite) / len(finite) if finite else 0.0,
        "module_errors": errors,
        **({"expert_errors": pair_errors} if pair_errors else {}),
        **({"notes": notes} if notes else {}),
    }
    manifest["compression"] = record
    manifest.setdefault("provenance", []).append({"tool": "adapterfmt compress", "steps": plan})
    out = Adapter(manifest, tensors)
    if base is not None:
        record["output"] = output_divergence(base, adapter, out, inputs=inputs)
    return out


# ----- output divergence on a base model ----------------------------------------------------------------
def load_live_model(path: str | os.PathLike[str]) -> nn.Module:
    """A live model from a checkpoint folder: the tiny model (``adapter demo``'s) or a transformers causal LM
    built from its ``config.json`` with the folder's safetensors weights."""
    from ..format.fingerprint import checkpoint_files
    from ..format.safetensors_io import read_header, read_tensor

    folder = Path(path)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FormatError("--base must be a model folder with config.json and safetensors weights", path=folder)
    cfg = read_json_object(cfg_path)
    if cfg.get("model_type") == "adapterfmt-tiny":
        from ..tiny import TinyConfig, TinyLM

        model: nn.Module = TinyLM(TinyConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    else:
        try:
            from transformers import AutoConfig, AutoModelForCausalLM
        except ImportError:
            raise UnsupportedError("a transformers base model needs the 'transformers' extra") from None
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    state = {}
    for f in checkpoint_files(folder):
        h = read_header(f)
        state.update({n: read_tensor(h, n) for n in h.tensors})
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n in missing if n.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise FormatError(f"checkpoint does not fit its config: {len(missing)} missing, {len(unexpected)} "
                          "unexpected tensors", path=folder)
    return model.eval()


def _default_inputs(model: nn.Module) -> torch.Tensor:
    emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if emb is None:
        raise UnsupportedError("cannot guess inputs for this model (no embedding); pass inputs=")
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, emb.num_embeddings, (4, 32), generator=gen)


def _run(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    out = model(inputs)
    out = getattr(out, "logits", out)
    return (out[0] if isinstance(out, tuple) else out).double()


def output_divergence(base: nn.Module | str | os.PathLike[str], original: Adapter, compressed: Adapter, *,
                      inputs: torch.Tensor | None = None) -> dict[str, float]:
    """How far the compressed adapter moves the model's outputs from the original's, on ``inputs``
    (default: 4 x 32 random token ids): ``rel_error`` = ||y_c - y_o|| / ||y_o - y_base||, ``max_abs``, and
    for token logits the mean KL(p_o || p_c) and the top-1 agreement."""
    from .apply import attach, detach

    model = base if isinstance(base, nn.Module) else load_live_model(base)
    x = _default_inputs(model) if inputs is None else inputs
    with torch.no_grad():
        y0 = _run(model, x)
        outs = []
        for i, a in enumerate((original, compressed)):
            name = attach(model, a, name=f"__compress_{i}")
            try:
                outs.append(_run(model, x))
            finally:
                detach(model, name)
    yo, yc = outs
    report = {"rel_error": _finite(_ratio(yc - yo, yo - y0)),
              "max_abs": float((yc - yo).abs().max()) if yo.numel() else 0.0}
    if yo.dim() == 3 and yo.shape == yc.shape:
        lo, lc = yo.log_softmax(-1), yc.log_softmax(-1)
        report["kl"] = float((lo.exp() * (lo - lc)).sum(-1).mean())
        report["top1_agreement"] = float((yo.argmax(-1) == yc.argmax(-1)).double().mean())
    return report


def _finite(x: float) -> float | None:
    """JSON has no infinity: an unbounded error is recorded as null."""
    return x if math.isfinite(x) else None


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    d = float(den.norm())
    n = float(num.norm())
    return n / d if d > 0 else (0.0 if n == 0 else math.inf)


# ----- the demo step ------------------------------------------------------------------------------------
