"""A ``lowrank`` entry's base-derived part (spec 6.2.1): the recipes a reader recomputes from the base weight,
and the initial factors of the SVD-structured methods that share them.

Every function works on a **function-layout 2-D weight** ``W [out, n_in]`` (a conv weight flattened). The
recipes return factors ``(B0 [out, r0], mid0 ([r0], [r0, r0] or None), A0 [r0, n_in])`` in float64 whose
product ``B0 M0 A0`` is the part the spec defines:

- ``svd_top`` / ``svd_bottom``: the ``r0`` largest / smallest singular triplets (only the product is defined);
- ``qr``: the projection of ``W`` on the span of its first ``r0`` columns, ``Q_r0 R_r0`` (only the product);
- ``ldu``: ``W[:, :r0] K^-1 W[rows, :]`` with ``K = W[rows, :r0] = L11 U11`` (unique factors, LoLDU's);
- ``nystrom``: ``W[:, :r0] W[:r0, :r0] W[:r0, :]`` (unique factors, NLoRA's initialisation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedError

if TYPE_CHECKING:
    import torch

RECIPES = ("svd_top", "svd_bottom", "qr", "ldu", "nystrom")
"""Derived base parts (``params.base_part.recipe``)."""
FACTOR_RECIPES = frozenset({"ldu", "nystrom"})
"""Recipes whose factors are unique, so they may stand in for ``lora_A`` / ``lora_B``."""
SPECTRAL = frozenset({"svd_top", "svd_bottom"})
GAP_WRITE = 1e-4
"""A writer uses a spectral recipe only when the relative gap at the cut is at least this."""
GAP_READ = 5e-5
"""A reader refuses a spectral recipe whose recomputed relative gap is below this."""
PIVOT_READ = 1e-10
"""qr / ldu: refused when a pivot is at most this times ``max |W|`` (dependent columns, singular core)."""


def base_part(entry: Mapping[str, Any]) -> dict[str, Any] | None:
    """``params.base_part`` of a module entry, or None."""
    return entry.get("params", {}).get("base_part")


def is_derived(entry: Mapping[str, Any]) -> bool:
    """True when the entry's base part is a recipe the reader computes from the base (derived form)."""
    part = base_part(entry)
    return part is not None and "recipe" in part


def spectral_gap(w: torch.Tensor, recipe: str, rank: int) -> float:
    """``(s_j - s_{j+1}) / s_1`` at the cut of a spectral recipe (``j = rank`` for svd_top, ``k - rank`` for
    svd_bottom; ``s_{k+1} = 0``), in float64."""
    import torch

    s = torch.linalg.svdvals(w.to(torch.float64))
    k = s.numel()
    cut = rank if recipe == "svd_top" else k - rank
    below = s[cut].item() if cut < k else 0.0
    return (s[cut - 1].item() - below) / s[0].item() if s[0] > 0 else 0.0


def recipe_writable(w: torch.Tensor, recipe: str, rank: int) -> bool:
    """Whether a writer may store ``recipe`` for ``w`` (spec 6.2.1): always, except a spectral recipe whose
    relative gap at the cut is below :data:`GAP_WRITE` (then it stores the explicit form)."""
    return recipe not in SPECTRAL or spectral_gap(w, recipe, rank) >= GAP_WRITE


def _lu_nopivot(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Doolittle LU of a square matrix without pivoting: ``k = L U``, ``L`` unit lower triangular."""
    import torch

    n = k.shape[0]
    lo, up = torch.eye(n, dtype=k.dtype), k.clone()
    for j in range(n - 1):
        f = up[j + 1:, j] / up[j, j]
        lo[j + 1:, j] = f
        up[j + 1:] -= f[:, None] * up[j]
    return lo, torch.triu(up)


def recipe_factors(recipe: str, w: torch.Tensor, rank: int, rows: Sequence[int] | None = None, *,
                   min_gap: float = GAP_READ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(B0, mid0, A0)`` of ``recipe`` on the function-layout 2-D weight ``w``, in float64 (module docstring).

    Raises :class:`UnsupportedError` when the part is not well defined (rank out of range, singular values at
    the cut closer than ``min_gap``, dependent columns, a singular pivot block, bad ``rows``)."""
    import torch

    if recipe not in RECIPES:
        raise UnsupportedError(f"unknown base_part recipe {recipe!r} (known: {', '.join(RECIPES)})")
    w = w.detach().to("cpu", torch.float64)
    k = min(w.shape)
    hi = k - 1 if recipe == "svd_bottom" else k
    if not 1 <= rank <= hi:
        raise UnsupportedError(f"base_part {recipe} rank {rank} is outside [1, {hi}] for a {list(w.shape)} weight")
    if recipe in SPECTRAL:
        gap = spectral_gap(w, recipe, rank)
        if gap < min_gap:
            raise UnsupportedError(f"base_part {recipe} rank {rank}: the singular values at the cut are too close "
                                   f"(relative gap {gap:.2e} < {min_gap:.0e}); store the part explicitly")
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        sl = slice(0, rank) if recipe == "svd_top" else slice(k - rank, k)
        return u[:, sl] * s[sl], None, vh[sl]
    big = w.abs().max()
    if recipe == "qr":
        q, r_ = torch.linalg.qr(w)
        if not torch.diagonal(r_)[:rank].abs().min() > PIVOT_READ * big:  # NaN-safe
            raise UnsupportedError(f"base_part qr rank {rank}: the first {rank} columns of the weight are "
                                   "linearly dependent")
        return q[:, :rank], None, r_[:rank]
    if recipe == "nystrom":
        return w[:, :rank].clone(), w[:rank, :rank].clone(), w[:rank].clone()
    if rows is None or len(rows) != rank or len(set(rows)) != rank or not all(0 <= i < w.shape[0] for i in rows):
        raise UnsupportedError(f"base_part ldu needs rows: {rank} distinct row indices in [0, {w.shape[0]})")
    idx = torch.tensor(list(rows))
    l11, u11 = _lu_nopivot(w[idx, :rank])
    piv = torch.diagonal(u11)
    if not piv.abs().min() > PIVOT_READ * big:  # NaN-safe: a zero pivot leaves NaN after it
        raise UnsupportedError(f"base_part ldu rank {rank}: the pivot block W[rows, :{rank}] is singular")
    b0 = torch.linalg.solve_triangular(u11, w[:, :rank], upper=True, left=False)
    a0 = torch.linalg.solve_triangular(l11, w[idx], upper=False, unitriangular=True) / piv[:, None]
    return b0, piv.clone(), a0


def ldu_rows(w: torch.Tensor, rank: int) -> list[int]:
    """A writer's ``rows`` for ``ldu``: the first ``rank`` pivot rows of LU with partial pivoting of ``w``
    (the largest magnitude in the column, the lowest row index on a tie, as LAPACK getrf)."""
    import torch

    p, _, _ = torch.linalg.lu(w.detach().to("cpu", torch.float64))
    return p.argmax(dim=0)[:rank].tolist()


def product(b: torch.Tensor, mid: torch.Tensor | None, a: torch.Tensor) -> torch.Tensor:
    """``B @ M @ A`` with ``M`` = ``diag(mid)`` (vector), ``mid`` (matrix) or the identity (None)."""
    return scale_columns(b, mid) @ a


def scale_columns(b: torch.Tensor, mid: torch.Tensor | None) -> torch.Tensor:
    """``B @ M``: columns scaled by a vector ``mid``, times a matrix ``mid``, or ``B`` itself."""
    if mid is None:
        return b
    mid = mid.to(b.dtype)
    return b * mid if mid.dim() == 1 else b @ mid


def derived_tensors(entry: Mapping[str, Any], w: torch.Tensor, *, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors a derived part stands for on base weight ``w`` (function layout, any shape ``[out, ...]``):
    ``init_A`` / ``init_B`` (/ ``init_mid``) unless its scale is 0, and ``lora_A`` / ``lora_B`` (shaped like
    stored ones of a Linear or a Conv2d) for the ``ldu`` / ``nystrom`` factors. Nothing for the explicit form."""
    part = base_part(entry)
    if part is None or "recipe" not in part:
        return {}
    fshape = tuple(w.shape)
    b0, m0, a0 = recipe_factors(part["recipe"], w.reshape(fshape[0], -1), int(part["rank"]), part.get("rows"))
    r0 = a0.shape[0]
    a0 = a0.reshape(r0, *fshape[1:]).to(dtype)
    b0 = b0.reshape(fshape[0], r0, *([1] * (len(fshape) - 2))).to(dtype)
    out: dict[str, torch.Tensor] = {}
    if part["recipe"] in FACTOR_RECIPES:
        out["lora_A"], out["lora_B"] = a0, b0
    if float(part["scale"]) != 0.0:
        out["init_A"], out["init_B"] = a0, b0
        if m0 is not None:
            out["init_mid"] = m0.to(dtype)
    return out


def explicit_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The entry of the explicit form of a derived entry: ``base_part`` without its recipe, or dropped when
    its scale is 0 (then nothing is subtracted)."""
    out = {k: v for k, v in entry.items()}
    params = {k: v for k, v in entry.get("params", {}).items() if k != "base_part"}
    part = base_part(entry)
    if part is not None and float(part["scale"]) != 0.0:
        params["base_part"] = {"scale": float(part["scale"])}
    out["params"] = params
    return out


# ----- initial factors shared by the SVD-structured methods and the PEFT format -----------------------------
def pissa_factors(w: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's PiSSA init ``(A0, B0)`` of a function-layout weight, in float32 as PEFT computes it:
    ``U, S, Vh = svd(W)``, ``A0 = sqrt(S_r / scale) Vh_r``, ``B0 = U_r sqrt(S_r / scale)``."""
    import torch

    u, s, vh = torch.linalg.svd(w.detach().to(torch.float32), full_matrices=False)
    root = torch.sqrt(s[:r] / scale)
    return root[:, None] * vh[:r], u[:, :r] * root


def olora_factors(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's OLoRA init ``(A0, B0) = (R[:r], Q[:, :r])`` of ``qr(w)`` in float32; ``w`` is the weight as PEFT
    stores it (for a ``fan_in_fan_out`` module the caller transposes the result)."""
    import torch

    q, rr = torch.linalg.qr(w.detach().to(torch.float32))
    return rr[:r].contiguous(), q[:, :r].contiguous()


def svd_bottom_factors(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The part KaSA (PEFT ``kasa_config``) drops from the base, as PEFT computes it in float32:
    ``(A0, B0) = (Vh[k-r:], U[:, k-r:] S[k-r:])``."""
    import torch

    u, s, vh = torch.linalg.svd(w.detach().to(torch.float32), full_matrices=False)
    k = s.numel()
    return vh[k - r:].contiguous(), (u[:, k - r:] * s[k - r:]).contiguous()
