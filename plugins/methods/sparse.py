"""Sparse fine-tuning: train a chosen few weights of each targeted module, stored as kind ``sparse``.

``train(model, config=..., loss_fn=..., batches=...)`` first chooses each module's mask, then injects a
trainable ``values`` vector (zeros: training starts at the base model) scattered into the weight at the
mask's flat row-major ``indices`` through the ``sparse`` kind's own forward, so what is trained is what
``attach`` applies. Apply, merge (scatter-add), compress and port are the ``sparse`` kind's generic verbs.

Selection (``config.selection``, recorded in the manifest's config with ``seed`` / ``calibration_batches``):

- ``gradient`` (the default when ``loss_fn`` and ``batches`` are given): score = |sum of the weight's
  gradients| over the calibration ``batches`` (``loss_fn(model, batch) -> scalar loss``, one backward per
  batch, the model's other gradients left as they were);
- ``random`` (the default otherwise): uniform noise from a generator seeded by ``seed`` and the module path.

Methods differ in what the score picks, in the weight's function layout ``[out, n_in]``:

- ``sparse_ft``: the ``k`` highest-scoring entries per module (or ``density`` of them, default 0.01);
- ``structured_ft``: ``structure`` ``rows`` (output channels, row score = sum of its entries' scores),
  ``columns`` (input channels) — ``k`` of them per module, or ``density`` —, or ``"N:M"`` (the N
  best of every M consecutive inputs of each row; ``n_in`` must divide by M).

- ``spiel`` (SpIEL, Ansell et al. 2024): a budget of ``density`` of *all* the model's parameters split over
  the targets by size, random initial masks, and prune / regrow every ``reselection_steps`` by accumulated
  gradients (``rigl``) or SM3 moments (``sm3``), run by ``session.step(optimizer)`` with the method's own
  optimizer (``session.optimizer()``); see :class:`SpielSchedule`.

On linear maps (``nn.Linear``, GPT-2 ``Conv1D``) every method here trains through :class:`LeanSparseDelta`:
indices and values only, forward by CSR spmm, backward by SDDMM, so no weight-sized tensor exists in a step
and training memory grows with the kept entries, not with the weights.

Structured masks are stored as ``sparse`` too (every element of the chosen rows / columns): the simplest
form every verb already handles (CSR apply kernel, scatter merge, composition, port); the price is one int64
index per value, about 3x the bytes of a dense ``[k, n_in]`` block for fp32 values.

Composable masks: ``adapter merge`` (strategy ``linear``) of sparse adapters is their masks' union, entries
present in several inputs summed (weights applied), and stays ``sparse`` while that is smaller than dense.
"""

from __future__ import annotations

import copy
import math
import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import adapterfmt as af

SUPPORTED = (nn.Linear, "Conv1D", nn.Embedding, nn.Conv2d)
SELECTIONS = ("gradient", "random")
DENSITY = 0.01
LossFn = Callable[[nn.Module, Any], torch.Tensor]


BUDGET = {"k": {"type": "integer", "minimum": 1}, "density": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}}


def _config_schema(extra: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {
        **BUDGET, "selection": {"enum": list(SELECTIONS)}, "seed": {"type": "integer"},
        "calibration_batches": {"type": "integer", "minimum": 1}, **extra, **af.TARGETS_SCHEMA}}
    # calibration_batches is recorded by gradient selection, never an option (train refuses it)


def function_2d(t: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A stored-layout weight-shaped tensor viewed in function layout ``[out, n_in]``."""
    f = t.t() if af.module_entry("sparse", module)["params"].get("transposed") else t
    return f.reshape(f.shape[0], -1)


def stored_indices(mask: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Sorted flat row-major indices, in the weight's stored layout, of a function-layout ``[out, n_in]`` mask."""
    weight = module.weight
    transposed = bool(af.module_entry("sparse", module)["params"].get("transposed"))
    fshape = weight.shape[::-1] if transposed else weight.shape
    m = mask.reshape(fshape)
    return (m.t() if transposed else m).reshape(-1).nonzero().reshape(-1).to(torch.int64)


def gradient_scores(model: nn.Module, modules: dict[str, nn.Module], loss_fn: LossFn | None,
                    batches: Iterable[Any] | None) -> tuple[dict[str, torch.Tensor], int]:
    """|accumulated gradient| of each module's weight over ``batches``, and the number of batches used."""
    if loss_fn is None or batches is None:
        raise af.FormatError("selection 'gradient' needs calibration data: train(..., loss_fn=, batches=); "
                             "or choose selection 'random'")
    params = list(model.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    for p in params:
        p.requires_grad_(False)
    weights = {path: m.weight for path, m in modules.items()}
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    try:
        n = 0
        for batch in batches:
            loss_fn(model, batch).backward()
            n += 1
        if n == 0:
            raise af.FormatError("selection 'gradient' got no calibration batch")
        return {path: w.grad.detach().abs() for path, w in weights.items()}, n
    finally:
        for p, (flag, grad) in zip(params, saved, strict=True):
            p.requires_grad_(flag)
            p.grad = grad


def random_score(module: nn.Module, path: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(path.encode())) % 2**63)
    return torch.rand(module.weight.shape, generator=gen)


def count(cfg: dict[str, Any], units: int, what: str) -> int:
    """How many of ``units`` to keep: ``k`` or ``density`` (default :data:`DENSITY`) of them, at least one."""
    if "k" in cfg and "density" in cfg:
        raise af.FormatError(f"give one of k (number of {what} per module) or density (their fraction), not both")
    return min(units, cfg["k"]) if "k" in cfg else max(1, round(cfg.get("density", DENSITY) * units))


# ----- the memory-lean trainable path -----------------------------------------------------------------------
def linear_like(module: nn.Module) -> bool:
    """A 2-D linear map whose output is ``x @ W_f^T`` (+ bias): ``nn.Linear`` or GPT-2's ``Conv1D``."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and module.weight.dim() == 2)


def csr(rowptr: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A torch CSR matrix (torch's one-time "beta" warning silenced)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(rowptr, cols, values, size=size, check_invariants=False)


def sddmm(rows: torch.Tensor, cols: torch.Tensor, rowptr: torch.Tensor, shape: tuple[int, int],
          go2: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """``(go2^T @ x2)[rows_j, cols_j]`` for sorted row-major entries, without forming the dense product."""
    pattern = csr(rowptr, cols, torch.zeros(rows.numel(), dtype=go2.dtype, device=go2.device), shape)
    return torch.sparse.sampled_addmm(pattern, go2.t(), x2, beta=0.0, alpha=1.0).values()


BLOCK_ELEMENTS = 1 << 18
"""Elements of one row block of a streamed top-k (1 MiB of fp32 scores)."""


def streaming_topk(score: Callable[[int, int], torch.Tensor], shape: tuple[int, int], k: int,
                   exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Flat indices of the ``k`` largest scores of an ``[out, n_in]`` matrix given by row blocks (``score(r0, r1)``
    gives rows ``r0:r1``) of about ``max(k, BLOCK_ELEMENTS)`` elements, skipping the sorted flat positions in
    ``exclude``. Working memory: a few blocks, whatever the matrix size."""
    out_f, in_f = shape
    rows_per_block = max(1, -(-max(k, BLOCK_ELEMENTS) // in_f))
    best_v, best_i = torch.empty(0), torch.empty(0, dtype=torch.int64)
    for r0 in range(0, out_f, rows_per_block):
        r1 = min(out_f, r0 + rows_per_block)
        flat = score(r0, r1).reshape(-1).float()
        if exclude is not None and exclude.numel():
            lo, hi = torch.searchsorted(exclude, torch.tensor([r0 * in_f, r1 * in_f], device=exclude.device)).tolist()
            flat[exclude[lo:hi] - r0 * in_f] = -math.inf
        if best_v.numel() == k:  # only entries above the current k-th best can enter
            new_i = (flat > best_v.min()).nonzero().reshape(-1)
            new_v = flat[new_i]
        else:
            top = torch.topk(flat, min(k, flat.numel()), sorted=False)
            new_v, new_i = top.values, top.indices
        if new_v.numel():
            cat_v = torch.cat([best_v.to(flat.device), new_v])
            cat_i = torch.cat([best_i.to(flat.device), new_i + r0 * in_f])
            top = torch.topk(cat_v, min(k, cat_v.numel()), sorted=False)
            best_v, best_i = top.values, cat_i[top.indices]
    return best_i


@dataclass
class Candidates:
    """SpIEL regrowth candidates of one module in a selection phase (sorted function-layout flat positions)
    and the sums of their gradients, squared gradients and sample counts."""

    indices: torch.Tensor
    grads: torch.Tensor
    grads_sq: torch.Tensor
    samples: torch.Tensor


class LeanSparseDelta(af.TrainableDelta):
    """A ``sparse`` entry in training on a linear map, computed without any weight-sized tensor.

    Forward ``y + scale * x S^T`` (CSR spmm, ``S`` in function layout); backward ``dL/dvalues`` by SDDMM at the
    kept entries and ``dL/dx += go S`` with the CSR of ``S^T`` (built once per pattern). The result equals the
    ``sparse`` kind's forward, which :func:`adapterfmt.attach` applies. ``indices`` stay the stored layout's
    sorted flat positions; :meth:`set_indices` installs a new pattern (SpIEL's reselection). While
    ``collecting`` (a SpIEL selection phase), each backward also feeds :attr:`candidates`.
    """

    def __init__(self, entry: dict[str, Any], module: nn.Module, indices: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__(entry, {"values": values}, frozen={"indices": indices})
        w = module.weight
        self.transposed = af.is_transposed(module)
        self.fshape = (int(w.shape[1]), int(w.shape[0])) if self.transposed else (int(w.shape[0]), int(w.shape[1]))
        self.collecting = False
        self.candidates: Candidates | None = None
        self.set_indices(indices)

    @property
    def k(self) -> int:
        return self.indices.numel()

    def to_function(self, stored: torch.Tensor) -> torch.Tensor:
        """Function-layout flat positions of stored-layout ones."""
        if not self.transposed:
            return stored
        out_f, in_f = self.fshape
        i, o = torch.div(stored, out_f, rounding_mode="floor"), stored % out_f
        return o * in_f + i

    def to_stored(self, function: torch.Tensor) -> torch.Tensor:
        if not self.transposed:
            return function
        out_f, in_f = self.fshape
        o, i = torch.div(function, in_f, rounding_mode="floor"), function % in_f
        return i * out_f + o

    @torch.no_grad()
    def set_indices(self, indices: torch.Tensor) -> None:
        """Install sorted stored-layout ``indices`` (one per value) and rebuild the CSR structures."""
        idx = indices.to(device=self.indices.device, dtype=torch.int64)
        if idx.numel() != self.weights.values.numel() or (idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all())):
            raise af.FormatError("sparse delta: indices must be strictly increasing, one per value")
        self.indices = idx
        out_f, in_f = self.fshape
        f = self.to_function(idx)
        self.order = torch.argsort(f) if self.transposed else None  # function-sorted order of the stored entries
        fs = f if self.order is None else f[self.order]
        self.value_rows = torch.div(f, in_f, rounding_mode="floor")  # function row / column of each value
        self.value_cols = f - self.value_rows * in_f
        self.rows = torch.div(fs, in_f, rounding_mode="floor")
        self.cols = fs - self.rows * in_f
        self.rowptr = torch.searchsorted(self.rows, torch.arange(out_f + 1, device=idx.device))
        self.t_perm = torch.argsort(self.cols * out_f + self.rows)  # S^T as CSR: entries by (col, row)
        self.t_colptr = torch.searchsorted(self.cols[self.t_perm], torch.arange(in_f + 1, device=idx.device))
        self.t_rows = self.rows[self.t_perm]

    def restored(self) -> None:
        """The CSR structures of the restored ``indices``."""
        self.set_indices(self.indices)

    def function_values(self) -> torch.Tensor:
        v = self.weights.values
        return v if self.order is None else v[self.order]

    def forward(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.rows.device != self.indices.device:  # moved by .to(): rebuild the structures there
            self.set_indices(self.indices)
        scale = float(self.entry.get("params", {}).get("scale", 1.0))
        x2 = x.reshape(-1, x.shape[-1])
        out = SparseLinear.apply(x2, self.function_values(), self)
        return y + (scale * out).reshape(y.shape).to(y.dtype)


class SparseLinear(torch.autograd.Function):
    """``x2 S^T`` for a :class:`LeanSparseDelta`'s current pattern; the backward also collects SpIEL candidates."""

    @staticmethod
    def forward(ctx: Any, x2: torch.Tensor, values: torch.Tensor, d: LeanSparseDelta) -> torch.Tensor:
        ctx.save_for_backward(x2, values)
        ctx.delta = d
        return (csr(d.rowptr, d.cols, values.to(x2.dtype), d.fshape) @ x2.t()).t()

    @staticmethod
    def backward(ctx: Any, go2: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x2, values = ctx.saved_tensors
        d: LeanSparseDelta = ctx.delta
        go2 = go2.contiguous()
        grad_x = grad_v = None
        if ctx.needs_input_grad[0]:
            s_t = csr(d.t_colptr, d.t_rows, values.to(go2.dtype)[d.t_perm], (d.fshape[1], d.fshape[0]))
            grad_x = (s_t @ go2.t()).t()
        if ctx.needs_input_grad[1]:
            grad_v = sddmm(d.rows, d.cols, d.rowptr, d.fshape, go2, x2).to(values.dtype)
        if d.collecting:
            collect_candidates(d, go2, x2)
        return grad_x, grad_v, None


@torch.no_grad()
def collect_candidates(d: LeanSparseDelta, go2: torch.Tensor, x2: torch.Tensor) -> None:
    """SpIEL's gradient accumulation: the first backward of a phase picks the ``k`` largest ``|dL/dW|``
    positions (streamed by row blocks, never the whole gradient); every backward adds their gradient and
    squared gradient (SDDMM at the candidates)."""
    if d.candidates is None:
        idx = torch.sort(streaming_topk(lambda r0, r1: (go2[:, r0:r1].t() @ x2).abs(), d.fshape, d.k)).values
        z = torch.zeros(idx.numel(), dtype=torch.float32, device=idx.device)
        d.candidates = Candidates(idx, z.clone(), z.clone(), z.clone())
    c = d.candidates
    in_f = d.fshape[1]
    rows = torch.div(c.indices, in_f, rounding_mode="floor")
    rowptr = torch.searchsorted(rows, torch.arange(d.fshape[0] + 1, device=rows.device))
    g = sddmm(rows, c.indices - rows * in_f, rowptr, d.fshape, go2, x2).float()
    c.grads += g
    c.grads_sq.addcmul_(g, g)
    c.samples += 1


def sparse_trainable(module: nn.Module, indices: torch.Tensor, *, scale: float = 1.0) -> af.TrainableDelta:
    """A trainable ``sparse`` entry (zero values) at sorted stored-layout ``indices``: the lean path on linear
    maps, the kind's own forward elsewhere (embeddings, convolutions)."""
    entry = {"kind": "sparse", "shape": list(module.weight.shape), "params": {"scale": scale}}
    values = torch.zeros(indices.numel(), dtype=af.adapter_dtype(module))
    if linear_like(module):
        return LeanSparseDelta(entry, module, indices, values)
    return af.TrainableDelta(entry, {"values": values}, frozen={"indices": indices})


class SparseFT(af.Method):
    name = "sparse_ft"
    summary = "Sparse fine-tuning: k chosen weights per module trained, stored as sorted indices + values"
    kinds = ("sparse",)
    config_schema = _config_schema({})
    unit = "entries"

    def train(self, model: nn.Module, *, config: dict[str, Any], loss_fn: LossFn | None = None,
              batches: Iterable[Any] | None = None, **options: Any) -> af.TrainSession:
        """Choose each targeted module's mask (see the plugin docstring), then inject trainable values."""
        calibrated = loss_fn is not None and batches is not None
        cfg = {"selection": "gradient" if calibrated else "random", "seed": 0, **config}
        self.check_config(cfg)
        if "calibration_batches" in config:
            raise af.FormatError(f"{self.name}: calibration_batches is recorded by gradient selection, not an option")
        chosen = af.select_targets(model, cfg, supported=SUPPORTED)
        if cfg["selection"] == "gradient":
            scores, cfg["calibration_batches"] = gradient_scores(model, chosen, loss_fn, batches)
        else:
            scores = {path: random_score(m, path, cfg["seed"]) for path, m in chosen.items()}
        masks = {path: self.mask(function_2d(scores[path], m), cfg) for path, m in chosen.items()}

        return af.inject(model, method=self.name, config=cfg, supported=SUPPORTED,
                         build=lambda path, module: sparse_trainable(module, stored_indices(masks[path], module)))

    def mask(self, score: torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
        """Boolean function-layout ``[out, n_in]`` mask of the entries to train, from their scores."""
        k = count(cfg, score.numel(), self.unit)
        mask = torch.zeros(score.numel(), dtype=torch.bool)
        mask[score.reshape(-1).topk(k).indices] = True
        return mask.reshape(score.shape)


class StructuredFT(SparseFT):
    name = "structured_ft"
    summary = "Structured sparse fine-tuning: whole rows, columns or N:M groups trained, stored as sparse"
    config_schema = _config_schema({"structure": {"type": "string", "pattern": r"^(rows|columns|\d+:\d+)$"}})

    def mask(self, score: torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
        structure = cfg.get("structure", "rows")
        if structure in ("rows", "columns"):
            axis = 1 if structure == "rows" else 0
            units = score.sum(axis)
            keep = units.topk(count(cfg, units.numel(), structure)).indices
            mask = torch.zeros_like(score, dtype=torch.bool)
            if structure == "rows":
                mask[keep] = True
            else:
                mask[:, keep] = True
            return mask
        n, m = map(int, structure.split(":"))
        if not 0 < n <= m or score.shape[1] % m:
            raise af.FormatError(f"structure {structure!r} needs 0 < N <= M and M dividing the {score.shape[1]} "
                                 "inputs of each targeted module")
        groups = score.reshape(score.shape[0], -1, m)
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(n, dim=2).indices, True)
        return mask.reshape(score.shape)


# ----- SpIEL ------------------------------------------------------------------------------------------------
class SparseAdamW(torch.optim.Optimizer):
    """SpIEL's AdamW: a per-entry ``age`` drives the bias correction (regrown entries start with seeded moments
    and their own age), ``denom = (sqrt(v) + eps) (1 - b1^age) / sqrt(1 - b2^age)``, decoupled weight decay
    applied after the update."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st.update({k: torch.zeros_like(p, dtype=torch.float32) for k in ("exp_avg", "exp_avg_sq")})
                    st["age"] = torch.ones_like(p, dtype=torch.float32)
                g = p.grad.float()
                st["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
                st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = st["exp_avg_sq"].sqrt().add_(group["eps"])
                denom.mul_(1 - beta1 ** st["age"]).div_(torch.sqrt(1 - beta2 ** st["age"]))
                p.addcdiv_(st["exp_avg"].to(p.dtype), denom.to(p.dtype), value=-group["lr"])
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
                st["age"] += 1


class SparseSM3(torch.optim.Optimizer):
    """SpIEL's SM3 on sparse deltas of linear maps: one accumulator per row and per column of the function-layout
    weight (max-reduced), update ``g / sqrt(min(row[r], col[c]) + g^2 + eps)``, optional momentum, decoupled
    weight decay."""

    def __init__(self, deltas: Iterable[LeanSparseDelta], lr: float = 0.1, momentum: float = 0.0, eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        deltas = list(deltas)
        self.owner = {id(d.weights.values): d for d in deltas}
        super().__init__([d.weights.values for d in deltas],
                         {"lr": lr, "momentum": momentum, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d, g, st = self.owner[id(p)], p.grad.float(), self.state[p]
                if not st:
                    st["momentum_buffer"] = torch.zeros_like(g)
                    st["row_acc"] = torch.zeros(d.fshape[0], device=g.device)
                    st["col_acc"] = torch.zeros(d.fshape[1], device=g.device)
                upd = torch.minimum(st["row_acc"][d.value_rows], st["col_acc"][d.value_cols]).addcmul_(g, g)
                st["row_acc"].scatter_reduce_(0, d.value_rows, upd, "amax", include_self=True)
                st["col_acc"].scatter_reduce_(0, d.value_cols, upd, "amax", include_self=True)
                upd.add_(group["eps"]).rsqrt_().mul_(g)
                if group["momentum"] > 0:
                    upd.mul_(1 - group["momentum"]).add_(st["momentum_buffer"], alpha=group["momentum"])
                    st["momentum_buffer"] = upd.clone()
                p.sub_(upd.to(p.dtype), alpha=group["lr"])
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])


def reselection_rate(cfg: dict[str, Any], completed: int) -> float:
    """Fraction of each module's entries replaced at the selection phase ending after ``completed`` steps:
    all of them at the first end (the random initial mask is replaced), then ``initial_reselection_rate``
    decayed linearly or by a half cosine over ``total_steps``."""
    if completed == cfg["selection_accumulation_steps"]:
        return 1.0
    frac, rate0 = completed / cfg["total_steps"], cfg["initial_reselection_rate"]
    if cfg["reselection_rate_policy"] == "cosine":
        return rate0 * (1 + math.cos(math.pi * frac)) / 2
    return rate0 * (1 - frac)


class SpielSchedule:
    """SpIEL's prune-and-regrow schedule (the authors' ``SftSelector``), run by ``session.step(optimizer)``.

    With ``R = reselection_steps`` and ``A = selection_accumulation_steps``, counting completed optimizer steps
    ``c``: a selection phase begins at the start and whenever ``(c + 1) % R == 0``, and ends when
    ``c % R == A`` (not after ``total_steps``). At an end each module drops its ``int(k p)`` smallest
    ``|values|`` (``p`` from :func:`reselection_rate`) and regrows as many entries: ``rigl`` — the candidates
    with the largest ``|sum of gradients|`` over the phase, new slots' Adam moments seeded from the mean
    gradient / squared gradient with age ``samples / grad_accumulation_steps``; ``sm3`` — the non-kept
    positions with the largest ``row_acc[r] * col_acc[c]`` (momentum reset for the new slots). New values
    are 0, indices are re-sorted, values and optimizer state follow. ``replaced`` lists (step, count).
    """

    def __init__(self, deltas: dict[str, LeanSparseDelta], cfg: dict[str, Any]) -> None:
        self.deltas, self.cfg = deltas, cfg
        self.completed = 0
        self.replaced: list[tuple[int, int]] = []
        self.begin()

    def __call__(self, optimizer: torch.optim.Optimizer | None) -> None:
        want = SparseSM3 if self.cfg["selection_algorithm"] == "sm3" else SparseAdamW
        if not isinstance(optimizer, want):
            raise af.FormatError(f"spiel: session.step() needs the session's optimizer (session.optimizer(), a "
                                 f"{want.__name__}), got {type(optimizer).__name__}")
        if "total_steps" not in self.cfg:
            raise af.FormatError("spiel: the reselection schedule needs total_steps in the config")
        self.completed += 1
        r, a = self.cfg["reselection_steps"], self.cfg["selection_accumulation_steps"]
        if (self.completed + 1) % r == 0:
            self.begin()
        if self.completed % r == a and self.completed <= self.cfg["total_steps"]:
            self.end(optimizer)

    def state_dict(self) -> dict[str, Any]:
        """The schedule's progress and each module's pattern, phase flag and candidates (``adapter train``
        checkpoints it; the values and the optimizer state are saved with the adapter and the optimizer)."""
        return {"completed": self.completed, "replaced": [list(r) for r in self.replaced],
                "modules": {path: {"indices": d.indices.cpu(), "collecting": d.collecting,
                                   "candidates": None if d.candidates is None else {
                                       f.name: getattr(d.candidates, f.name).cpu() for f in fields(Candidates)}}
                            for path, d in self.deltas.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (install the saved patterns, resume the phase)."""
        if set(state["modules"]) != set(self.deltas):
            raise af.FormatError("spiel: the schedule state names other modules than this session's")
        self.completed, self.replaced = state["completed"], [tuple(r) for r in state["replaced"]]
        for path, d in self.deltas.items():
            st = state["modules"][path]
            d.set_indices(st["indices"])
            d.collecting = st["collecting"]
            c = st["candidates"]
            d.candidates = None if c is None else Candidates(**{k: t.to(d.indices.device) for k, t in c.items()})

    def begin(self) -> None:
        if self.cfg["selection_algorithm"] == "rigl":
            for d in self.deltas.values():
                d.collecting, d.candidates = True, None

    def end(self, optimizer: torch.optim.Optimizer) -> None:
        p = reselection_rate(self.cfg, self.completed)
        n = 0
        for d in self.deltas.values():
            d.collecting = False
            n += self.rigl(d, p, optimizer) if self.cfg["selection_algorithm"] == "rigl" else self.sm3(d, p, optimizer)
            d.candidates = None
        self.replaced.append((self.completed, n))

    @torch.no_grad()
    def rigl(self, d: LeanSparseDelta, p: float, optimizer: torch.optim.Optimizer) -> int:
        c = d.candidates
        if c is None:
            return 0
        values, idx = d.weights.values, d.to_function(d.indices)
        n = int(d.k * p)
        changing = torch.topk(values.abs(), n, largest=False, sorted=True).indices
        outgoing = idx[changing]
        ok = ~torch.isin(c.indices, idx[~torch.isin(idx, outgoing)])  # candidates not kept (or leaving)
        cand, grads, sq, samples = c.indices[ok], c.grads[ok], c.grads_sq[ok], c.samples[ok]
        best = torch.topk(grads.abs(), min(n, grads.numel()), sorted=True).indices
        incoming, grads, sq, samples = cand[best], grads[best], sq[best], samples[best]
        changing = changing[~torch.isin(outgoing, incoming)]  # an outgoing entry chosen again stays
        keep = ~torch.isin(incoming, outgoing)
        incoming, grads, sq, samples = incoming[keep], grads[keep], sq[keep], samples[keep]
        changing = changing[:incoming.numel()]
        new_idx = idx.clone()
        new_idx[changing] = incoming
        values[changing] = 0
        st = optimizer.state.get(values)
        if st:
            beta1, beta2 = optimizer.param_groups[0]["betas"]
            age = samples / self.cfg["grad_accumulation_steps"]
            st["exp_avg"][changing] = grads / samples * (1 - beta1 ** age)
            st["exp_avg_sq"][changing] = sq / samples * (1 - beta2 ** age)
            st["age"][changing] = age
        self.install(d, new_idx, optimizer)
        return int(changing.numel())

    @torch.no_grad()
    def sm3(self, d: LeanSparseDelta, p: float, optimizer: torch.optim.Optimizer) -> int:
        st = optimizer.state.get(d.weights.values)
        if not st:
            return 0
        changing = torch.topk(d.weights.values.abs(), int(d.k * p), largest=False, sorted=True).indices
        row, col = st["row_acc"], st["col_acc"]
        idx = d.to_function(d.indices)
        incoming = streaming_topk(lambda r0, r1: torch.outer(row[r0:r1], col), d.fshape, changing.numel(),
                                  exclude=torch.sort(idx).values)
        new_idx = idx.clone()
        new_idx[changing] = incoming
        d.weights.values[changing] = 0
        st["momentum_buffer"][changing] = 0
        self.install(d, new_idx, optimizer)
        return int(changing.numel())

    @staticmethod
    def install(d: LeanSparseDelta, function_idx: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        stored = d.to_stored(function_idx)
        perm = torch.argsort(stored)
        values = d.weights.values
        values.data = values.data[perm]
        st = optimizer.state.get(values, {})
        for key, t in st.items():
            if isinstance(t, torch.Tensor) and t.shape == values.shape:
                st[key] = t[perm]
        d.set_indices(stored[perm])


SPIEL_DEFAULTS: dict[str, Any] = {
    "selection_algorithm": "rigl", "reselection_steps": 20, "selection_accumulation_steps": 5,
    "initial_reselection_rate": 0.2, "reselection_rate_policy": "linear", "grad_accumulation_steps": 1, "seed": 0}
"""SpIEL's defaults (the authors' ``SftConfig``); ``density`` defaults to 0.01 of all the model's parameters."""


def spiel_budget(model: nn.Module, chosen: dict[str, nn.Module], cfg: dict[str, Any]) -> dict[str, int]:
    """The authors' budget: ``K = num_tunable_weights`` or ``int(density * all parameters of the model)``,
    split over the targets in proportion to their weight sizes (``int(K * numel / total target numel)``)."""
    if "density" in cfg and "num_tunable_weights" in cfg:
        raise af.FormatError("spiel: give one of density or num_tunable_weights, not both")
    total = cfg.get("num_tunable_weights") or int(cfg.get("density", DENSITY) * sum(p.numel() for p in model.parameters()))
    tgt = sum(m.weight.numel() for m in chosen.values())
    ks = {path: min(m.weight.numel(), int(total * m.weight.numel() / tgt)) for path, m in chosen.items()}
    empty = [path for path, k in ks.items() if k == 0]
    if empty:
        raise af.FormatError(f"spiel: a budget of {total} entries leaves module {empty[0]!r} none; raise density")
    return ks


class Spiel(af.Method):
    name = "spiel"
    summary = "SpIEL: sparse fine-tuning at a fixed density with prune / regrow, memory proportional to the kept entries"
    kinds = ("sparse",)
    config_schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": {
        "density": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "num_tunable_weights": {"type": "integer", "minimum": 1},
        "selection_algorithm": {"enum": ["rigl", "sm3"]},
        "reselection_steps": {"type": "integer", "minimum": 2},
        "selection_accumulation_steps": {"type": "integer", "minimum": 1},
        "initial_reselection_rate": {"type": "number", "minimum": 0, "maximum": 1},
        "reselection_rate_policy": {"enum": ["linear", "cosine"]},
        "total_steps": {"type": "integer", "minimum": 1},
        "grad_accumulation_steps": {"type": "integer", "minimum": 1},
        "seed": {"type": "integer"}, **af.TARGETS_SCHEMA}}

    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> af.TrainSession:
        """Random initial masks at SpIEL's budget, trainable values on the lean path, and the reselection
        schedule on ``session.step(optimizer)`` with ``optimizer = session.optimizer(lr=...)`` (SpIEL's
        AdamW, or SM3 for ``selection_algorithm: sm3``). Without ``session.step`` the mask stays fixed."""
        self.check_config(config)
        cfg = {**SPIEL_DEFAULTS, **config}
        if cfg["selection_accumulation_steps"] >= cfg["reselection_steps"]:
            raise af.FormatError("spiel: selection_accumulation_steps must be below reselection_steps")
        dist = torch.distributed
        if cfg["selection_algorithm"] == "rigl" and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() > 1:  # its candidates come from each process's own dense gradient
            raise af.UnsupportedError("spiel config field selection_algorithm: rigl regrows from each process's own "
                                      "gradients, so data-parallel processes would diverge; train it in one process "
                                      "or use sm3")
        chosen = af.select_targets(model, cfg, supported=(nn.Linear, "Conv1D"))
        ks = spiel_budget(model, chosen, cfg)

        def build(path: str, module: nn.Module) -> af.TrainableDelta:
            score = random_score(module, path, cfg["seed"]).reshape(-1)
            return sparse_trainable(module, torch.sort(score.topk(ks[path], sorted=False).indices).values)

        session = af.inject(model, method=self.name, config=cfg, build=build, supported=(nn.Linear, "Conv1D"))
        deltas: dict[str, LeanSparseDelta] = dict(session.layers)  # type: ignore[arg-type]
        session.on_step(SpielSchedule(deltas, cfg))
        if cfg["selection_algorithm"] == "sm3":
            session.optimizer_factory = lambda params, **kw: SparseSM3(deltas.values(), **kw)
        else:
            session.optimizer_factory = SparseAdamW
        return session


# ----- LT-SFT -----------------------------------------------------------------------------------------------
def full_ft_phase(model: nn.Module, chosen: dict[str, nn.Module], cfg: dict[str, Any], loss_fn: LossFn,
                  batches: Iterable[Any]) -> tuple[dict[str, torch.Tensor], int]:
    """LT-SFT's phase 1: full fine-tuning of the chosen weights (AdamW, no weight decay, ``full_ft_lr``) for
    ``full_ft_steps`` steps cycling over ``batches`` (default one pass); returns each weight's change
    ``theta_1 - theta_0`` and the steps run. The weights are restored whatever happens."""
    data = list(batches)
    if not data:
        raise af.FormatError("lt_sft phase 1 got no batch")
    steps = cfg.get("full_ft_steps", len(data))
    params = list(model.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    weights = {path: m.weight for path, m in chosen.items()}
    start = {path: w.detach().clone() for path, w in weights.items()}
    for p in params:
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    try:
        opt = torch.optim.AdamW(list(weights.values()), lr=cfg.get("full_ft_lr", 1e-4), weight_decay=0.0)
        for i in range(steps):
            opt.zero_grad()
            loss_fn(model, data[i % len(data)]).backward()
            opt.step()
        return {path: w.detach() - start[path] for path, w in weights.items()}, steps
    finally:
        with torch.no_grad():
            for path, w in weights.items():
                w.copy_(start[path])
        for p, (flag, grad) in zip(params, saved, strict=True):
            p.requires_grad_(flag)
            p.grad = grad


def global_top_k(diffs: dict[str, torch.Tensor], k: int) -> tuple[dict[str, torch.Tensor], float]:
    """The ``k`` entries with the largest ``|diff|`` over all modules together (one global K): sorted flat
    stored-layout indices per module, and the threshold (the k-th largest ``|diff|``). Each module gives its
    own top ``k`` first, so the global choice never holds more than ``k`` per module."""
    best = {path: d.abs().reshape(-1).topk(min(k, d.numel()), sorted=False) for path, d in diffs.items()}
    scores = torch.cat([b.values for b in best.values()])
    top = scores.topk(min(k, scores.numel()), sorted=False)
    taken = torch.zeros(scores.numel(), dtype=torch.bool)
    taken[top.indices] = True
    masks, start = {}, 0
    for path, b in best.items():
        n = b.indices.numel()
        masks[path] = torch.sort(b.indices[taken[start:start + n]]).values
        start += n
    return masks, float(top.values.min())


class LTSFT(af.Method):
    name = "lt_sft"
    summary = "LT-SFT (composable sparse fine-tuning): full FT, the K most-changed entries over the model, reset, train those"
    kinds = ("sparse",)
    file_fields = ("mask_from",)
    config_schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": {
        **BUDGET, "mask_from": {"type": "string", "minLength": 1}, "full_ft_steps": {"type": "integer", "minimum": 1},
        "full_ft_lr": {"type": "number", "exclusiveMinimum": 0}, "threshold": {"type": "number", "minimum": 0},
        **af.TARGETS_SCHEMA}}
    """``threshold`` is recorded by phase 1 (the K-th largest change), never an option."""

    def train(self, model: nn.Module, *, config: dict[str, Any], loss_fn: LossFn | None = None,
              batches: Iterable[Any] | None = None, **options: Any) -> af.TrainSession:
        """Phase 1 (full fine-tuning on ``loss_fn`` / ``batches``) and the global top-K choice, or the mask of
        an existing sparse adapter (``mask_from``); returns phase 2's session: those entries trainable
        (from zero, the model reset to its pre-trained weights), everything else frozen.

        One iteration of the authors' ``n_ft_iterations``, without their optional L1 terms; ties at the
        threshold are broken by ``topk`` (exactly K entries), where the authors keep every tie."""
        self.check_config(config)
        cfg = dict(config)
        if "threshold" in cfg:
            raise af.FormatError("lt_sft: threshold is what phase 1 found, not an option; use k or density")
        if "mask_from" in cfg:
            if "target_modules" in cfg or "k" in cfg or "density" in cfg:
                raise af.FormatError("lt_sft: mask_from gives the modules and entries; drop target_modules, k, density")
            masks = self.masks_from(model, cfg["mask_from"])
        else:
            if loss_fn is None or batches is None:
                raise af.FormatError("lt_sft needs phase 1 data (train(..., loss_fn=, batches=)) or mask_from")
            chosen = af.select_targets(model, cfg, supported=SUPPORTED)
            total = sum(m.weight.numel() for m in chosen.values())
            k = cfg["k"] if "k" in cfg else max(1, int(cfg.get("density", DENSITY) * total))
            if "k" in cfg and "density" in cfg:
                raise af.FormatError("lt_sft: give one of k or density, not both")
            diffs, cfg["full_ft_steps"] = full_ft_phase(model, chosen, cfg, loss_fn, batches)
            masks, cfg["threshold"] = global_top_k(diffs, k)
            masks = {path: idx for path, idx in masks.items() if idx.numel()}
        return af.inject(model, method=self.name, config=cfg, supported=SUPPORTED,
                         targets={"target_modules": sorted(masks)},
                         build=lambda path, module: sparse_trainable(module, masks[path]))

    @staticmethod
    def masks_from(model: nn.Module, source: str) -> dict[str, torch.Tensor]:
        """Each module's sorted stored-layout indices from the ``sparse`` adapter at ``source``."""
        adapter = af.validate(source)
        masks = {}
        for path, entry in adapter.modules.items():
            if entry["kind"] != "sparse" or entry.get("parameter", "weight") != "weight":
                raise af.FormatError(f"lt_sft mask_from: module {path!r} is {entry['kind']!r} on "
                                     f"{entry.get('parameter', 'weight')!r}, not a sparse weight entry", path=source)
            module = dict(model.named_modules()).get(path)
            if module is None or list(module.weight.shape) != list(entry["shape"]):
                raise af.FormatError(f"lt_sft mask_from: module {path!r} of shape {entry['shape']} is not in the model",
                                     path=source)
            masks[path] = adapter.tensor(f"{path}.indices")
        return masks

    def conformance_example(self) -> Any:
        """The conformance kit's example: phase 1 for real on its tiny model, and the mask saved (under the
        system's temporary folder, overwritten each time) for the kit's own ``train``, which has no data."""
        import tempfile
        from pathlib import Path

        from adapterfmt.authoring.conformance import Example
        from adapterfmt.tiny import TinyConfig, build_tiny

        model = build_tiny(0, TinyConfig(vocab_size=32, hidden=16, layers=1, heads=2, intermediate=32))
        gen = torch.Generator().manual_seed(0)
        data = [torch.randint(0, 32, (4, 6), generator=gen) for _ in range(3)]

        def loss_fn(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())

        session = self.train(copy.deepcopy(model), config={"target_modules": ["q_proj", "v_proj", "down_proj"],
                                                           "density": 0.1}, loss_fn=loss_fn, batches=data)
        with torch.no_grad():
            for p in session.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        adapter = session.extract()
        session.remove()
        mask = af.save(adapter, Path(tempfile.gettempdir(), "adapterfmt-conformance-lt_sft.safetensors"), overwrite=True)
        return Example(model, adapter, torch.randint(0, 32, (3, 5), generator=gen), train_config={"mask_from": str(mask)})


# ----- skill localisation by grafting -----------------------------------------------------------------------
def task_vectors(model: nn.Module, chosen: dict[str, nn.Module], finetuned: nn.Module | af.Adapter) -> dict[str, torch.Tensor]:
    """``theta_ft - theta_pre`` of each chosen weight (stored layout, fp32), from a fine-tuned model with the
    same module paths or from an additive adapter."""
    out = {}
    for path, m in chosen.items():
        if isinstance(finetuned, af.Adapter):
            entry = finetuned.modules.get(path)
            if entry is None or entry.get("parameter", "weight") != "weight":
                raise af.FormatError(f"grafting: the fine-tuned adapter has no weight entry for module {path!r}")
            kind = af.registry.get_kind(entry["kind"])
            if not kind.is_additive(entry, finetuned.module_tensors(path)):
                raise af.FormatError(f"grafting: module {path!r} of the fine-tuned adapter is not W + dW")
            out[path] = kind.delta(entry, finetuned.module_tensors(path)).float()
        else:
            ft = dict(finetuned.named_modules()).get(path)
            if ft is None or ft.weight.shape != m.weight.shape:
                raise af.FormatError(f"grafting: the fine-tuned model has no module {path!r} of shape {list(m.weight.shape)}")
            out[path] = (ft.weight.detach().float() - m.weight.detach().float())
    return out


class Grafting(af.Method):
    name = "grafting"
    summary = "Skill localisation by grafting: a learned tiny mask over (theta_ft - theta_pre), stored as sparse"
    kinds = ("sparse",)
    file_fields = ("finetuned_from",)
    config_schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": {
        "density": BUDGET["density"], "mask_lr": {"type": "number", "exclusiveMinimum": 0},
        "epochs": {"type": "integer", "minimum": 0}, "sigmoid_bias": {"type": "number"},
        "enforce_budget": {"type": "boolean"}, "seed": {"type": "integer"}, "finetuned_from": {"type": "string"},
        "base_patch_size": {"type": "integer"}, "graft_size": {"type": "integer"}, **af.TARGETS_SCHEMA}}
    """``base_patch_size`` and ``graft_size`` are recorded by training, never options."""
    DEFAULTS: ClassVar[dict[str, Any]] = {"density": DENSITY, "mask_lr": 1e7, "epochs": 10, "sigmoid_bias": 10.0,
                                          "enforce_budget": False, "seed": 0}

    def train(self, model: nn.Module, *, config: dict[str, Any], finetuned: nn.Module | af.Adapter | None = None,
              loss_fn: LossFn | None = None, batches: Iterable[Any] | None = None,
              score_fn: Callable[[nn.Module], float] | None = None, **options: Any) -> af.TrainSession:
        """Panigrahi et al.'s grafting: base patch ``gamma`` = the ``density`` largest ``|tau|`` over all the
        targeted weights (``tau = theta_ft - theta_pre``, one global budget), mask logits ``S ~ U[0, 1)``, mask
        ``m = gamma + (1 - 2 gamma) sigmoid(S - sigmoid_bias)``; each epoch sets ``theta = theta_pre + m tau``,
        averages ``mask_lr * dL/dtheta * tau`` over ``batches`` and takes one plain gradient step on ``S``. The
        graft is ``round(m)``: the last epoch's, or the best by ``score_fn(model)`` (higher is better; evaluated
        with each epoch's rounded graft, as the authors do). The graft's size is recorded (``graft_size``);
        ``enforce_budget`` keeps only the base patch's size (the largest ``m``), which the authors do not.
        Returns a session whose sparse values are ``tau`` on the graft (the model's weights are restored).
        ``epochs = 0`` gives the base patch itself: magnitude top-k, as ``extract --form sparse``."""
        self.check_config(config)
        cfg = {**self.DEFAULTS, **config}
        if "base_patch_size" in cfg or "graft_size" in cfg:
            raise af.FormatError("grafting: base_patch_size and graft_size are recorded by training, not options")
        if (finetuned is None) == ("finetuned_from" not in cfg):
            raise af.FormatError("grafting needs the fine-tuned weights: train(..., finetuned=<model or adapter>) "
                                 "or config finetuned_from=<path of an additive adapter>, one of them")
        if finetuned is None:
            finetuned = af.validate(cfg["finetuned_from"])
        if cfg["epochs"] and (loss_fn is None or batches is None):
            raise af.FormatError("grafting: learning the mask (epochs > 0) needs train(..., loss_fn=, batches=)")
        data = list(batches or ())
        chosen = af.select_targets(model, cfg, supported=SUPPORTED)
        tau = task_vectors(model, chosen, finetuned)
        k = max(1, int(cfg["density"] * sum(t.numel() for t in tau.values())))
        gamma = {p: torch.zeros(t.numel(), dtype=torch.bool) for p, t in tau.items()}
        for p, idx in global_top_k(tau, k)[0].items():
            gamma[p][idx] = True
        gen = torch.Generator().manual_seed(cfg["seed"])
        logits = {p: torch.rand(t.numel(), generator=gen) for p, t in tau.items()}
        graft = self.learn(model, chosen, tau, gamma, logits, cfg, loss_fn, data, score_fn)
        if cfg["enforce_budget"]:  # the graft's k largest m (m >= 0.5 in the graft; outside it counts 0)
            m = {p: torch.where(graft[p], self.mask(gamma[p], logits[p], cfg), 0.0) for p in graft}
            kept = {p: torch.zeros_like(g) for p, g in graft.items()}
            for p, idx in global_top_k(m, k)[0].items():
                kept[p][idx] = graft[p][idx]
            graft = kept
        indices = {p: g.nonzero().reshape(-1) for p, g in graft.items() if g.any()}
        cfg["base_patch_size"], cfg["graft_size"] = k, sum(i.numel() for i in indices.values())
        session = af.inject(model, method=self.name, config=cfg, supported=SUPPORTED,
                            targets={"target_modules": sorted(indices)},
                            build=lambda path, m: sparse_trainable(m, indices[path]))
        with torch.no_grad():
            for path, layer in session.layers.items():
                layer.weights.values.copy_(tau[path].reshape(-1)[indices[path]])
        return session

    def conformance_example(self) -> Any:
        """The conformance kit's example: a graft learned for real on its tiny model from a fine-tuned copy; the
        kit's own ``train`` (no data, ``epochs = 0``) takes the base patch of that graft, saved under the
        system's temporary folder (overwritten each time)."""
        import tempfile
        from pathlib import Path

        from adapterfmt.authoring.conformance import Example
        from adapterfmt.tiny import TinyConfig, build_tiny

        model = build_tiny(0, TinyConfig(vocab_size=32, hidden=16, layers=1, heads=2, intermediate=32))
        gen = torch.Generator().manual_seed(0)
        targets = {"target_modules": ["q_proj", "v_proj", "down_proj"]}
        ft = copy.deepcopy(model)
        with torch.no_grad():
            for m in af.select_targets(ft, targets).values():
                m.weight.add_(0.05 * torch.randn(m.weight.shape, generator=gen))
        data = [torch.randint(0, 32, (4, 6), generator=gen) for _ in range(2)]

        def loss_fn(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())

        session = self.train(copy.deepcopy(model), config={**targets, "density": 0.1, "epochs": 2, "mask_lr": 1e4},
                             finetuned=ft, loss_fn=loss_fn, batches=data)
        adapter = session.extract()
        session.remove()
        patch = af.save(adapter, Path(tempfile.gettempdir(), "adapterfmt-conformance-grafting.safetensors"),
                        overwrite=True)
        return Example(model, adapter, torch.randint(0, 32, (3, 5), generator=gen),
                       train_config={**targets, "finetuned_from": str(patch), "epochs": 0})

    @staticmethod
    def mask(gamma: torch.Tensor, logits: torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
        return gamma.float() + (1 - 2 * gamma.float()) * torch.sigmoid(logits - cfg["sigmoid_bias"])

    def learn(self, model: nn.Module, chosen: dict[str, nn.Module], tau: dict[str, torch.Tensor],
              gamma: dict[str, torch.Tensor], logits: dict[str, torch.Tensor], cfg: dict[str, Any], loss_fn: LossFn,
              data: list[Any], score_fn: Callable[[nn.Module], float] | None) -> dict[str, torch.Tensor]:
        """The mask-learning loop (updates ``logits`` in place); returns the chosen rounded graft per module."""
        if cfg["epochs"] and not data:
            raise af.FormatError("grafting got no batch")
        weights = {p: m.weight for p, m in chosen.items()}
        start = {p: w.detach().clone() for p, w in weights.items()}
        params = list(model.parameters())
        saved = [(p.requires_grad, p.grad) for p in params]
        for p in params:
            p.requires_grad_(False)

        def set_weights(masks: dict[str, torch.Tensor]) -> None:
            with torch.no_grad():
                for p, w in weights.items():
                    w.copy_((start[p].float().reshape(-1) + masks[p] * tau[p].reshape(-1)).reshape(w.shape))

        best, best_score = None, -math.inf
        try:
            for _ in range(cfg["epochs"]):
                set_weights({p: self.mask(gamma[p], logits[p], cfg) for p in weights})
                for w in weights.values():
                    w.requires_grad_(True)
                    w.grad = None
                for batch in data:
                    loss_fn(model, batch).backward()
                for p, w in weights.items():
                    w.requires_grad_(False)
                    g = cfg["mask_lr"] * w.grad.float().reshape(-1) / len(data) * tau[p].reshape(-1)
                    s = torch.sigmoid(logits[p] - cfg["sigmoid_bias"])
                    logits[p] -= (1 - 2 * gamma[p].float()) * g * s * (1 - s)
                    w.grad = None
                if score_fn is not None:
                    rounded = {p: torch.round(self.mask(gamma[p], logits[p], cfg)) for p in weights}
                    set_weights(rounded)
                    with torch.no_grad():
                        score = float(score_fn(model))
                    if score > best_score:
                        best, best_score = {p: r.bool() for p, r in rounded.items()}, score
            return best or {p: torch.round(self.mask(gamma[p], logits[p], cfg)).bool() for p in weights}
        finally:
            with torch.no_grad():
                for p, w in weights.items():
                    w.copy_(start[p])
            for p, (flag, grad) in zip(params, saved, strict=True):
                p.requires_grad_(flag)
                p.grad = grad


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [SparseFT(), StructuredFT(), Spiel(), LTSFT(), Grafting()]


__all__ = ["SparseFT", "StructuredFT", "function_2d", "gradient_scores", "stored_indices"]
