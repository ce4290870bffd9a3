"""Training procedures on the train-session hooks: TriAdaptLoRA (rank growth), DiffoRA (module selection) and
S2-LoRA (factors shared across layers, sparse per-layer coefficients).

All three are stored as kind ``lowrank`` (spec 6.2), so apply / merge / compress / port are the kind's generic
verbs; this plugin supplies ``train`` (``nn.Linear`` and GPT-2 ``Conv1D``) and the regularisers. Their schedules
run from :meth:`TrainSession.step` and ``adapter train`` checkpoints them (:class:`RankGrowth`,
:class:`DiffoRASelection`); S2-LoRA has none. All three resume exactly.

**TriAdaptLoRA** (arXiv 2501.08008). Source: the only implementation found, a PEFT fork's
``tuners/triadaptlora.py`` (``TriAdaptLoraConfig`` / ``RankAllocator``); the paper's text beyond its abstract was
not available here. ``dW = alpha / (r + 1e-5) * B C A`` with ``r`` the current rank (``alpha <= 0``: ``init_rank``,
as the fork); ``A`` and ``B`` are block lists (``init_rank`` rows / columns first, ``incre_rank_num`` per growth)
and ``C`` (r x r) the sum of a block-lower part (each growth's new rows ``[k, r]``) and a block-upper part (its new
columns ``[r, k]``): the triangular split. Importance of a module: the change since the last evaluation of
``||C||_F / blocks`` (the normalised Frobenius norm). After each optimizer step ``t`` with ``t > init_warmup``, ``t
% incre_interval == 0`` and the total rank below ``target_total_rank`` (default ``reference_rank`` x modules),
every module whose importance reaches the threshold grows by ``incre_rank_num`` (default ``reference_rank / 2``):
the threshold is the n-th largest importance, ``n = int((target - total) * c)`` (``linear``) or ``int(exp(c *
log(target - total)))`` (``non-linear``), ``c = (t - init_warmup) / (total_step - init_warmup)``, at least 1. New
blocks join the optimizer's first parameter group, so the run's learning-rate schedule reaches them (the fork adds
a group of its own, which a scheduler built before the growth does not follow, and torch 2.13's refuses).
Regulariser: ``orth_reg_weight`` times the mean over modules of ``||A A^T - I||_F`` and ``||B^T B - I||_F``.
**Deviation**: the fork initialises every block of A, B and C at zero (only A's first block N(0, 0.02)), so every
gradient is zero and it never trains; here A and B blocks are N(0, 0.02) (the fork's commented-out lines; AdaLoRA's
P and Q, from which it derives) and C blocks zero, so dW starts at 0 and C gets a gradient. A and B blocks are drawn
from the session's own generator (:attr:`TriangularSession.generator`), so growth is the same in every process of a
data-parallel run, and in one process, whatever dropout draws.

**DiffoRA** (arXiv 2502.08905). No code was found and only the abstract was readable: a differentiable
adaption matrix (DAM) chooses the modules to fine-tune by continuous relaxation, then discretisation, with the
weights shared. Our concrete reading, DARTS-style: each candidate module carries LoRA (A kaiming, B zero) and
two logits over {no update, LoRA}; its update is ``softmax(logits)[1] * dW``. For the first ``search_steps``
optimizer steps the search runs as first-order DARTS (``search: "alternate"``, the default): even steps update
the factors, odd steps the logits, each on its own batch, so the logits learn on data the factors did not just
fit (:meth:`TrainSession.after_backward` drops the other gradients; a loop that does not call it trains both
together, as ``search: "joint"`` does); then the ``select_ratio`` share of modules with the largest LoRA weight keep their factors (the
weight folded into B, so the function is unchanged) and train on; the others are dropped. An adapter extracted
during the search stores every module with its weight folded in.

**S2-LoRA** (sparse, shared). No code was found and no text readable; we follow the description: per group of
modules with the same name across layers (``layers.N`` replaced) and shape, one trained ``A [r, in]`` and ``B
[out, r]``; per module a trained coefficient vector ``lambda [r]`` (initialised to 1; A kaiming, B zero) with
``dW_l = alpha / r * B diag(lambda_l) A`` and the L1 penalty ``l1 * sum_l |lambda_l|_1``. Stored without waste:
``A`` and ``B`` once per group through ``params.shared`` (spec 5), ``lambda`` as each module's ``lora_mid``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import adapterfmt as af

SUPPORTED = (nn.Linear, "Conv1D")
BASE = {"alpha": {"type": "number"}, "dropout": {"type": "number", "minimum": 0, "maximum": 1}, **af.TARGETS_SCHEMA}


def _kaiming(*shape: int) -> torch.Tensor:
    t = torch.empty(*shape)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t


def _fshape(module: nn.Module) -> tuple[int, int]:
    out, n_in = af.function_shape(af.module_entry("lowrank", module))
    return out, n_in


# ----- TriAdaptLoRA -------------------------------------------------------------------------------------------
class TriangularDelta(af.TrainableDelta):
    """A lowrank delta whose rank grows: blocks of A, B and the two triangular parts of C (module docstring)."""

    def __init__(self, entry: dict[str, Any], module: nn.Module, rank: int, alpha: float, dropout: float,
                 generator: torch.Generator) -> None:
        super().__init__(entry, {}, dropout=dropout)
        self.shape, self.alpha, self.generator = _fshape(module), alpha, generator
        self.dtype, self.device = af.adapter_dtype(module), module.weight.device
        self.blocks_A, self.blocks_B = nn.ParameterList(), nn.ParameterList()
        self.rows, self.cols = nn.ParameterList(), nn.ParameterList()
        self.previous = 0.0
        self.grow(rank)
        self.importance()

    @property
    def rank(self) -> int:
        return sum(a.shape[0] for a in self.blocks_A)

    def grow(self, k: int) -> list[nn.Parameter]:
        """Add ``k`` ranks (new blocks); returns the new parameters."""
        out, n_in = self.shape
        size = self.rank + k
        gen = self.generator
        new = [nn.Parameter(t.to(device=self.device, dtype=self.dtype)) for t in (
            torch.randn(k, n_in, generator=gen) * 0.02, torch.randn(out, k, generator=gen) * 0.02,
            torch.zeros(k, size), torch.zeros(size, k))]
        for plist, p in zip((self.blocks_A, self.blocks_B, self.rows, self.cols), new):
            plist.append(p)
        self.entry["params"]["scale"] = self.alpha / (size + 1e-5)
        return new

    def mid(self) -> torch.Tensor:
        """``C``: the block rows padded on the right plus the block columns padded below."""
        r = self.rank
        lower = torch.cat([F.pad(row, (0, r - row.shape[1])) for row in self.rows], 0)
        upper = torch.cat([F.pad(col, (0, 0, 0, r - col.shape[0])) for col in self.cols], 1)
        return lower + upper

    def importance(self) -> float:
        """The change of ``||C||_F / blocks`` since the last call."""
        with torch.no_grad():
            norm = float(torch.linalg.norm(self.mid().float())) / len(self.rows)
        score, self.previous = norm - self.previous, norm
        return score

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A": torch.cat(list(self.blocks_A), 0), "lora_B": torch.cat(list(self.blocks_B), 1),
                "lora_mid": self.mid()}

    def stored(self) -> dict[str, torch.Tensor]:
        return self.tensors()

    def block_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"{name}_{i}", p) for name, plist in (("A", self.blocks_A), ("B", self.blocks_B),
                                                       ("C_rows", self.rows), ("C_cols", self.cols))
                for i, p in enumerate(plist)]


class TriangularSession(af.TrainSession):
    """Parameters are the blocks of every module (``path.A_0``, ``path.C_rows_1`` ...)."""

    built: torch.optim.Optimizer | None = None
    """The last optimizer :meth:`optimizer` built: a restored schedule adds the blocks it regrows to it."""
    generator: torch.Generator
    """Draws every block of A and B (seeded from torch's global generator when the session is built), so the
    blocks a growth adds do not depend on the dropout draws, which differ between the processes of a run."""

    def optimizer(self, **kwargs: Any) -> torch.optim.Optimizer:
        self.built = super().optimizer(**kwargs)
        return self.built

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for path, layer in self.layers.items():
            for name, p in layer.block_parameters():
                yield f"{path}.{name}", p


class TriAdaptLoRA(af.Method):
    name = "triadaptlora"
    summary = "TriAdaptLoRA: dW = s B C A with C split into triangular blocks; rank grows by importance thresholds"
    kinds = ("lowrank",)
    defaults: ClassVar[dict[str, Any]] = {"alpha": 8, "dropout": 0.0, "init_rank": 1, "reference_rank": 8,
                                "incre_rank_num": None, "target_total_rank": None, "init_warmup": 0,
                                "incre_interval": 1, "total_step": 1000, "rank_growth_model": "linear",
                                "orth_reg_weight": 0.5}
    config_schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": {
        **BASE, "init_rank": {"type": "integer", "minimum": 1}, "reference_rank": {"type": "integer", "minimum": 1},
        "incre_rank_num": {"type": ["integer", "null"], "minimum": 1},
        "target_total_rank": {"type": ["integer", "null"], "minimum": 1},
        "init_warmup": {"type": "integer", "minimum": 0}, "incre_interval": {"type": "integer", "minimum": 1},
        "total_step": {"type": "integer", "minimum": 1}, "rank_growth_model": {"enum": ["linear", "non-linear"]},
        "orth_reg_weight": {"type": "number", "minimum": 0}}}

    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> af.TrainSession:
        """Inject rank-``init_rank`` deltas and the growth schedule (module docstring)."""
        cfg = {**self.defaults, **config}
        self.check_config(cfg)
        if cfg["total_step"] <= cfg["init_warmup"]:
            raise af.FormatError(f"{self.name} config field total_step: must exceed init_warmup ({cfg['init_warmup']})")
        chosen = af.select_targets(model, cfg, supported=SUPPORTED)
        session = TriangularSession(model, self.name, cfg)
        session.generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
        for path, module in chosen.items():
            entry = af.module_entry("lowrank", module, {"scale": 1.0})
            alpha = cfg["alpha"] if cfg["alpha"] > 0 else cfg["init_rank"]
            session.add(path, module, TriangularDelta(entry, module, cfg["init_rank"], alpha, cfg["dropout"],
                                                      session.generator))
        session.on_step(RankGrowth(session, cfg))
        return session

    def regularization(self, session: Any, **outputs: Any) -> torch.Tensor:
        """``orth_reg_weight`` times ``af.orthonormality`` of every module's assembled A and B."""
        pairs = [(t["lora_A"], t["lora_B"]) for t in (layer.tensors() for layer in session.layers.values())]
        return session.config["orth_reg_weight"] * af.orthonormality(pairs)


class RankGrowth:
    """TriAdaptLoRA's step hook: the rank growth (module docstring). Its state (the growths in order, every
    block, the last importances) is checkpointed; restoring it regrows the blocks in the same order, adding
    them to the session's optimizer (:attr:`TriangularSession.built`) as the run did and drawing what the run drew
    from the session's generator, which then goes on as the run's. The last importances decide the next growth
    (each module's change since them)."""

    def __init__(self, session: TriangularSession, cfg: dict[str, Any]) -> None:
        self.session, self.cfg = session, cfg
        self.step_k = cfg["incre_rank_num"] or max(1, cfg["reference_rank"] // 2)
        self.target = cfg["target_total_rank"] or cfg["reference_rank"] * len(session.layers)
        self.growths: list[list[str]] = []

    @property
    def layers(self) -> dict[str, TriangularDelta]:
        return self.session.layers  # type: ignore[return-value]

    def __call__(self, optimizer: torch.optim.Optimizer | None) -> None:
        t, cfg = self.session.steps, self.cfg
        total = sum(layer.rank for layer in self.layers.values())
        if total >= self.target or t <= cfg["init_warmup"] or t % cfg["incre_interval"]:
            return
        scores = {path: layer.importance() for path, layer in self.layers.items()}
        threshold = growth_threshold(list(scores.values()), t, total, self.target, cfg)
        self.grow([path for path in self.layers if scores[path] >= threshold], optimizer)

    def grow(self, paths: list[str], optimizer: torch.optim.Optimizer | None) -> None:
        new = [p for path in paths for p in self.layers[path].grow(self.step_k)]
        self.growths.append(paths)
        if optimizer is not None:
            optimizer.param_groups[0]["params"].extend(new)

    def state_dict(self) -> dict[str, Any]:
        return {"growths": [list(g) for g in self.growths],
                "previous": {path: layer.previous for path, layer in self.layers.items()},
                "blocks": {path: [p.detach().cpu() for _, p in layer.block_parameters()]
                           for path, layer in self.layers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into a fresh session of the same modules, before its optimizer's state."""
        if set(state["blocks"]) != set(self.layers) or self.growths:
            raise af.FormatError("triadaptlora: the schedule state does not fit this session (other modules, or "
                                 "grown already)")
        for paths in state["growths"]:
            self.grow(paths, self.session.built)  # type: ignore[attr-defined]
        with torch.no_grad():
            for path, layer in self.layers.items():
                for (_, p), saved in zip(layer.block_parameters(), state["blocks"][path], strict=True):
                    p.copy_(saved)
                layer.previous = state["previous"][path]


def growth_threshold(scores: list[float], step: int, total: int, target: int, cfg: dict[str, Any]) -> float:
    """The importance a module needs to grow at ``step`` (the fork's ``compute_threshold``)."""
    c = (step - cfg["init_warmup"]) / (cfg["total_step"] - cfg["init_warmup"])
    if cfg["rank_growth_model"] == "linear":
        n = int((target - total) * c)
    else:
        n = int(math.exp(c * math.log(target - total)))
    n = min(max(n, 1), len(scores))
    return sorted(scores, reverse=True)[n - 1]


# ----- DiffoRA ------------------------------------------------------------------------------------------------
class GatedDelta(af.TrainableDelta):
    """LoRA whose update is weighted by ``softmax(gate)[1]`` while the search runs."""

    def __init__(self, entry: dict[str, Any], params: dict[str, torch.Tensor], dropout: float) -> None:
        super().__init__(entry, params, dropout=dropout)
        self.gate = nn.Parameter(torch.zeros(2, dtype=params["lora_A"].dtype))
        self.searching = True

    def weight(self) -> torch.Tensor:
        return torch.softmax(self.gate, 0)[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        t = super().tensors()
        if self.searching:
            t["lora_B"] = t["lora_B"] * self.weight()
        return t

    def stored(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors().items() if k in ("lora_A", "lora_B")}

    def settle(self) -> None:
        """End the search: fold the weight into B and stop training the gate."""
        with torch.no_grad():
            self.weights.lora_B.mul_(self.weight())
        self.searching = False
        self.gate.requires_grad_(False)


class GatedSession(af.TrainSession):
    """Parameters: every delta's factors, and its gate (``path.gate``) while the search runs."""

    def after_backward(self) -> None:
        """The session's hooks, then, in an alternating search, the gates' gradients dropped on even steps and
        the factors' on odd ones."""
        super().after_backward()
        if self.config["search"] != "alternate":
            return
        arch = self.steps % 2 == 1
        for layer in self.layers.values():
            if layer.searching:
                for p in [layer.gate] if not arch else [p for _, p in layer.weights.items()]:
                    p.grad = None

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield from super().named_parameters()
        for path, layer in self.layers.items():
            if layer.searching:
                yield f"{path}.gate", layer.gate


class DiffoRA(af.Method):
    name = "diffora"
    summary = "DiffoRA: a differentiable choice of the modules to adapt (DARTS-like), then LoRA on the chosen ones"
    kinds = ("lowrank",)
    defaults: ClassVar[dict[str, Any]] = {"r": 8, "alpha": 8, "dropout": 0.0, "select_ratio": 0.5, "search_steps": 100,
                                          "search": "alternate"}
    config_schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": {
        **BASE, "r": {"type": "integer", "minimum": 1},
        "select_ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "search_steps": {"type": "integer", "minimum": 1}, "search": {"enum": ["alternate", "joint"]}}}

    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> af.TrainSession:
        """LoRA with gates on every candidate; the selection after ``search_steps`` steps (module docstring)."""
        cfg = {**self.defaults, **config}
        self.check_config(cfg)
        chosen = af.select_targets(model, cfg, supported=SUPPORTED)
        session = GatedSession(model, self.name, cfg)
        r = cfg["r"]
        for path, module in chosen.items():
            out, n_in = _fshape(module)
            dtype = af.adapter_dtype(module)
            entry = af.module_entry("lowrank", module, {"scale": cfg["alpha"] / r})
            params = {"lora_A": _kaiming(r, n_in).to(dtype), "lora_B": torch.zeros(out, r, dtype=dtype)}
            session.add(path, module, GatedDelta(entry, params, cfg["dropout"]))

        session.on_step(DiffoRASelection(session, cfg))
        return session


class DiffoRASelection:
    """DiffoRA's step hook: the selection after ``search_steps`` steps; its state (the gates, the modules
    dropped, whether the search runs) is checkpointed, the factors B a search scales are saved by the session
    (``TrainSession.unstored``)."""

    def __init__(self, session: af.TrainSession, cfg: dict[str, Any]) -> None:
        self.session, self.cfg = session, cfg
        self.candidates: dict[str, GatedDelta] = dict(session.layers)  # type: ignore[arg-type]

    def __call__(self, optimizer: torch.optim.Optimizer | None) -> None:
        if self.session.steps != self.cfg["search_steps"]:
            return
        for path in diffora_selection(self.session, self.cfg["select_ratio"])[1]:
            self.session.drop(path)
        for layer in self.session.layers.values():
            layer.settle()

    def state_dict(self) -> dict[str, Any]:
        kept = self.session.layers
        return {"dropped": [p for p in self.candidates if p not in kept],
                "searching": all(layer.searching for layer in kept.values()),
                "gates": {p: layer.gate.detach().cpu() for p, layer in self.candidates.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into a fresh session of the same candidates (before its factors are
        restored: the dropped modules are not in the checkpoint's adapter)."""
        if set(state["gates"]) != set(self.candidates) or not set(state["dropped"]) <= set(self.session.layers):
            raise af.FormatError("diffora: the schedule state names other modules than this session's")
        for path in state["dropped"]:
            self.session.drop(path)
        with torch.no_grad():
            for path, layer in self.candidates.items():
                layer.gate.copy_(state["gates"][path])
                if not state["searching"]:
                    layer.searching = False
                    layer.gate.requires_grad_(False)


def diffora_selection(session: af.TrainSession, ratio: float) -> tuple[list[str], list[str]]:
    """``(kept, dropped)`` module paths: the ``ceil(ratio * n)`` largest LoRA weights kept (ties: path order)."""
    weights = {path: float(layer.weight().detach()) for path, layer in session.layers.items()}
    order = sorted(weights, key=lambda p: -weights[p])
    k = max(1, math.ceil(ratio * len(order) - 1e-9))
    return order[:k], order[k:]


# ----- S2-LoRA ------------------------------------------------------------------------------------------------
def share_group(path: str, shape: tuple[int, int]) -> str:
    """The group of modules that share factors: the path with its layer index (first all-digit part) as ``N``,
    and the shape."""
    parts = path.split(".")
    i = next((j for j, s in enumerate(parts) if s.isdigit()), None)
    if i is not None:
        parts[i] = "N"
    return f"{'.'.join(parts)}.{shape[0]}x{shape[1]}"


class S2LoRA(af.Method):
    name = "s2_lora"
    summary = "S2-LoRA: A and B shared by a module's copies across layers, per-layer rank coefficients with L1"
    kinds = ("lowrank",)
    defaults: ClassVar[dict[str, Any]] = {"r": 8, "alpha": 8, "dropout": 0.0, "l1": 1e-3}
    config_schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": {
        **BASE, "r": {"type": "integer", "minimum": 1}, "l1": {"type": "number", "minimum": 0}}}

    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> af.TrainSession:
        """Shared trained factors per group, a coefficient vector per module (module docstring)."""
        cfg = {**self.defaults, **config}
        self.check_config(cfg)
        r, groups = cfg["r"], {}

        def build(path: str, module: nn.Module) -> af.TrainableDelta:
            shape, dtype = _fshape(module), af.adapter_dtype(module)
            device = module.weight.device
            group = share_group(path, shape)
            if group not in groups:
                groups[group] = (nn.Parameter(_kaiming(r, shape[1]).to(device=device, dtype=dtype)),
                                 nn.Parameter(torch.zeros(shape[0], r, device=device, dtype=dtype)))
            a, b = groups[group]
            entry = af.module_entry("lowrank", module, {"scale": cfg["alpha"] / r})
            return af.TrainableDelta(entry, {"lora_mid": torch.ones(r, dtype=dtype)}, dropout=cfg["dropout"],
                                     shared={"lora_A": (f"{group}.lora_A", a), "lora_B": (f"{group}.lora_B", b)})

        return af.inject(model, method=self.name, config=cfg, build=build, supported=SUPPORTED)

    def regularization(self, session: Any, **outputs: Any) -> torch.Tensor:
        """``l1`` times the sum over modules of ``|lambda|_1``."""
        terms = [layer.weights.lora_mid.abs().sum() for layer in session.layers.values()]
        return session.config["l1"] * torch.stack(terms).sum()


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [TriAdaptLoRA(), DiffoRA(), S2LoRA()]
