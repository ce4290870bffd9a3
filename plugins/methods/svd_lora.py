"""SVD-structured LoRA methods: PiSSA, OLoRA, KaSA, SORSA, LoLDU, NLoRA, IntTune, SLoRA, LaMDA and BA-LoRA.

All are stored as kind ``lowrank`` with spec 1.2's middle factor (``lora_mid``) and base-derived part
(``params.base_part``, spec 6.2.1), so apply / merge / compress / port are the kind's generic verbs; this
plugin supplies ``train`` (``nn.Linear`` modules) and, for KaSA, SORSA and BA-LoRA, ``regularization``. ``s`` is
``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora`` where PEFT has it); ``W`` the base weight.

======== ============================================================ ===================== ====================
method   initialisation (from ``W``)                                  trained               stored
======== ============================================================ ===================== ====================
pissa    PEFT ``"pissa"``: ``B A`` = top-r SVD with ``sqrt(S/s)`` on   A, B                  A, B (+ init A0, B0
         each side; dW = ``s (B A - B0 A0)``                                                explicit)
olora    PEFT ``"olora"``: ``B = Q_r``, ``A = R_r`` of ``qr(W)``;       A, B                  A, B (+ init)
         dW = ``s (B A - Q_r R_r)``
kasa     PEFT ``kasa_config``: the r smallest singular triplets of W    A, B, diag            A, B, diag (+ init)
         are dropped; dW = ``s B diag(d) A - P_bottom``; A kaiming,
         B 0, d ~ N(0, 1)
sorsa    ``sorsa`` 1.0.1: ``A = V_r^T``, ``S = S_r``, ``B = U_r``;        A, S, B               A, S, B (+ init)
         dW = ``s (B diag(S) A - U_r S_r V_r^T)``, ``s = alpha / r``
         (1 without alpha)
loldu    ``W = P L D U`` (LoLDU): ``B0 = P L_r``, ``A0 = U_r`` frozen,   z                     z (r numbers; the
         ``z = D_r``; dW = ``s B0 diag(z) A0 - s B0 diag(D_r) A0``                          factors are derived)
nlora    NLoRA fork: ``A = W[:r]``, ``B = W[:, :r]``, ``N = W[:r, :r]``;   A, N, B               A, N, B
         the base is untouched, dW = ``s B N A``
inttune  NLoRA's init, A and B frozen: dW = ``s W[:, :r] N W[:r]``      N                     N (r x r numbers)
slora    A kaiming, B 0, N kaiming (r x r); dW = ``s B N A``             A, N, B               A, N, B
lamda    LaMDA as released: A kaiming (frozen), B 0, sigma kaiming      sigma, B (columns     A, sigma, B
         (r x r); dW = ``s B sigma A``; B's first ``t`` columns get      frozen on schedule)
         no gradient, ``t = floor(step / (eta * max_steps))``
ba_lora  PiSSA's init (the reference trains PEFT ``"pissa"`` with       A, B                  as pissa
         ``lora_alpha = r``: ``alpha`` defaults to ``r``), plus three
         regularisers on the logits (below)
======== ============================================================ ===================== ====================

PiSSA, OLoRA, KaSA and SORSA store their base part explicitly by default (``base_part: "explicit"``: the
initial factors as ``init_*``, base-independent); ``"derived"`` stores only the recipe (``svd_top``, ``qr``,
``svd_bottom``), which readers recompute from the base after checking its fingerprint, and falls back to the
explicit form where the spectral gap at the cut is below the spec's writer threshold. LoLDU and IntTune are
always derived (``ldu`` with its pivot rows, ``nystrom`` with scale 0), which is what makes them small.

Regularisers (:meth:`Method.regularization`, via ``session.regularization()``): KaSA's ``beta * sum d^2 +
gamma * (||B^T B - I||_F + ||A A^T - I||_F)`` summed over layers (PEFT ``_get_kasa_loss``); SORSA's
orthonormality, the mean over layers' A and B of ``||A A^T - I||_F`` and ``||B^T B - I||_F`` (``calc_ortho``),
times ``ortho_weight``. The SORSA trainer adds its gradient, scaled by ``gamma / lr``, after gradient clipping
and just before the optimizer step; a loop that wants exactly that backpropagates the term separately.
BA-LoRA's terms need the logits of the adapted model and of the base with the adapter off:
``session.regularization(logits=..., base_logits=...)`` (:func:`ba_lora_regularization`).

:func:`reduce_intruder_dimension` is PEFT's post-hoc intruder-dimension repair of a plain LoRA, given the base.

Not reproduced: LoLDU's trainable scalar (the authors' README recipe trains only ``z``, and their saved state
keeps only ``z``), LaMDA's singular-vector initialisation of its paper (the released code inits as LoRA) and
LaMDA++'s rank allocation (no released code).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

import adapterfmt as af

SUPPORTED = (nn.Linear,)
BASE = {"r": {"type": "integer", "minimum": 1}, "alpha": {"type": "number"},
        "dropout": {"type": "number", "minimum": 0, "maximum": 1}, **af.TARGETS_SCHEMA}
FORM = {"base_part": {"enum": ["explicit", "derived"]}}


def _kaiming(*shape: int) -> torch.Tensor:
    """``nn.init.kaiming_uniform_(a=sqrt(5))`` (PEFT's lora_A, ``nn.Linear``'s default)."""
    t = torch.empty(*shape)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t


def _weight(module: nn.Module) -> torch.Tensor:
    return af.function_weight(module).detach()  # a quantised base's dequantised weight


class SvdMethod(af.Method):
    """Shared ``train``: per module, :meth:`init` gives the entry params, trained, frozen and derived tensors."""

    kinds = ("lowrank",)
    defaults: dict[str, Any] = {"r": 8, "alpha": 8, "dropout": 0.0}
    config_schema: dict[str, Any] = {"type": "object", "properties": BASE}

    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> af.TrainSession:
        """Inject the method into the ``nn.Linear`` modules ``config`` selects (module docstring)."""
        cfg = {**self.defaults, **config}
        self.check_config(cfg)
        session = af.inject(model, method=self.name, config=cfg, build=lambda p, m: self.layer(p, m, cfg),
                            supported=SUPPORTED)
        self.schedule(session, cfg)
        return session

    def schedule(self, session: af.TrainSession, cfg: dict[str, Any]) -> None:
        """Per-step work of the method (none by default)."""

    def layer(self, path: str, module: nn.Module, cfg: dict[str, Any]) -> af.TrainableDelta:
        w = _weight(module)
        r = cfg["r"]
        if r > min(w.shape):
            raise af.UnsupportedError(f"module {path!r}: {self.name} rank {r} exceeds min(out, in) = {min(w.shape)}")
        params, trained, frozen = self.init(path, w, cfg)
        entry = af.module_entry("lowrank", module, params)
        derived = af.derived_tensors(entry, w, dtype=torch.float32)
        dtype = af.adapter_dtype(module)
        cast = {k: v.to(dtype) for k, v in trained.items()}
        return af.TrainableDelta(entry, cast, frozen={k: v.to(dtype) for k, v in frozen.items()},
                                 derived={k: v.to(dtype) for k, v in derived.items()}, dropout=cfg["dropout"])

    def init(self, path: str, w: torch.Tensor, cfg: dict[str, Any]
             ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(entry params, trained roles, frozen stored roles)`` of one module with base weight ``w``."""
        raise NotImplementedError

    @staticmethod
    def part(cfg: dict[str, Any], w: torch.Tensor, recipe: str, c: float, factors: tuple[torch.Tensor, ...]
             ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The base part: derived (``recipe``) when asked and well defined, else explicit (``factors`` =
        ``(A0, B0[, mid0])`` stored as ``init_*``)."""
        r = factors[0].shape[0]
        if cfg.get("base_part") == "derived" and af.recipe_writable(w, recipe, r):
            return {"scale": c, "recipe": recipe, "rank": r}, {}
        stored = {"init_A": factors[0].clone(), "init_B": factors[1].clone()}
        if len(factors) > 2:
            stored["init_mid"] = factors[2].clone()
        return {"scale": c}, stored


class PiSSA(SvdMethod):
    name = "pissa"
    summary = "PiSSA: LoRA initialised on the principal singular triplets of W, which the base gives up"
    defaults = {**SvdMethod.defaults, "use_rslora": False, "base_part": "explicit"}
    config_schema = {"type": "object", "properties": {**BASE, **FORM, "use_rslora": {"type": "boolean"}}}

    def init(self, path: str, w: torch.Tensor, cfg: dict[str, Any]) -> tuple[dict, dict, dict]:
        s = af.lora_scale(cfg["alpha"], cfg["r"], cfg["use_rslora"])
        a, b = af.pissa_factors(w, cfg["r"], s)
        part, frozen = self.part(cfg, w, "svd_top", s, (a, b))
        if "recipe" in part:  # the recipe's part is U_r S_r V_r^T = s * B0 A0
            part["scale"] = 1.0
        return {"scale": s, "base_part": part}, {"lora_A": a, "lora_B": b}, frozen


class OLoRA(SvdMethod):
    name = "olora"
    summary = "OLoRA: LoRA initialised on the QR factors of W (first r columns), which the base gives up"
    defaults = {**SvdMethod.defaults, "use_rslora": False, "base_part": "explicit"}
    config_schema = {"type": "object", "properties": {**BASE, **FORM, "use_rslora": {"type": "boolean"}}}

    def init(self, path: str, w: torch.Tensor, cfg: dict[str, Any]) -> tuple[dict, dict, dict]:
        s = af.lora_scale(cfg["alpha"], cfg["r"], cfg["use_rslora"])
        a, b = af.olora_factors(w, cfg["r"])
        part, frozen = self.part(cfg, w, "qr", s, (a, b))
        return {"scale": s, "base_part": part}, {"lora_A": a, "lora_B": b}, frozen


class KaSA(SvdMethod):
    name = "kasa"
    summary = "KaSA: the base drops its r smallest singular triplets; dW = scale * B diag(d) A, regularised"
    defaults = {**SvdMethod.defaults, "beta": 1e-4, "gamma": 1e-3, "base_part": "explicit"}
    config_schema = {"type": "object", "properties": {**BASE, **FORM, "beta": {"type": "number", "minimum": 0},
                                                      "gamma": {"type": "number", "minimum": 0}}}

    def init(self, path: str, w: torch.Tensor, cfg: dict[str, Any]) -> tuple[dict, dict, dict]:
        r = cfg["r"]
        if r >= min(w.shape):
            raise af.UnsupportedError(f"module {path!r}: KaSA needs r < min(out, in) = {min(w.shape)}")
        a0, b0 = af.svd_bottom_factors(w, r)
        part, frozen = self.part(cfg, w, "svd_bottom", 1.0, (a0, b0))
        trained = {"lora_A": _kaiming(r, w.shape[1]), "lora_B": torch.zeros(w.shape[0], r), "lora_mid": torch.randn(r)}
        return {"scale": cfg["alpha"] / r, "base_part": part}, trained, frozen

    def regularization(self, session: Any, **outputs: Any) -> torch.Tensor:
        """PEFT's ``_get_kasa_loss``: summed over layers, ``beta * sum(d^2) + gamma * (||B^T B - I||_F +
        ||A A^T - I||_F)``, in fp32."""
        beta, gamma = session.config["beta"], session.config["gamma"]
        total = torch.zeros(())
        for layer in session.layers.values():
            t = layer.tensors()
            a, b, d = t["lora_A"].float(), t["lora_B"].float(), t["lora_mid"].float()
            eye = torch.eye(d.numel(), device=d.device)
            total = total.to(d.device) + beta * d.square().sum() + gamma * (
                torch.linalg.norm(b.t() @ b - eye) + torch.linalg.norm(a @ a.t() - eye))
        return total


class SORSA(SvdMethod):
    name = "sorsa"
    summary = "SORSA: trainable principal singular components (A, S, B) with an orthonormality regulariser"
    defaults = {"r": 8, "alpha": None, "dropout": 0.0, "ortho_weight": 1.0, "base_part": "explicit"}
    config_schema = {"type": "object", "properties": {**BASE, **FORM, "alpha": {"type": ["number", "null"]},
                                                      "ortho_weight": {"type": "number", "minimum": 0}}}

    def init(self, path: str, w: torch.Tensor, cfg: dict[str, Any]) -> tuple[dict, dict, dict]:
        r = cfg["r"]
        s = 1.0 if cfg["alpha"] is None else cfg["alpha"] / r
        u, sv, vt = torch.linalg.svd(w.t(), full_matrices=False)  # as the package: SVD of W^T in W's dtype
        trained = {"lora_A": u[:, :r].t().contiguous(), "lora_mid": sv[:r].clone(), "lora_B": vt[:r].t().contiguous()}
        part, frozen = self.part(cfg, w, "svd_top", s,
                                 (trained["lora_A"], trained["lora_B"], trained["lora_mid"]))
        return {"scale": s, "base_part": part}, trained, frozen

    def regularization(self, session: Any, **outputs: Any) -> torch.Tensor:
        """``ortho_weight`` times ``sorsa.calc_ortho``: the mean over layers' A and B of ``||A A^T - I||_F``
        and ``||B^T B - I||_F``."""
        pairs = [(t["lora_A"], t["lora_B"]) for t in (layer.tensors() for layer in session.layers.values())]
        return session.config["ortho_weight"] * af.orthonormality(pairs)


class LoLDU(SvdMethod):
    name = "loldu"
    summary = "LoLDU: W = P L D U; the LDU factors of rank r frozen (derived from the base), the diagonal trained"

    def init(self, path: str, w: torch.Tensor, cfg: dict[str, Any]) -> tuple[dict, dict, dict]:
        r, s = cfg["r"], cfg["alpha"] / cfg["r"]
        rows = af.ldu_rows(w, r)
        _, m0, _ = af.recipe_factors("ldu", w, r, rows)
        part = {"scale": s, "recipe": "ldu", "rank": r, "rows": rows}
        return {"scale": s, "base_part": part}, {"lora_mid": m0.float()}, {}


class NLoRA(SvdMethod):
    name = "nlora"
    summary = "NLoRA: A, N, B initialised from W's first rows, block and columns (Nystrom); dW = scale * B N A"

    def init(self, path: str, w: torch.Tensor, cfg: dict[str, Any]) -> tuple[dict, dict, dict]:
        r, w = cfg["r"], w.float()
        return ({"scale": cfg["alpha"] / r},
                {"lora_A": w[:r].clone(), "lora_mid": w[:r, :r].clone(), "lora_B": w[:, :r].clone()}, {})


class IntTune(SvdMethod):
    name = "inttune"
    summary = "IntTune: NLoRA's factors frozen (derived from the base), only the r x r middle factor trained"

    def init(self, path: str, w: torch.Tensor, cfg: dict[str, Any]) -> tuple[dict, dict, dict]:
        r = cfg["r"]
        part = {"scale": 0.0, "recipe": "nystrom", "rank": r}
        return {"scale": cfg["alpha"] / r, "base_part": part}, {"lora_mid": w[:r, :r].float().clone()}, {}


class SLoRA(SvdMethod):
    name = "slora"
    summary = "SLoRA: LoRA with a trainable r x r middle factor (A, N kaiming, B zero); dW = scale * B N A"

    def init(self, path: str, w: torch.Tensor, cfg: dict[str, Any]) -> tuple[dict, dict, dict]:
        r = cfg["r"]
        trained = {"lora_A": _kaiming(r, w.shape[1]), "lora_mid": _kaiming(r, r), "lora_B": torch.zeros(w.shape[0], r)}
        return {"scale": cfg["alpha"] / r}, trained, {}


class LaMDA(SvdMethod):
    name = "lamda"
    summary = "LaMDA: A frozen, an r x r sigma and B trained, B's columns frozen one by one on a schedule"
    defaults = {**SvdMethod.defaults, "eta": 0.3, "max_steps": 1000}
    config_schema = {"type": "object", "properties": {**BASE, "eta": {"type": "number", "exclusiveMinimum": 0},
                                                      "max_steps": {"type": "integer", "minimum": 1}}}

    def init(self, path: str, w: torch.Tensor, cfg: dict[str, Any]) -> tuple[dict, dict, dict]:
        r = cfg["r"]
        trained = {"lora_mid": _kaiming(r, r), "lora_B": torch.zeros(w.shape[0], r)}
        return {"scale": cfg["alpha"] / r}, trained, {"lora_A": _kaiming(r, w.shape[1])}

    def schedule(self, session: af.TrainSession, cfg: dict[str, Any]) -> None:
        """``gradual_freeze_B``: after step ``n``, columns ``[:t]`` of every B get no gradient,
        ``t = min(r, floor(n / (eta * max_steps)))`` (one optimizer step per batch). ``n`` is the session's step
        count, so the schedule needs no state of its own: a resumed run continues it, and it is no ``on_step``
        schedule (checkpoints and ``--fsdp`` take it)."""

        def frozen_columns(grad: torch.Tensor) -> torch.Tensor:
            t = lamda_frozen_columns(session.steps, cfg["max_steps"], grad.shape[1], cfg["eta"])
            if t == 0:
                return grad
            grad = grad.clone()
            grad[:, :t] = 0
            return grad

        for layer in session.layers.values():
            layer.weights.lora_B.register_hook(frozen_columns)


def lamda_frozen_columns(step: int, max_steps: int, rank: int, eta: float = 0.3) -> int:
    """LaMDA's schedule: ``min(rank, floor(step / (eta * max_steps)))`` columns of B frozen."""
    return min(rank, int(step / (eta * max_steps)))


class BALoRA(PiSSA):
    name = "ba_lora"
    summary = "BA-LoRA: PiSSA with consistency, diversity and SVD regularisers on the logits"
    defaults = {**PiSSA.defaults, "alpha": None, "task": "nlg", "k": 3, "lambda1": 1e-4, "lambda2": 3e-4,
                "lambda3": 1e-4}
    config_schema = {"type": "object", "properties": {
        **PiSSA.config_schema["properties"], "alpha": {"type": ["number", "null"]}, "task": {"enum": ["nlg", "nlu"]},
        "k": {"type": "integer", "minimum": 1}, **{f"lambda{i}": {"type": "number", "minimum": 0} for i in (1, 2, 3)}}}

    def init(self, path: str, w: torch.Tensor, cfg: dict[str, Any]) -> tuple[dict, dict, dict]:
        return super().init(path, w, {**cfg, "alpha": cfg["r"] if cfg["alpha"] is None else cfg["alpha"]})

    def regularization(self, session: Any, *, logits: torch.Tensor | None = None,
                       base_logits: torch.Tensor | None = None, **outputs: Any) -> torch.Tensor:
        """:func:`ba_lora_regularization` with the session's ``task``, ``k`` and ``lambda1..3``; ``base_logits``
        are the base model's (adapter off) on the same inputs."""
        if logits is None or base_logits is None:
            raise af.UnsupportedError("method 'ba_lora': regularization needs logits= and base_logits= (the base's "
                                      "logits with the adapter off), e.g. from a custom training loop")
        c = session.config
        return ba_lora_regularization(logits, base_logits, task=c["task"], k=c["k"],
                                      lambdas=(c["lambda1"], c["lambda2"], c["lambda3"]))


def ba_lora_regularization(logits: torch.Tensor, base_logits: torch.Tensor, *, task: str = "nlg", k: int = 3,
                           lambdas: tuple[float, float, float] = (1e-4, 3e-4, 1e-4)) -> torch.Tensor:
    """BA-LoRA's ``lambda1 * consistency + lambda2 * diversity + lambda3 * svd`` (``cyp-jlu-ai/BA-LoRA``
    ``train.py``, ``CustomTrainer.compute_loss`` / ``svd_regularization``).

    ``nlg``: consistency ``KL(p_base || p)`` (``kl_div(p.log(), p_base, reduction="batchmean")``: summed, divided
    by the first dimension), diversity ``-entropy`` of ``p`` (mean over positions). ``nlu`` (logits
    ``[batch, classes]``): MSE of the L2-normalised logits, and the sum of squared off-diagonal entries of the
    logits' covariance over the batch, divided by the number of classes. SVD term: ``-sum(top-k singular
    values) / sum(all)`` of the logits flattened to ``[batch, -1]``. The reference's ``svd_regularization``
    crashes as written (it indexes ``s[:, :k]`` on the 1-D vector of singular values); this is its evident
    intent. As in the reference, the singular values are computed without gradient, so the SVD term adds to
    the value but not to the gradient, and ``base_logits`` get no gradient."""
    base_logits = base_logits.detach()
    if task == "nlg":
        p_base, p = torch.softmax(base_logits, -1), torch.softmax(logits, -1)
        consistency = nn.functional.kl_div(p.log(), p_base, reduction="batchmean")
        diversity = (p * torch.log(p + 1e-10)).sum(-1).mean()
    elif task == "nlu":
        if logits.dim() != 2:
            raise af.UnsupportedError(f"method 'ba_lora': task 'nlu' needs logits [batch, classes], got "
                                      f"{list(logits.shape)}")
        norm = nn.functional.normalize
        consistency = nn.functional.mse_loss(norm(logits, dim=-1), norm(base_logits, dim=-1))
        centered = logits - logits.mean(0)
        cov = centered.t() @ centered / (logits.shape[0] - 1)
        diversity = (cov - torch.diag(torch.diag(cov))).square().sum() / logits.shape[1]
    else:
        raise af.UnsupportedError(f"method 'ba_lora': task must be 'nlg' or 'nlu', got {task!r}")
    with torch.no_grad():
        s = torch.linalg.svdvals(logits.reshape(logits.shape[0], -1).float())
        svd = -(s[:k].sum() / (s.sum() + 1e-10))
    l1, l2, l3 = lambdas
    return l1 * consistency + l2 * diversity + l3 * svd


def reduce_intruder_dimension(adapter: af.Adapter, base: nn.Module, *, top_k: int = 10,
                              threshold_epsilon: float = 0.5, mitigation_lambda: float = 0.75
                              ) -> tuple[af.Adapter, dict[str, list[int]]]:
    """The intruder-dimension repair of "LoRA vs Full Fine-tuning: An Illusion of Equivalence", as PEFT's
    ``peft.tuners.lora.intruders.reduce_intruder_dimension`` computes it, per module of ``adapter`` on the
    ``nn.Linear`` of the same path in ``base``: the first ``top_k`` left singular vectors of ``W + dW`` whose
    largest |cosine| with the base's left singular vectors is below ``threshold_epsilon`` are intruders; their
    part of ``W + dW`` is scaled by ``mitigation_lambda``, and the new ``dW / scale`` is refactored at the
    entry's rank (``U sqrt(S)``, ``sqrt(S) V^T``; fp32 for fp16 / bf16 weights, then back to the factors' dtype).
    Returns the new adapter (in memory) and the intruder indices per module (modules without any are kept
    as stored). Only plain ``lowrank`` entries (``lora_A``, ``lora_B``, ``params.scale``) are repaired; any
    other entry is refused, naming the module and what it has."""
    manifest = copy.deepcopy(adapter.manifest)
    tensors = {name: adapter.tensor(name) for name in adapter.tensor_names()}
    found: dict[str, list[int]] = {}
    for path, entry in sorted(adapter.modules.items()):
        t = adapter.module_tensors(path)
        extra = sorted(set(entry.get("params", {})) - {"scale"}) + sorted(set(t) - {"lora_A", "lora_B"})
        if entry["kind"] != "lowrank" or extra:
            what = f"kind {entry['kind']}" if entry["kind"] != "lowrank" else f"field {extra[0]!r}"
            raise af.UnsupportedError(f"intruder repair of module {path!r}: only plain lowrank entries, it has {what}")
        module = base.get_submodule(path)
        if not isinstance(module, nn.Linear):
            raise af.UnsupportedError(f"intruder repair of module {path!r}: the base module is "
                                      f"{type(module).__name__}, not nn.Linear")
        a, b, scale = t["lora_A"], t["lora_B"], float(entry.get("params", {}).get("scale", 1.0))
        w = module.weight.detach().float()
        merged = w + scale * (b.float() @ a.float())
        u_base = torch.linalg.svd(w, full_matrices=False)[0]
        u, s, vh = torch.linalg.svd(merged, full_matrices=False)
        cos = (u.t() @ u_base).abs().max(dim=1).values
        found[path] = torch.where(cos[:top_k] < threshold_epsilon)[0].tolist()
        if not found[path]:
            continue
        idx = found[path]
        repaired = merged + (mitigation_lambda - 1) * ((u[:, idx] * s[idx]) @ vh[idx])
        u2, s2, vh2 = torch.linalg.svd((repaired - w) / scale, full_matrices=False)
        root = s2[:a.shape[0]].sqrt()
        tensors = {n: v for n, v in tensors.items() if not n.startswith(f"{path}.")}  # codec parts too
        tensors[f"{path}.lora_B"] = (u2[:, :a.shape[0]] * root).to(b.dtype).contiguous()
        tensors[f"{path}.lora_A"] = (root[:, None] * vh2[:a.shape[0]]).to(a.dtype).contiguous()
        manifest["modules"][path].pop("encoding", None)
    manifest.setdefault("provenance", []).append({"tool": "adapterfmt intruder repair", "top_k": top_k,
                                                  "threshold_epsilon": threshold_epsilon,
                                                  "mitigation_lambda": mitigation_lambda})
    return af.Adapter(manifest, tensors), found


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [PiSSA(), OLoRA(), KaSA(), SORSA(), LoLDU(), NLoRA(), IntTune(), SLoRA(), LaMDA(), BALoRA()]
