"""Merging adapters, defined on each module's true weight delta ``dW`` (never by averaging factors).

For every module any input touches, input ``i`` contributes ``w_i * dW_i`` (``dW_i`` from its delta kind,
fp32, in the stored layout; a module an input lacks contributes zero). Strategies:

- ``linear`` (task arithmetic, any real weights): ``sum_i w_i dW_i``, exact. All-lowrank inputs give a
  lowrank output whose factors are the inputs' stacked (ranks add); otherwise dense (sparse when smaller).
- ``cat``: the same exact sum, and the output must be lowrank (every input lowrank).
- ``svd``: the sum re-factored to ``rank`` (default: the largest input rank) or to the smallest rank
  holding ``energy`` of its squared Frobenius norm. For lowrank inputs it never forms ``dW``: with the
  stacked factors ``B = [w_1 s_1 B_1 ...]``, ``A = [A_1; ...]``, QR gives ``B = Qb Rb`` and
  ``A^T = Qa Ra``; the SVD of the small ``Rb Ra^T`` gives ``dW``'s singular triplets exactly, so the result
  is the best rank-k approximation, and exact once ``rank`` reaches the sum of ranks.
- ``ties``: trim each ``w_i dW_i`` to its ``density`` largest magnitudes, elect each entry's sign (sign of
  the sum, ``sign="total"``, or of the count of signs, ``"frequency"``), average the entries that agree.
- ``dare_linear`` / ``dare_ties`` (``dare`` = ``dare_linear``): drop each entry of ``w_i dW_i`` with
  probability ``1 - density`` and rescale by ``1 / density``, then sum, or elect and average as ties.
  Masks are drawn as ``torch.rand(shape, generator=seeded(module_seed(seed, key, i))) < density``.
- ``magnitude_prune``: trim as ties, then sum.

Element-wise strategies give dense outputs (sparse when smaller); asking a ``rank`` or ``energy`` of any
strategy re-factors its result by SVD into a lowrank output. Bias deltas (LoRA bias, dense
``bias_delta``) are combined by the same strategy. Outputs have ``scale`` 1 (each input's scale, rsLoRA
or not, is folded into ``B``), and a ``lora`` output's config says ``alpha = r`` per module, so the
config and the stored scale agree. Kinds that are not ``W + dW`` (DoRA magnitude, a lowrank
``bias_value`` replacing the module's bias, vector, prompt, dense replace) cannot be summed:
:class:`UnsupportedError` lists their modules.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..deltas import DeltaKind, function_shape, lowrank_entry
from ..errors import BaseMismatchError, FormatError, UnsupportedError, first_few
from ..format.adapter import Adapter
from ..format.fingerprint import compare
from ..format.limits import check_dense
from ..format.manifest import new_manifest
from ..threads import one_thread
from .explicit import require_explicit
from .extract import choose_rank, factored_svd, truncated_svd

STRATEGIES = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
ALIASES = {"dare": "dare_linear", "task_arithmetic": "linear"}
ELEMENTWISE = frozenset({"ties", "dare_linear", "dare_ties", "magnitude_prune"})
SIGN_METHODS = ("total", "frequency")
BIAS_ROLES = {"lowrank": "bias", "dense": "bias_delta"}
"""Roles holding a bias delta (times the entry's scale) in the built-in additive kinds."""
NOT_ADDITIVE_ROLES = frozenset({"magnitude", "bias_value"})
"""Roles that make a ``lowrank`` entry something other than ``W + dW`` (named when a merge refuses it)."""


@dataclass(frozen=True)
class MergeOptions:
    """How to combine: strategy, output rank / energy, density, seed, sign election, stored dtype."""

    strategy: str = "linear"
    rank: int | None = None
    energy: float | None = None
    density: float | None = None
    seed: int = 0
    sign: str = "total"
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        s = ALIASES.get(self.strategy, self.strategy)
        object.__setattr__(self, "strategy", s)
        if s not in STRATEGIES:
            raise FormatError(f"unknown merge strategy {self.strategy!r} (one of {', '.join(STRATEGIES)}, "
                              f"or {', '.join(ALIASES)})")
        if s in ELEMENTWISE and (self.density is None or not 0 < self.density <= 1):
            raise FormatError(f"strategy {s!r} needs a density in (0, 1], got {self.density}")
        if self.rank is not None and self.rank < 1:
            raise FormatError(f"rank must be at least 1, got {self.rank}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise FormatError(f"energy must be in (0, 1], got {self.energy}")
        if s == "cat" and (self.rank is not None or self.energy is not None):
            raise FormatError("cat is exact (ranks add); ask strategy 'svd' for a rank or energy")
        if self.sign not in SIGN_METHODS:
            raise FormatError(f"sign election must be one of {SIGN_METHODS}, got {self.sign!r}")

    @property
    def refactor(self) -> bool:
        return self.strategy == "svd" or self.rank is not None or self.energy is not None


@dataclass
class Term:
    """One input adapter's entry for one module, with its merge weight."""

    index: int
    weight: float
    kind: DeltaKind
    entry: Mapping[str, Any]
    tensors: Mapping[str, torch.Tensor]

    @property
    def additive(self) -> bool:
        return self.kind.is_additive(self.entry, self.tensors)

    @property
    def lowrank(self) -> bool:
        return self.kind.name == "lowrank" and self.additive

    @property
    def transposed(self) -> bool:
        return self.kind.transposed(self.entry) if self.kind.layout_sensitive else False

    def delta(self) -> torch.Tensor:
        """dW (fp32, stored layout), unweighted."""
        return self.kind.delta(self.entry, self.tensors).float()

    def bias(self) -> torch.Tensor | None:
        """The bias delta (fp32), unweighted, or None."""
        role = BIAS_ROLES.get(self.kind.name)
        if role is None or role not in self.tensors:
            return None
        return float(self.entry.get("params", {}).get("scale", 1.0)) * self.tensors[role].float().reshape(-1)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w * B' [out, k], A' [k, n_in])`` in function layout, fp32, with ``w * dW = B' @ A'`` (the kind's
        factors: scale, middle factor and an explicit base part folded in)."""
        b, a = self.kind.factors(self.entry, self.tensors)
        return self.weight * b.float(), a.float()


def module_seed(seed: int, key: str, index: int) -> int:
    """The seed of input ``index``'s dare mask for tensor ``key`` (a module path, ``<path>.bias`` for biases)."""
    return (seed * 1_000_003 + zlib.crc32(key.encode()) * 101 + index) % (2**63)


def collect_terms(adapters: Sequence[Adapter], weights: Sequence[float]) -> dict[str, list[Term]]:
    """Every module any adapter touches, with each adapter's term (in adapter order); checks the entries agree
    on target shape, parameter and layout."""
    from ..plugin.registry import get_kind

    terms: dict[str, list[Term]] = {}
    for i, (ad, w) in enumerate(zip(adapters, weights, strict=True)):
        for module, entry in sorted(ad.modules.items()):
            kind = get_kind(entry["kind"], path=ad.source)
            terms.setdefault(module, []).append(Term(i, float(w), kind, entry, ad.module_tensors(module)))
    problems = []
    for module, ts in terms.items():
        first = ts[0].entry
        for t in ts[1:]:
            if list(t.entry["shape"]) != list(first["shape"]) or \
                    t.entry.get("parameter", "weight") != first.get("parameter", "weight"):
                problems.append(f"{module}: {first.get('parameter', 'weight')} {list(first['shape'])} in input "
                                f"{ts[0].index + 1}, {t.entry.get('parameter', 'weight')} {list(t.entry['shape'])} "
                                f"in input {t.index + 1}")
        flags = {t.transposed for t in ts if t.kind.layout_sensitive}
        if len(flags) > 1:
            problems.append(f"{module}: inputs disagree on params.transposed")
    if problems:
        raise FormatError(f"inputs do not target the same parameters ({len(problems)} module(s)): "
                          + first_few(problems))
    return terms


# ----- element-wise strategies (on stacked dense deltas) ---------------------------------------------------
def _trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` largest magnitudes of ``t``, zero the rest."""
    k = int(density * t.numel())
    if k >= t.numel():
        return t
    flat = t.reshape(-1)
    out = torch.zeros_like(flat)
    if k > 0:
        idx = flat.abs().topk(k).indices
        out[idx] = flat[idx]
    return out.reshape(t.shape)


def combine(deltas: Sequence[torch.Tensor], weights: Sequence[float], opts: MergeOptions, key: str) -> torch.Tensor:
    """Combine same-shaped deltas by ``opts.strategy`` (``linear`` / ``cat`` / ``svd`` sum them)."""
    s = opts.strategy
    stack = torch.stack([w * d.float() for w, d in zip(weights, deltas, strict=True)])
    if s in ("ties", "magnitude_prune"):
        stack = torch.stack([_trim(t, opts.density) for t in stack])
    elif s in ("dare_linear", "dare_ties") and opts.density < 1:
        for i, t in enumerate(stack):
            gen = torch.Generator().manual_seed(module_seed(opts.seed, key, i))
            t.mul_((torch.rand(t.shape, generator=gen) < opts.density) / opts.density)
    if s not in ("ties", "dare_ties"):
        return stack.sum(0)
    votes = stack.sum(0) if opts.sign == "total" else stack.sign().sum(0)
    agree = stack.sign() == torch.where(votes >= 0, 1.0, -1.0)
    return (stack * agree).sum(0) / agree.sum(0).clamp(min=1)


# ----- factor algebra -----------------------------------------------------------------------------------
EXACT_ENOUGH = 1e-6
"""An element-wise merge of lowrank inputs is stored lowrank at the sum of their ranks when that loses at most
this relative error of dW (||dW' - dW|| / ||dW||, about fp32 rounding); otherwise dense, and said so."""


def kept(s: torch.Tensor, k: int, total_sq: float | None = None) -> dict[str, float]:
    """What keeping the first ``k`` of singular values ``s`` keeps of the matrix: ``energy`` (the fraction of its
    squared Frobenius norm, ``total_sq``, default ``sum s^2``) and ``rel_error`` = ``||dW' - dW|| / ||dW||``."""
    sq = s.double().square()
    total = float(sq.sum()) if total_sq is None else total_sq
    lost = float(sq[k:].sum()) if total_sq is None else max(total - float(sq[:k].sum()), 0.0)
    return {"energy": 1.0 - lost / total if total else 1.0, "rel_error": math.sqrt(lost / total) if total else 0.0}


def refactor(b: torch.Tensor, a: torch.Tensor, *, rank: int | None, energy: float | None,
             info: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B', A')`` with ``B' A'`` the best rank-k approximation of ``b @ a`` (k = ``rank``, or the smallest
    rank holding ``energy``, capped by ``rank`` when both are given), without forming ``b @ a`` when the
    inner rank is below both outer sizes (:func:`factored_svd`). Singular values are split evenly:
    ``B' = U sqrt(S)``. ``info`` receives the rank kept, :func:`kept`'s figures and ``capped_from`` (a
    ``rank`` above the ``b @ a``'s rank, ``b``'s columns at most)."""
    with one_thread():
        u, s, vh = factored_svd(b, a)
        k = choose_rank(s, rank=None if energy is not None else rank, energy=energy, max_rank=rank)
    if info is not None:
        info.update({"rank": k, **kept(s, k)})
        if rank is not None and energy is None and rank > s.numel():
            info["capped_from"] = rank
    root = s[:k].sqrt()
    return (u[:, :k] * root).float(), (root[:, None] * vh[:k]).float()


def _function_2d(d: torch.Tensor, transposed: bool) -> torch.Tensor:
    f = d.T if transposed else d
    return f.reshape(f.shape[0], -1)


def _dense_refactor(f: torch.Tensor, *, rank: int | None, energy: float | None, info: dict[str, Any]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B', A')`` of the best rank-k approximation of a dense 2-D ``f`` (:func:`truncated_svd`); ``info`` as
    :func:`refactor`'s, measured against ``f``'s exact norm."""
    u, s, v = truncated_svd(f.double(), rank=None if energy is not None else rank, energy=energy, max_rank=rank)
    info.update({"rank": s.numel(), **kept(s, s.numel(), float(f.double().square().sum()))})
    if rank is not None and energy is None and rank > min(f.shape):
        info["capped_from"] = rank
    root = s.sqrt()
    return (u * root).float(), (root[:, None] * v.T).float()


# ----- one module -----------------------------------------------------------------------------------------
def merge_module(module: str, terms: Sequence[Term], opts: MergeOptions, info: dict[str, Any] | None = None
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The merged entry and tensors (by role) of one module from its additive terms. ``info``, when given,
    receives what was stored: ``form`` (the kind), ``rank``, ``rank_in`` (the sum of the input ranks, when all
    are lowrank), and for a re-factored result ``energy`` / ``rel_error`` (what the rank kept of the combined
    dW) and ``capped_from`` (a rank asked above what the combined dW has)."""
    info = {} if info is None else info
    first = terms[0].entry
    shape, param = list(first["shape"]), first.get("parameter", "weight")
    transposed = any(t.transposed for t in terms)
    dtype = opts.dtype or _widest(terms)
    weights = [t.weight for t in terms]
    biases = [t.bias() for t in terms]
    bias = None
    if any(b is not None for b in biases):
        n = next(b for b in biases if b is not None).numel()
        bias = combine([torch.zeros(n) if b is None else b for b in biases], weights, opts, f"{module}.bias")
    fshape = function_shape(lowrank_entry(shape, 1.0, transposed=transposed))
    lowrank_in = all(t.lowrank for t in terms)
    if opts.strategy == "cat" and not lowrank_in:
        raise UnsupportedError(f"{module} (inputs of kind "
                               f"{', '.join(sorted({t.kind.name for t in terms if not t.lowrank}))})")
    pairs = [t.factors() for t in terms] if lowrank_in else []
    if lowrank_in:
        info["rank_in"] = sum(p[1].shape[0] for p in pairs)
    if lowrank_in and opts.strategy in ("linear", "cat", "svd"):
        b, a = torch.cat([p[0] for p in pairs], 1), torch.cat([p[1] for p in pairs], 0)
        if opts.refactor:
            rank = opts.rank if opts.rank is not None or opts.energy is not None else max(p[1].shape[0] for p in pairs)
            b, a = refactor(b, a, rank=rank, energy=opts.energy, info=info)
        info.update(form="lowrank", rank=a.shape[0])
        return _lowrank_out(shape, param, fshape, transposed, b, a, bias, dtype, terms)
    check_dense(shape, f"module {module!r}")
    d = combine([t.delta() for t in terms], weights, opts, module)
    f = _function_2d(d, transposed)
    if opts.refactor:
        rank = opts.rank
        if rank is None and opts.energy is None:
            ranks = [t.tensors["lora_A"].shape[0] for t in terms if t.lowrank]
            if not ranks:
                raise FormatError(f"module {module!r}: svd of non-lowrank inputs needs a rank or an energy")
            rank = max(ranks)
        b, a = _dense_refactor(f, rank=rank, energy=opts.energy, info=info)
        info["form"] = "lowrank"
        return _lowrank_out(shape, param, fshape, transposed, b, a, bias, dtype, terms)
    if lowrank_in and info["rank_in"] * sum(f.shape) < f.numel():  # element-wise: lowrank again when exact enough
        trial: dict[str, Any] = {}
        b, a = _dense_refactor(f, rank=info["rank_in"], energy=None, info=trial)
        if trial["rel_error"] <= EXACT_ENOUGH:
            info.update(trial, form="lowrank")
            return _lowrank_out(shape, param, fshape, transposed, b, a, bias, dtype, terms)
        info["refactor_rel_error"] = trial["rel_error"]
    entry, tensors = _flat_out(shape, param, d, bias, dtype)
    info.update(form=entry["kind"], rank=None)
    return entry, tensors


def _widest(terms: Sequence[Term]) -> torch.dtype:
    dtype = None
    for t in terms:
        for v in t.tensors.values():
            if v.is_floating_point():
                dtype = v.dtype if dtype is None else torch.promote_types(dtype, v.dtype)
    return dtype or torch.float32


def _lowrank_out(shape: list[int], param: str, fshape: tuple[int, ...], transposed: bool, b: torch.Tensor,
                 a: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, terms: Sequence[Term]
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    k = a.shape[0]
    b_dims = max(t.tensors["lora_B"].dim() for t in terms if t.lowrank) if any(t.lowrank for t in terms) else 2
    entry = lowrank_entry(shape, 1.0, transposed=transposed)
    tensors = {"lora_A": a.reshape(k, *fshape[1:]).to(dtype).contiguous(),
               "lora_B": b.reshape(b.shape[0], k, *([1] * (b_dims - 2))).to(dtype).contiguous()}
    if bias is not None:
        tensors["bias"] = bias.to(dtype)
    return _with_param(entry, param), tensors


def _flat_out(shape: list[int], param: str, d: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
              ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Dense, or sparse when that is smaller (and no bias needs a place)."""
    flat = d.reshape(-1)
    idx = flat.nonzero().reshape(-1)
    item = torch.empty((), dtype=dtype).element_size()
    if bias is None and idx.numel() * (8 + item) < flat.numel() * item:
        entry = {"kind": "sparse", "shape": shape, "params": {"scale": 1.0}}
        return _with_param(entry, param), {"indices": idx.to(torch.int64), "values": flat[idx].to(dtype)}
    entry = {"kind": "dense", "shape": shape, "params": {"mode": "add"}}
    tensors = {"delta": d.to(dtype).contiguous()}
    if bias is not None:
        tensors["bias_delta"] = bias.to(dtype)
    return _with_param(entry, param), tensors


def _with_param(entry: dict[str, Any], param: str) -> dict[str, Any]:
    if param != "weight":
        entry["parameter"] = param
    return entry


# ----- whole adapters ---------------------------------------------------------------------------------
def check_bases(adapters: Sequence[Adapter], *, force: bool = False) -> dict[str, Any]:
    """The inputs' common base record; refuses inputs made for different bases unless ``force``."""
    base = next((dict(a.base) for a in adapters if a.base.get("fingerprint")), dict(adapters[0].base))
    for a in adapters:
        verdict = compare(a.base.get("fingerprint"), base.get("fingerprint") or {})
        if verdict in ("different", "new-weights") and not force:
            raise BaseMismatchError(f"inputs were made for different bases ({verdict} fingerprint: "
                                    f"{a.source or a.base.get('name')} vs {base.get('name')}); pass force=True "
                                    "(CLI: --force) to merge anyway", path=a.source)
    return base


def resolve_weights(n: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise FormatError(f"{len(weights)} weight(s) for {n} adapter(s)")
    out = [float(w) for w in weights]
    if not all(math.isfinite(w) for w in out):
        raise FormatError(f"merge weights must be finite numbers, got {', '.join(map(str, out))}")
    return out


def merge_adapters(adapters: Sequence[Adapter], *, weights: Sequence[float] | None = None, strategy: str = "linear",
                   rank: int | None = None, energy: float | None = None, density: float | None = None,
                   seed: int = 0, sign: str = "total", dtype: torch.dtype | str | None = None,
                   force: bool = False, base: Any = None) -> Adapter:
    """One adapter equal to the combination of ``adapters`` by ``strategy`` (see the module docstring).

    An input with a derived lowrank base part (spec 6.2.1) is made explicit on ``base`` (a live model or a
    checkpoint) first; without ``base`` it is refused.

    ``weights`` default to 1 each (the sum: what applying every input does). ``dtype`` (torch dtype or
    ``"F32"``/``"BF16"``...) sets the stored dtype; by default each module keeps its inputs' widest.
    """
    if not adapters:
        raise FormatError("merge needs at least one adapter")
    if isinstance(dtype, str):
        from ..format.safetensors_io import DTYPES

        if dtype not in DTYPES:
            raise FormatError(f"unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
        dtype = DTYPES[dtype]
    opts = MergeOptions(strategy, rank, energy, density, seed, sign, dtype)
    adapters = [require_explicit(a, base, "merge") for a in adapters]
    w = resolve_weights(len(adapters), weights)
    base = check_bases(adapters, force=force)
    terms = collect_terms(adapters, w)
    blocked = sorted(f"{m} ({', '.join([t.kind.name, *sorted(NOT_ADDITIVE_ROLES.intersection(t.tensors))])})"
                     for m, ts in terms.items() for t in ts if not t.additive)
    if blocked:
        hints = sorted({t.kind.merge_hint or "bake them into a base instead"
                        for ts in terms.values() for t in ts if not t.additive})
        raise UnsupportedError(f"cannot merge in delta space: these modules are not W + dW ({'; '.join(hints)}): "
                               f"{', '.join(blocked)}")
    modules: dict[str, dict[str, Any]] = {}
    tensors: dict[str, torch.Tensor] = {}
    not_lowrank = []
    infos: dict[str, dict[str, Any]] = {}
    for module, ts in terms.items():
        try:
            entry, t = merge_module(module, ts, opts, infos.setdefault(module, {}))
        except UnsupportedError as e:
            not_lowrank.append(e.message)
            continue
        modules[module] = entry
        tensors.update({f"{module}.{role}": v for role, v in t.items()})
    if not_lowrank:
        raise UnsupportedError("cat needs every input lowrank (use linear or svd); not lowrank: "
                               + "; ".join(not_lowrank))
    prov = {"tool": "adapterfmt merge", "strategy": opts.strategy, "weights": w,
            "sources": [{"method": a.method, "path": str(a.source) if a.source else None,
                         "sha256": {k: v["sha256"] for k, v in a.manifest.get("files", {}).items()}}
                        for a in adapters],
            **{k: v for k, v in (("rank", rank), ("energy", energy), ("density", density)) if v is not None},
            **({"seed": seed} if opts.strategy.startswith("dare") else {}),
            **({"sign": sign} if opts.strategy.endswith("ties") else {}),
            "modules": {m: {k: _rounded(v) for k, v in i.items()} for m, i in sorted(infos.items())}}
    notes = merge_notes(opts, infos)
    if notes:
        prov["notes"] = notes
    method, config = _method_config(modules, tensors)
    manifest = new_manifest(method, modules, config=config, base=base,
                            provenance=[*_prior_provenance(adapters), prov])
    return Adapter(manifest, tensors)


def _rounded(v: Any) -> Any:
    return round(v, 9) if isinstance(v, float) else v


def merge_notes(opts: MergeOptions, infos: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line for each thing a merge did that its options did not say: a lossy re-factoring (the worst
    module's captured energy and error), a rank capped at what the combined dW has, an element-wise merge of
    lowrank inputs stored dense (and what re-factoring it to the sum of input ranks would lose) or re-factored
    exactly to that rank."""
    notes = []
    lossy = {m: i for m, i in infos.items() if i.get("rel_error", 0.0) > EXACT_ENOUGH}
    if lossy:
        worst = max(lossy, key=lambda m: lossy[m]["rel_error"])
        notes.append(f"lossy: {len(lossy)} of {len(infos)} module(s) re-factored below their rank; worst {worst} "
                     f"(rank {lossy[worst]['rank']} of {lossy[worst].get('rank_in', '?')}) keeps "
                     f"{lossy[worst]['energy']:.6f} of its energy, relative error {lossy[worst]['rel_error']:.3e}")
    capped = {m: i for m, i in infos.items() if "capped_from" in i}
    if capped:
        m, i = next(iter(sorted(capped.items())))
        notes.append(f"--rank {i['capped_from']} is above what the merged dW has in {len(capped)} module(s) "
                     f"(e.g. {m}: rank {i['rank']}, the sum of the input ranks); stored at that rank, exactly")
    if opts.strategy in ELEMENTWISE and opts.rank is None and opts.energy is None:
        dense = {m: i for m, i in infos.items() if i.get("rank_in") and i["form"] != "lowrank"}
        exact = [m for m, i in infos.items() if i.get("rank_in") and i["form"] == "lowrank"]
        if dense:
            loss = max((i["refactor_rel_error"] for i in dense.values() if "refactor_rel_error" in i), default=None)
            notes.append(f"{opts.strategy} of lowrank inputs is not lowrank: {len(dense)} module(s) stored "
                         f"{'/'.join(sorted({i['form'] for i in dense.values()}))}"
                         + (f" (the sum of the input ranks would lose up to {loss:.3e} of dW)" if loss is not None
                            else "") + "; --rank or --energy re-factors them")
        if exact:
            notes.append(f"{len(exact)} module(s) re-factored to the sum of the input ranks, within "
                         f"{EXACT_ENOUGH:g} of dW")
    return notes


def _method_config(modules: Mapping[str, Mapping[str, Any]], tensors: Mapping[str, torch.Tensor]
                   ) -> tuple[str, dict[str, Any]]:
    kinds = {e["kind"] for e in modules.values()}
    if kinds == {"lowrank"}:
        ranks = {m: tensors[f"{m}.lora_A"].shape[0] for m in modules}
        r = max(ranks.values())
        odd = {m: k for m, k in sorted(ranks.items()) if k != r}
        return "lora", {"r": r, "alpha": r, "use_rslora": False, "rank_pattern": odd, "alpha_pattern": odd}
    if kinds == {"sparse"}:
        return "sparse_ft", {}
    return "task_vector", {}


def _prior_provenance(adapters: Sequence[Adapter]) -> list[dict[str, Any]]:
    return [{"input": i + 1, **p} for i, a in enumerate(adapters) for p in a.manifest.get("provenance", ())]


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact||_F / ||exact||_F`` (0 when both are zero)."""
    den = float(exact.double().norm())
    num = float((approx.double() - exact.double()).norm())
    return num / den if den else num


__all__ = ["STRATEGIES", "MergeOptions", "Term", "collect_terms", "combine", "refactor", "merge_module",
           "merge_notes", "merge_adapters", "module_seed", "relative_error", "check_bases", "resolve_weights"]
