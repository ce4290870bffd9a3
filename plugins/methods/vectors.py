"""Representation scales and offsets: IA3 (learned rescaling) and LoFiT (learned head offsets), kind ``vector``.

IA3's ``train`` injects one ``vector`` per targeted module, initialised to ones: modules matched by
``feedforward_modules`` (same rules as ``target_modules``) scale their *input*, the others their output.

LoFiT (Yin, Ye and Durrett, NeurIPS 2024; reference code github.com/fc2869/lo-fit) adapts a model at a few
attention heads. ``target_modules`` names the modules whose *input* is the heads' concatenated outputs
(Llama's ``o_proj``, GPT-2's ``attn.c_proj``), split into heads of ``head_dim`` channels (default: the
model config's ``head_dim``, else ``hidden_size // num_attention_heads``). ``train`` does:

1. head selection (``selection: scale``, the default; needs ``train(..., loss_fn=, batches=)``): every
   head gets scaling factors A, the head's output becoming ``(1 + A) * x``, with ``A ~ N(0, 1e-3)``;
   A is trained (one AdamW step per batch, no weight decay, learning rate ``selection_lr`` decayed
   linearly to 0, gradient norm clipped to 1: the Hugging Face Trainer defaults the reference runs
   under) on ``loss_fn(model, batch) + l1 * sum |A|``, then the ``top_k_heads`` heads over all modules
   with the largest L2 norm of A are chosen (:func:`rank_heads`) and A is dropped. ``selection: random``
   draws the heads uniformly instead (seeded by ``seed``); ``config.heads`` ``{module: [head, ...]}``
   gives them (``selection: given``, implied).
2. the returned session trains offsets v on the chosen heads only: ``v ~ N(0, 1e-3)`` there and exactly
   0 on every other channel, whose gradients are zeroed. Train it with any loop over
   ``session.parameters()``.

The chosen heads are recorded as ``config.heads``, and only modules with a chosen head get an entry
(``op: offset``, ``side: input``). Offsets merge into the module's bias (``b + W v``), so merging needs
a bias; apply / compress / port are the kind's generic verbs.

Where this follows the reference and where not: the init (both ``N(0, 1e-3)``), the L1 penalty on A, the
L2-norm ranking over all layers and offsets on the selected heads only are the reference's. Defaults:
``top_k_heads`` is 10% of the targeted heads (the reference's default; its scripts then train offsets on
16-48 of 160 kept heads, 3-4%), ``l1`` 1e-3 and ``selection_lr`` 5e-3 (its Llama 2 7B MQuAKE run; its
scripts tune both per task). Its step 1 runs epochs over a dataset: here pass the batches once per
epoch (``batches=data * epochs``). Random draws come from a generator seeded by ``seed`` (the reference
seeds the global one), and A / v are stored in the module's dtype, fp32 for half-precision modules.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

import adapterfmt as af

LossFn = Callable[[nn.Module, Any], torch.Tensor]
SELECTIONS = ("scale", "random", "given")
INIT_STD = 1e-3
"""Standard deviation of the initial A (step 1) and v (step 2), as in the reference."""
L1, SELECTION_LR, DEFAULT_HEAD_FRACTION, MAX_GRAD_NORM = 1e-3, 5e-3, 0.1, 1.0
STEP1_KEYS = {"scale": (), "random": ("l1", "selection_lr"), "given": ("l1", "selection_lr", "top_k_heads")}
"""Per selection, the config keys it has no use for (refused rather than ignored)."""


class IA3(af.Method):
    name = "ia3"
    summary = "IA3: learned per-channel scaling of activations"
    kinds = ("vector",)
    config_schema = {"type": "object",
                     "properties": {"feedforward_modules": af.TARGETS_SCHEMA["target_modules"], **af.TARGETS_SCHEMA}}

    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> af.TrainSession:
        cfg = {"feedforward_modules": [], **config}
        self.check_config(cfg)
        return af.inject(model, method=self.name, config=cfg, build=lambda p, m: self.layer(p, m, cfg),
                         supported=(nn.Linear, "Conv1D", nn.Conv2d))

    @staticmethod
    def layer(path: str, module: nn.Module, cfg: dict[str, Any]) -> af.TrainableDelta:
        side = "input" if af.matches_targets(cfg["feedforward_modules"], path) else "output"
        entry = af.module_entry("vector", module, {"op": "scale", "side": side})
        fshape = af.function_shape(entry)
        n = fshape[1] if side == "input" else fshape[0]
        return af.TrainableDelta(entry, {"vector": torch.ones(n, dtype=af.adapter_dtype(module))})


def _channels(module: nn.Module) -> int:
    """The width of a linear module's input (the concatenated heads, for an attention output projection)."""
    return af.function_shape(af.module_entry("vector", module))[1]


def _normal(n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(n, generator=gen, dtype=torch.float64) * INIT_STD).to(dtype)


class _Scales(af.TrainableDelta):
    """Step 1's delta on one module: the trained role is A; the ``vector`` kind's input scale is ``1 + A``."""

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"vector": self.weights.vector + 1}


def rank_heads(scales: Mapping[str, torch.Tensor], head_dim: int, k: int) -> dict[str, list[int]]:
    """The ``k`` heads, over all modules, whose scaling factors A have the largest L2 norm (the reference's
    ``np.linalg.norm`` of each head's A, ranked over all layers); ``{module: [head, ...]}`` in the order of
    ``scales``, heads ascending. Ties go to the earlier module and head."""
    ranked = [(-float(torch.linalg.vector_norm(a[h * head_dim:(h + 1) * head_dim].float())), i, h, path)
              for i, (path, a) in enumerate(scales.items()) for h in range(a.numel() // head_dim)]
    chosen = sorted(ranked)[:k]
    return {path: sorted(h for _, _, h, p in chosen if p == path)
            for path in scales if any(p == path for *_, p in chosen)}


class LoFiT(af.Method):
    name = "lofit"
    summary = "LoFiT: offsets on the attention heads whose learned scaling factors are largest (two steps)"
    kinds = ("vector",)
    config_schema = {"type": "object", "properties": {
        "head_dim": {"type": "integer", "minimum": 1}, "top_k_heads": {"type": "integer", "minimum": 1},
        "selection": {"enum": list(SELECTIONS)}, "seed": {"type": "integer"},
        "heads": {"type": "object", "minProperties": 1, "additionalProperties": {
            "type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}},
        "l1": {"type": "number", "minimum": 0}, "selection_lr": {"type": "number", "exclusiveMinimum": 0},
        **af.TARGETS_SCHEMA}}

    def train(self, model: nn.Module, *, config: dict[str, Any], loss_fn: LossFn | None = None,
              batches: Iterable[Any] | None = None, **options: Any) -> af.TrainSession:
        """Choose the heads (step 1, or ``heads`` / ``selection: random``) and inject the trainable offsets of
        step 2; see the plugin docstring. ``batches`` is consumed once."""
        self.check_config(config)
        if options:
            raise af.FormatError(f"lofit train takes no option(s) {', '.join(sorted(options))}")
        cfg = {"selection": "given" if "heads" in config else "scale", "seed": 0, **config}
        if ("heads" in cfg) != (cfg["selection"] == "given"):
            raise af.FormatError(f"lofit config: selection {cfg['selection']!r} and heads "
                                 f"{'given' if 'heads' in cfg else 'missing'}; heads go with selection 'given' only")
        idle = [k for k in STEP1_KEYS[cfg["selection"]] if k in cfg]
        if idle:
            raise af.FormatError(f"lofit config {idle[0]} has no use with selection {cfg['selection']!r}")
        if cfg["selection"] == "scale":
            if loss_fn is None or batches is None:
                raise af.FormatError("lofit selects heads by training scaling factors on calibration data: pass "
                                     "train(..., loss_fn=, batches=), or config heads, or selection 'random'")
            cfg = {"l1": L1, "selection_lr": SELECTION_LR, **cfg}
        candidates = af.select_targets(model, cfg, supported=(nn.Linear, "Conv1D"))
        hd = cfg["head_dim"] = cfg["head_dim"] if "head_dim" in cfg else _head_dim(model)
        counts = {p: _head_count(p, m, hd) for p, m in candidates.items()}
        gen = torch.Generator().manual_seed(cfg["seed"])
        if cfg["selection"] == "given":
            cfg["heads"] = _given_heads(cfg["heads"], counts)
        else:
            total = sum(counts.values())
            k = cfg.setdefault("top_k_heads", max(1, int(DEFAULT_HEAD_FRACTION * total)))
            if k > total:
                raise af.FormatError(f"lofit config top_k_heads is {k}; the targeted modules have {total} heads")
            if cfg["selection"] == "scale":
                scales = self.head_scales(model, candidates, loss_fn=loss_fn, batches=batches, l1=cfg["l1"],
                                          lr=cfg["selection_lr"], generator=gen)
                cfg["heads"] = rank_heads(scales, hd, k)
            else:
                flat = [(p, h) for p, n in counts.items() for h in range(n)]
                picked = [flat[i] for i in sorted(torch.randperm(total, generator=gen)[:k].tolist())]
                cfg["heads"] = {p: [h for q, h in picked if q == p] for p in counts if any(q == p for q, _ in picked)}
        session = af.TrainSession(model, self.name, cfg)
        for path, heads in cfg["heads"].items():
            session.add(path, candidates[path], self.offsets(candidates[path], hd, heads, gen))
        return session

    @staticmethod
    def head_scales(model: nn.Module, modules: Mapping[str, nn.Module], *, loss_fn: LossFn, batches: Iterable[Any],
                    l1: float, lr: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Step 1: the scaling factors A learned on the input of each of ``modules`` (scale ``1 + A``,
        ``A ~ N(0, 1e-3)``), one step per batch on ``loss_fn(model, batch) + l1 * sum |A|``; ``{module: A}``."""
        batches = list(batches)
        if not batches:
            raise af.FormatError("lofit got no calibration batches")
        session = af.TrainSession(model, "lofit", {})
        try:
            for path, module in modules.items():
                entry = af.module_entry("vector", module, {"op": "scale", "side": "input"})
                a = _normal(_channels(module), generator, af.adapter_dtype(module))
                session.add(path, module, _Scales(entry, {"vector": a}))
            params = list(session.parameters())
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: (len(batches) - step) / len(batches))
            for batch in batches:
                loss = loss_fn(model, batch) + l1 * sum(a.abs().sum() for a in params)
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                opt.step()
                decay.step()
            return {path: layer.weights.vector.detach().clone() for path, layer in session.layers.items()}
        finally:
            session.remove()

    @staticmethod
    def offsets(module: nn.Module, head_dim: int, heads: list[int], generator: torch.Generator) -> af.TrainableDelta:
        """Step 2's delta on one module: an offset on its input, ``N(0, 1e-3)`` on the chosen heads' channels
        and 0 elsewhere; the other channels' gradients are zeroed, so they stay 0."""
        n = _channels(module)
        mask = torch.zeros(n)
        for h in heads:
            mask[h * head_dim:(h + 1) * head_dim] = 1
        dtype = af.adapter_dtype(module)
        entry = af.module_entry("vector", module, {"op": "offset", "side": "input"})
        delta = af.TrainableDelta(entry, {"vector": _normal(n, generator, dtype) * mask.to(dtype)})
        mask = mask.to(device=module.weight.device, dtype=dtype)
        delta.weights.vector.register_hook(lambda g: g * mask)
        return delta

    def conformance_example(self) -> Any:
        """The conformance kit's example: both steps for real on a tiny Llama-shaped model; the kit's own
        training (which has no calibration data) reuses the heads step 1 chose."""
        from adapterfmt.authoring.conformance import Example
        from adapterfmt.tiny import TinyConfig, build_tiny

        model = build_tiny(0, TinyConfig(vocab_size=32, hidden=16, layers=2, heads=2, intermediate=32))
        gen = torch.Generator().manual_seed(0)
        data = [torch.randint(0, 32, (4, 6), generator=gen) for _ in range(4)]

        def loss_fn(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())

        cfg = {"target_modules": ["o_proj"], "head_dim": 8, "top_k_heads": 2}
        session = self.train(copy.deepcopy(model), config=cfg, loss_fn=loss_fn, batches=data)
        opt = torch.optim.Adam(list(session.parameters()), lr=0.05)
        for ids in data * 5:
            opt.zero_grad()
            loss_fn(session.model, ids).backward()
            opt.step()
        adapter = session.extract()
        session.remove()
        given = {"target_modules": ["o_proj"], "head_dim": 8, "heads": adapter.config["heads"]}
        return Example(model, adapter, data[0][:3], train_config=given)


def _head_dim(model: nn.Module) -> int:
    c = getattr(model, "config", None)
    n = getattr(c, "num_attention_heads", None)
    hd = getattr(c, "head_dim", None) or (getattr(c, "hidden_size", 0) // n if n else None)
    if not isinstance(hd, int) or hd < 1:
        raise af.FormatError("lofit config needs head_dim (the width of one attention head); the model's config "
                             "gives no num_attention_heads")
    return hd


def _head_count(path: str, module: nn.Module, head_dim: int) -> int:
    n = _channels(module)
    if n % head_dim:
        raise af.FormatError(f"lofit: module {path!r} has {n} input channels, not a whole number of heads "
                             f"of head_dim {head_dim}")
    return n // head_dim


def _given_heads(heads: Mapping[str, list[int]], counts: Mapping[str, int]) -> dict[str, list[int]]:
    """``config.heads`` checked against the targeted modules, in module order, heads ascending."""
    for path, hs in heads.items():
        if path not in counts:
            raise af.FormatError(f"lofit config heads names module {path!r}, which target_modules does not select")
        bad = [h for h in hs if h >= counts[path]]
        if bad:
            raise af.FormatError(f"lofit config heads: module {path!r} has {counts[path]} heads; no head {bad[0]}")
    return {p: sorted(set(heads[p])) for p in counts if p in heads}


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [IA3(), LoFiT()]
