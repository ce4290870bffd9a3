"""Extract a patch from a full fine-tune: ``finetuned - base``, streamed tensor by tensor from safetensors.

Three stored forms:

- ``lowrank``: a truncated SVD of each module's difference (randomized for large matrices), at a fixed
  rank or at the smallest rank whose singular values hold a given fraction of the difference's energy;
  1-D parameters (norms) are stored dense. Method ``lora`` (``scale`` 1, sqrt(S) split over A and B).
- ``sparse``: the ``k`` largest-magnitude entries of each difference (method ``sparse_ft``).
- ``dense``: the whole difference (method ``task_vector``; the PortLLM model patch).

Only one base and one fine-tuned tensor are read at a time; their difference is taken in fp32 (exact
when the two values are within a factor of two of each other, as fine-tuning changes are). Modules
whose difference is exactly zero are left out (none differing is an error). A lowrank module whose factors
would hold at least as many values as the difference is stored dense (exact; ``stored_dense`` says which).
For every module the report gives ``captured``: the
fraction of the difference's squared Frobenius norm the stored form reproduces,
``1 - ||D - D_stored||^2 / ||D||^2``, measured on the tensors as written (after the cast to the stored dtype).

Layout: a checkpoint does not say which layers store their weight ``[in, out]`` (``nn.Embedding``,
GPT-2's ``Conv1D``). Give ``model=`` (a live module of the architecture, weights irrelevant) to read it
exactly; otherwise embeddings are recognised by name and ``Conv1D`` by ``config.json``'s ``model_type``.
The layout only matters for attaching a lowrank patch unmerged; the stored dW is right either way.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..deltas import lowrank_entry
from ..deltas.modules import is_transposed
from ..errors import BaseMismatchError, FormatError, UnsupportedError, first_few
from ..format.adapter import Adapter
from ..format.fingerprint import fingerprint_checkpoint, read_checkpoint_headers
from ..format.manifest import new_manifest
from ..format.safetensors_io import DTYPES, Header, read_tensor

Form = Literal["lowrank", "sparse", "dense"]
FORM_METHODS: dict[str, str] = {"lowrank": "lora", "sparse": "sparse_ft", "dense": "task_vector"}
BIAS_ROLES = {"lowrank": "bias", "dense": "bias_delta"}
"""Where a changed bias goes beside its module's weight (a sparse entry has no bias role)."""
RANDOMIZED_MIN_DIM = 1024
"""Matrices whose smaller side is at least this use a randomized SVD (``torch.svd_lowrank``)."""
OVERSAMPLE = 8
EMBEDDING_LEAVES = ("embed_tokens", "embeddings", "word_embeddings", "position_embeddings",
                    "token_type_embeddings", "wte", "wpe", "shared", "embed_positions")
CONV1D_MODEL_TYPES = {"gpt2": ("c_attn", "c_proj", "c_fc", "q_attn")}


@dataclass
class ModuleReport:
    """What extraction stored for one module."""

    module: str
    kind: str
    rank: int | None
    stored: int
    """Number of stored values (factors, kept entries or the full tensor)."""
    numel: int
    captured: float
    rel_error: float


@dataclass
class ExtractReport:
    form: str
    modules: list[ModuleReport] = field(default_factory=list)
    unchanged: int = 0
    """Parameters whose difference is exactly zero (left out)."""
    unplaced: list[str] = field(default_factory=list)
    """Changed parameters no entry could hold (a third parameter of a module); their change is lost."""
    stored_dense: list[str] = field(default_factory=list)
    """Modules whose lowrank factors at the chosen rank would hold at least as many values as the difference
    itself: stored dense instead (exact, and smaller), each with the rank and the counts."""

    def as_dict(self) -> dict[str, Any]:
        return {"form": self.form, "unchanged": self.unchanged, "unplaced": self.unplaced,
                "stored_dense": self.stored_dense, "modules": [vars(m) for m in self.modules]}


# ----- reading two checkpoints side by side -----------------------------------------------------------
def _index(headers: list[Header]) -> dict[str, Header]:
    return {name: h for h in headers for name in h.tensors}


def _pair_checkpoints(base: dict[str, Header], tuned: dict[str, Header]) -> list[str]:
    """Names present in both with equal shapes; refuses checkpoints of different architectures."""
    problems = [f"{n}: only in the fine-tuned checkpoint" for n in sorted(set(tuned) - set(base))]
    problems += [f"{n}: only in the base checkpoint" for n in sorted(set(base) - set(tuned))]
    for n in sorted(set(base) & set(tuned)):
        bs, ts = base[n].tensors[n].shape, tuned[n].tensors[n].shape
        if bs != ts:
            problems.append(f"{n}: base {list(bs)}, fine-tuned {list(ts)}")
    if problems:
        raise BaseMismatchError(f"the fine-tuned checkpoint does not have the base's architecture "
                                f"({len(problems)} tensor(s) differ): {first_few(problems)}")
    return sorted(base)


def _transposed_rule(base: Path, model: nn.Module | None) -> Callable[[str], bool]:
    if model is not None:
        return lambda mod: is_transposed(model.get_submodule(mod)) if mod else False
    conv1d: tuple[str, ...] = ()
    cfg = (base if base.is_dir() else base.parent) / "config.json"
    if cfg.is_file():
        try:
            conv1d = CONV1D_MODEL_TYPES.get(json.loads(cfg.read_text("utf-8")).get("model_type"), ())
        except (ValueError, AttributeError):
            conv1d = ()
    return lambda mod: mod.rsplit(".", 1)[-1] in (*EMBEDDING_LEAVES, *conv1d)


def _modules(names: Iterable[str]) -> dict[str, list[str]]:
    """Parameter names grouped by module path (``a.b.weight`` -> ``a.b``), in name order."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(n.rsplit(".", 1)[0] if "." in n else "", []).append(n)
    return groups


# ----- the three forms --------------------------------------------------------------------------------
def choose_rank(s: torch.Tensor, *, rank: int | None, energy: float | None, max_rank: int | None) -> int:
    """The rank kept from singular values ``s`` (descending): ``rank``, or the smallest holding ``energy``."""
    if rank is not None:
        k = rank
    else:
        e = (s.double() ** 2).cumsum(0)
        total = float(e[-1]) if e.numel() else 0.0
        k = int(torch.searchsorted(e, torch.tensor([energy * total], dtype=e.dtype)).item()) + 1
    k = min(k, max_rank or k, s.numel())
    return max(k, 1)


def truncated_svd(d: torch.Tensor, *, rank: int | None, energy: float | None,
                  max_rank: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U[:, :k], S[:k], V[:, :k]`` of a 2-D ``d`` at the chosen rank ``k``.

    Small matrices use the exact SVD in fp64. Large ones (smaller side >= RANDOMIZED_MIN_DIM) use a randomized
    SVD; with an energy threshold its rank is doubled until the captured energy reaches the threshold
    (the total energy is known exactly from the Frobenius norm).
    """
    if min(d.shape) < RANDOMIZED_MIN_DIM:
        u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
        k = choose_rank(s, rank=rank, energy=energy, max_rank=max_rank)
        return u[:, :k], s[:k], vh[:k].T
    d = d.float()
    cap = min(max_rank or min(d.shape), min(d.shape))
    q = min((rank or 16) + OVERSAMPLE, cap)
    total = float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        while True:
            u, s, v = torch.svd_lowrank(d, q=q, niter=4)
            if rank is not None or q >= cap or float((s.double() ** 2).sum()) >= energy * total:
                break
            q = min(2 * q, cap)
    if rank is None:  # pick k against the exact total, not the sum of the q values found
        e = (s.double() ** 2).cumsum(0)
        k = int(torch.searchsorted(e, torch.tensor([energy * total], dtype=e.dtype)).item()) + 1
        k = max(1, min(k, s.numel(), max_rank or k))
    else:
        k = min(rank, s.numel())
    return u[:, :k], s[:k], v[:, :k]


def factored_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, S, Vh`` of ``b @ a`` (``b`` [m, r], ``a`` [r, n]) in fp64, without forming the product when ``r`` is
    below both ``m`` and ``n``: with ``b = Qb Rb`` and ``a^T = Qa Ra``, ``b @ a = Qb (Rb Ra^T) Qa^T``, so the SVD
    of the r x r core gives the product's singular triplets exactly (its other singular values are 0).
    O((m + n) r^2) instead of the dense SVD's O(m n min(m, n))."""
    b64, a64 = b.double(), a.double()
    if b.shape[1] >= min(b.shape[0], a.shape[1]):
        return torch.linalg.svd(b64 @ a64, full_matrices=False)
    qb, rb = torch.linalg.qr(b64)
    qa, ra = torch.linalg.qr(a64.T)
    uu, s, vvh = torch.linalg.svd(rb @ ra.T)
    return qb @ uu, s, vvh @ qa.T


def factored_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """``||b @ a||_F`` (fp64) without forming the product: the norm of the small core ``Rb Ra^T`` (see
    :func:`factored_svd`), which keeps the cancellation of a difference written as stacked factors exact."""
    b64, a64 = b.double(), a.double()
    if b.shape[1] >= min(b.shape[0], a.shape[1]):
        return float(torch.linalg.matrix_norm(b64 @ a64))
    return float(torch.linalg.matrix_norm(torch.linalg.qr(b64)[1] @ torch.linalg.qr(a64.T)[1].T))


def _lowrank(d: torch.Tensor, transposed: bool, dtype: torch.dtype, opts: dict[str, Any]) -> tuple[dict, dict]:
    f = d.T if transposed else d  # function layout [out, in]
    u, s, v = truncated_svd(f.reshape(f.shape[0], -1), rank=opts["rank"], energy=opts["energy"],
                            max_rank=opts["max_rank"])
    root = s.sqrt()
    b = (u * root).to(dtype).contiguous()
    a = (root[:, None] * v.T).reshape(s.numel(), *f.shape[1:]).to(dtype).contiguous()
    entry = lowrank_entry(list(d.shape), 1.0, transposed=transposed)
    return entry, {"lora_A": a, "lora_B": b}


def _sparse(d: torch.Tensor, dtype: torch.dtype, opts: dict[str, Any]) -> tuple[dict, dict]:
    flat = d.reshape(-1)
    k = opts["top_k"] if opts["top_k"] is not None else math.ceil(opts["density"] * flat.numel())
    k = max(1, min(k, flat.numel()))
    idx = flat.abs().topk(k, sorted=False).indices.sort().values
    entry = {"kind": "sparse", "shape": list(d.shape), "params": {"scale": 1.0}}
    return entry, {"indices": idx.to(torch.int64), "values": flat[idx].to(dtype)}


def _dense(d: torch.Tensor, dtype: torch.dtype) -> tuple[dict, dict]:
    return {"kind": "dense", "shape": list(d.shape), "params": {"mode": "add"}}, {"delta": d.to(dtype)}


def _stored_delta(entry: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    from ..plugin.registry import get_kind

    return get_kind(entry["kind"]).delta(entry, tensors).float()


def _sq(t: torch.Tensor) -> float:
    """Squared Frobenius norm, accumulated in fp64."""
    return float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2


# ----- the driver -------------------------------------------------------------------------------------
def extract_adapter(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    *,
    form: Form = "lowrank",
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
    density: float | None = None,
    top_k: int | None = None,
    dtype: str | None = None,
    model: nn.Module | None = None,
    base_name: str | None = None,
    progress: Callable[[Iterable[str], int], Iterator[str]] | None = None,
) -> tuple[Adapter, ExtractReport]:
    """The patch ``finetuned - base`` of two safetensors checkpoints (files or folders), and its report.

    ``lowrank`` needs ``rank`` or ``energy`` (a fraction in (0, 1]); ``sparse`` needs ``density`` (fraction of
    each tensor's entries kept) or ``top_k`` (entries kept per tensor). ``dtype`` (``"F32"``, ``"BF16"`` ...)
    sets the stored dtype; by default each module keeps its checkpoint's dtype. ``progress`` wraps the
    iteration over modules (``progress(names, total)``).
    """
    if form not in FORM_METHODS:
        raise FormatError(f"unknown extract form {form!r} (choose lowrank, sparse or dense)")
    if form == "lowrank" and (rank is None) == (energy is None):
        raise FormatError("lowrank extraction needs exactly one of rank or energy")
    if form == "lowrank" and energy is not None and not 0 < energy <= 1:
        raise FormatError(f"energy must be in (0, 1], got {energy}")
    if form == "sparse" and (density is None) == (top_k is None):
        raise FormatError("sparse extraction needs exactly one of density or top_k")
    if form == "sparse" and density is not None and not 0 < density <= 1:
        raise FormatError(f"density must be in (0, 1], got {density}")
    if dtype is not None and dtype not in DTYPES:
        raise FormatError(f"unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
    base, finetuned = Path(base), Path(finetuned)
    b_idx = _index(read_checkpoint_headers(base))
    t_idx = _index(read_checkpoint_headers(finetuned))
    names = _pair_checkpoints(b_idx, t_idx)
    transposed = _transposed_rule(base, model)
    opts = {"rank": rank, "energy": energy, "max_rank": max_rank, "density": density, "top_k": top_k}
    report = ExtractReport(form)
    modules: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    groups = _modules(names)
    paths: Iterable[str] = progress(groups, len(groups)) if progress else groups
    for path in paths:
        diffs: dict[str, torch.Tensor] = {}
        for n in groups[path]:
            info = b_idx[n].tensors[n]
            if not DTYPES[info.dtype].is_floating_point:
                continue
            d = read_tensor(t_idx[n], n).float() - read_tensor(b_idx[n], n).float()
            if bool(d.any()):
                diffs[n.rsplit(".", 1)[-1]] = d
            else:
                report.unchanged += 1
        if not diffs:
            continue
        if not path:
            raise FormatError(f"top-level tensor {groups[path][0]!r} changed: it has no module to patch")
        main = "weight" if "weight" in diffs else sorted(diffs)[0]
        pname = f"{path}.{main}"
        store = DTYPES[dtype or b_idx[pname].tensors[pname].dtype]
        d = diffs.pop(main)
        if form == "lowrank" and d.dim() >= 2:
            entry, t = _lowrank(d, transposed(path), store, opts)
            if (n := sum(v.numel() for v in t.values())) >= d.numel():
                report.stored_dense.append(f"{path} (rank {t['lora_A'].shape[0]}: {n:,} values, "
                                           f"dense {d.numel():,})")
                entry, t = _dense(d, store)
        elif form == "sparse":
            entry, t = _sparse(d, store, opts)
        else:
            entry, t = _dense(d, store)
        if main != "weight":
            entry["parameter"] = main
        total = _sq(d)
        err = _sq(d - _stored_delta(entry, t))
        bias_role = BIAS_ROLES.get(entry["kind"]) if main == "weight" else None
        if bias_role and "bias" in diffs:  # lowrank and dense-add entries have scale 1: the role is the change
            bias = diffs.pop("bias")
            t[bias_role] = bias.to(store)
            total += _sq(bias)
            err += _sq(bias - t[bias_role].float())
        report.unplaced += [f"{path}.{p}" for p in sorted(diffs)]
        modules[path] = entry
        tensors.update({f"{path}.{role}": v for role, v in t.items()})
        shapes = {r: tuple(v.shape) for r, v in t.items()}
        report.modules.append(ModuleReport(
            path, entry["kind"], shapes["lora_A"][0] if entry["kind"] == "lowrank" else None,
            sum(v.numel() for v in t.values()), d.numel(),
            1.0 - err / total, math.sqrt(err / total)))
    if not report.modules and not report.unplaced:
        raise UnsupportedError(f"no module differs between {base} and {finetuned}: nothing to extract")
    method = FORM_METHODS[form]
    config: dict[str, Any] = {"form": form}
    if form == "lowrank":
        ranks = {m.module: m.rank for m in report.modules if m.rank is not None}
        config.update({"ranks": ranks, **({"r": max(ranks.values())} if ranks else {}),
                       **{k: v for k, v in (("rank", rank), ("energy", energy), ("max_rank", max_rank))
                          if v is not None}})
    prov = {"tool": "adapterfmt extract", "form": form, "base": str(base), "finetuned": str(finetuned),
            **{k: v for k, v in opts.items() if v is not None},
            "captured": {m.module: round(m.captured, 9) for m in report.modules}}
    if report.unplaced:
        prov["unplaced"] = report.unplaced
    if report.stored_dense:
        prov["stored_dense"] = report.stored_dense
    manifest = new_manifest(method, modules, config=config, provenance=[prov],
                            base={"name": base_name or str(base), "revision": None,
                                  "fingerprint": fingerprint_checkpoint(base)})
    return Adapter(manifest, tensors), report
