"""Training procedures that choose what trains: IST (layers per step), GreenTrainer (tensors by backprop FLOPs),
Light-PEFT (early pruning of the base's heads / channels and of LoRA ranks).

Each is a method whose ``train`` verb returns an ordinary :class:`adapterfmt.TrainSession`; the choice runs on
the session's hooks (``skip_gradients``, ``on_step``) or before injection, so ``adapter train --method M``
runs them as it runs LoRA. Their adapters are made of existing kinds (``lowrank``, ``dense``) and, for
Light-PEFT, the core ``mask`` kind (spec 6.13), so apply / merge / compress / port are the kinds' own verbs.

Methods that learn their choice from data take ``loss_fn(model, batch) -> loss`` and ``batches`` (``adapter
train`` passes its first ``calibration_batches`` global batches); each records its choice in the adapter's
config so the kit (and a user) can train the same structure again without data.

- **IST** (Yao et al. 2024, "Layer-wise Importance Matters: Less Memory for Better Performance in PEFT of
  LLMs"; reference ``antgroup/importance-aware-sparse-tuning-IST-paper`` ``ist.py``): a LoRA whose deltas in
  only ``update_ratio`` of the transformer blocks get gradients at each step, the blocks drawn without
  replacement with probability ``sigmoid(-score)``. Every ``update_interval`` steps the scores learn by a
  REINFORCE-like update: ``rl_steps`` distinct draws of ``suppress_ratio`` of the blocks (probability
  ``sigmoid(score)``) have their LoRA scale multiplied by ``suppression`` for one eval-mode loss on a batch;
  reward ``exp(-loss)`` minus the draws' mean, and ``score[i] += reward * p_i (1 - p_i) * rl_lr`` for each
  block of the draw (``p`` before the update). As the reference: only the blocks drawn for a step train; the
  others' deltas do not require grad in that step's forward (``TrainSession.skip_gradients``), so their
  gradients are ``None`` (AdamW skips them) and autograd runs no backward below the lowest drawn block (the
  time and memory the paper saves; the updates are those of computing every gradient and dropping the undrawn
  ones, bit for bit on the CPU; on CUDA with Triton the deltas below the lowest drawn block run the inference
  kernel, the same function rounded otherwise, unless ``ADAPTERFMT_KERNELS=torch``); differences: the
  update's batch is the next calibration batch (the reference draws one from a shuffled loader), the block
  counts are at least 1 (the reference's ``int(L * ratio)`` is 0 below 4 blocks), draws come from the
  method's own generator (``seed``), and ``update_interval: 0`` keeps the scores at 0 (uniform draws: the
  reference's RST). The adapter is a LoRA.
  The schedule's state (scores, generator, drawn blocks) is checkpointed, so ``adapter train`` resumes it exactly.
- **GreenTrainer** (Huang et al. 2023, "Towards Green AI in Fine-tuning LLMs via Adaptive Backpropagation";
  reference ``pittisl/GreenTrainer`` ``decoder_lm/tensor_selector.py``, ``train.py``): trains whole weight
  tensors (kind ``dense``), those of the targeted linear modules that maximise the summed importance under a
  FLOPs budget ``rho`` (a fraction of a full fine-tuning step, forward included). Cost model per linear
  ``[out, in]`` over ``T`` tokens: ``t_dw = t_dy = T * out * in``, and attention's backward ``2 * T * N * d``
  (``N`` the sequence length, ``d`` ``o_proj``'s input width) charged to ``t_dy`` of ``v_proj`` as the
  reference charges it to OPT's ``v``; selecting a tensor costs its ``t_dw`` and the ``t_dy`` of every tensor
  from the output down to it. Importance ``I_k = -sum(g_1 * dw_0)``: ``dw_0`` one AdamW step (``importance_lr``)
  of all candidate tensors on the first batch, ``g_1`` the gradient after it, the weights then restored. Both
  FLOPs are quantised to 1000 units (floored) and the best subset is found exactly (the reference's dynamic
  programme solves the same problem). Differences: a fresh AdamW of its own (the reference steps the run's
  optimizer and keeps its state), one selection at the start (the reference re-selects every ``interval``
  epochs), only linear weights are candidates (not norms, biases, embeddings), and a ``rho`` whose backward
  budget is not positive is refused (the reference resets it to 0.05). The choice is recorded as ``tensors``.
- **Light-PEFT** (Gu et al. 2024, "Light-PEFT: Lightening Parameter-Efficient Fine-Tuning via Early Pruning";
  reference ``gccnlp/Light-PEFT`` ``NLU/estimate.py``, ``nlu_utils.py``, ``trainer_base.py``): an estimation
  phase in ``train`` (LoRA with trainable head / FFN-channel gates under L1, rank and module importances
  recorded), then the pruning the reference's second run does (:meth:`LightPEFT.estimate`); the session returned
  trains the kept LoRA ranks from their estimated values on the pruned base: removed heads and channels are
  ``mask`` entries (spec 6.13) on the inputs of ``o_proj`` / ``down_proj``, which therefore cannot also hold a
  LoRA (refused). Nothing is scheduled after ``train``, so ``adapter train`` checkpoints and resumes it exactly.
  The base's pruned weights stay in memory (masked, not sliced out), so this implementation saves no training
  time or memory of the base; a reader may slice them out (spec 6.13).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

import adapterfmt as af

LossFn = Callable[[nn.Module, Any], torch.Tensor]
LINEAR = (nn.Linear, "Conv1D")
LORA_KEYS: dict[str, Any] = {
    "r": {"type": "integer", "minimum": 1}, "alpha": {"type": "number"},
    "dropout": {"type": "number", "minimum": 0, "maximum": 1},
}
"""The LoRA options IST and Light-PEFT take (their deltas are built by the ``lora`` method's layer)."""


def lora_layer(path: str, module: nn.Module, cfg: dict[str, Any]) -> af.TrainableDelta:
    """A plain LoRA delta (PEFT's init) on ``module``, built by the ``lora`` method with ``cfg``'s r / alpha / dropout."""
    lora = af.registry.get_method("lora")
    return lora.layer(path, module, {**lora.defaults, **{k: cfg[k] for k in LORA_KEYS}})


def calibration(name: str, loss_fn: LossFn | None, batches: Iterable[Any] | None, why: str) -> tuple[LossFn, list[Any]]:
    """``loss_fn`` and the batches as a list, or a FormatError saying what ``name`` needs them for."""
    data = list(batches) if batches is not None else []
    if loss_fn is None or not data:
        raise af.FormatError(f"{name}: {why} needs calibration data: train(..., loss_fn=, batches=)")
    return loss_fn, data


# ----- IST ----------------------------------------------------------------------------------------------------
class ISTSchedule:
    """IST's scores, the blocks that train at the current step, and the score update (see the module docstring)."""

    def __init__(self, session: af.TrainSession, cfg: dict[str, Any], loss_fn: LossFn | None,
                 batches: list[Any]) -> None:
        self.session, self.cfg, self.loss_fn, self.batches = session, cfg, loss_fn, batches
        blocks: dict[int, list[str]] = {}
        for path in session.layers:
            index = af.layer_index(path, cfg.get("layers_pattern"))
            if index is None:
                raise af.FormatError(f"ist: target module {path!r} is not inside a numbered block (layers.N)")
            blocks.setdefault(index, []).append(path)
        self.blocks = [blocks[i] for i in sorted(blocks)]
        n = len(self.blocks)
        self.n_update = max(1, int(n * cfg["update_ratio"]))
        self.n_suppress = max(1, int(n * cfg["suppress_ratio"]))
        if cfg["update_interval"] and math.comb(n, self.n_suppress) < cfg["rl_steps"]:
            raise af.FormatError(f"ist: {n} blocks give {math.comb(n, self.n_suppress)} distinct draws of "
                                 f"{self.n_suppress}, fewer than rl_steps={cfg['rl_steps']}")
        self.scores = torch.zeros(n)
        self.gen = torch.Generator().manual_seed(cfg["seed"])
        self.updates = 0
        self.active: set[str] = set()
        self.select()

    def draw(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        return torch.sort(torch.multinomial(logits.sigmoid(), k, generator=self.gen)).values

    def select(self) -> None:
        """Draw the blocks whose deltas train at the coming step."""
        self.active = {p for i in self.draw(-self.scores, self.n_update).tolist() for p in self.blocks[i]}

    def skip(self, path: str, step: int) -> bool:
        return path not in self.active

    def update_scores(self) -> None:
        """One REINFORCE-like update of the scores on the next calibration batch."""
        if self.loss_fn is None:
            raise af.FormatError("ist: the score update needs calibration data: train(..., loss_fn=, batches=)")
        batch = self.batches[self.updates % len(self.batches)]
        self.updates += 1
        model, layers = self.session.model, self.session.layers
        draws: list[torch.Tensor] = []
        losses = []
        while len(draws) < self.cfg["rl_steps"]:
            d = self.draw(self.scores, self.n_suppress)
            if any(torch.equal(d, e) for e in draws):
                continue
            draws.append(d)
            suppressed = [p for i in d.tolist() for p in self.blocks[i]]
            scales = {p: layers[p].entry["params"]["scale"] for p in suppressed}
            for p in suppressed:
                layers[p].entry["params"]["scale"] = scales[p] * self.cfg["suppression"]
            training = model.training
            model.eval()
            try:
                with torch.inference_mode():
                    losses.append(float(self.loss_fn(model, batch)))
            finally:
                model.train(training)
                for p in suppressed:
                    layers[p].entry["params"]["scale"] = scales[p]
        rewards = [math.exp(-x) for x in losses]
        mean = sum(rewards) / len(rewards)
        p = self.scores.sigmoid()
        for d, r in zip(draws, rewards):
            for i in d.tolist():
                self.scores[i] += (r - mean) * p[i] * (1 - p[i]) * self.cfg["rl_lr"]

    def __call__(self, optimizer: torch.optim.Optimizer | None) -> None:
        """The session's step hook: a score update every ``update_interval`` steps, then the next draw."""
        interval = self.cfg["update_interval"]
        if interval and self.session.steps % interval == 0:
            self.update_scores()
        self.select()

    def state_dict(self) -> dict[str, Any]:
        """The scores, the generator's state, the update count and the blocks drawn for the coming step
        (``adapter train`` checkpoints it)."""
        return {"scores": self.scores.clone(), "generator": self.gen.get_state(), "updates": self.updates,
                "active": sorted(self.active)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into a schedule of the same blocks."""
        if state["scores"].shape != self.scores.shape or not set(state["active"]) <= set(self.session.layers):
            raise af.FormatError("ist: the schedule state names other blocks than this session's")
        self.scores = state["scores"].clone()
        self.gen.set_state(state["generator"])
        self.updates, self.active = state["updates"], set(state["active"])


class IST(af.Method):
    name = "ist"
    summary = "IST: LoRA whose blocks train in importance-sampled subsets per step (scores learned by REINFORCE)"
    kinds = ("lowrank",)
    defaults: ClassVar[dict[str, Any]] = {
        "r": 8, "alpha": 8, "dropout": 0.0, "update_ratio": 0.25, "suppress_ratio": 0.5, "rl_steps": 3,
        "rl_lr": 10.0, "suppression": 0.25, "update_interval": 10, "seed": 0}
    config_schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": {
        **LORA_KEYS, "update_ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "suppress_ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "rl_steps": {"type": "integer", "minimum": 1}, "rl_lr": {"type": "number"},
        "suppression": {"type": "number", "minimum": 0}, "update_interval": {"type": "integer", "minimum": 0},
        "seed": {"type": "integer"}, **af.TARGETS_SCHEMA}}

    def train(self, model: nn.Module, *, config: dict[str, Any], loss_fn: LossFn | None = None,
              batches: Iterable[Any] | None = None, **options: Any) -> af.TrainSession:
        """Inject LoRA and schedule the per-step block subsets (module docstring); score updates need
        ``loss_fn`` and ``batches`` unless ``update_interval`` is 0."""
        self.check_config(config)
        cfg = {**self.defaults, **config}
        data: list[Any] = []
        if cfg["update_interval"]:
            loss_fn, data = calibration(self.name, loss_fn, batches, "the importance-score update")
        session = af.inject(model, method=self.name, config=cfg, build=lambda p, m: lora_layer(p, m, cfg),
                            supported=LINEAR)
        schedule = ISTSchedule(session, cfg, loss_fn, data)
        session.skip_gradients(schedule.skip)
        session.on_step(schedule)
        return session

    def conformance_example(self) -> Any:
        """The kit's example: a LoRA injected on the kit's tiny model, nudged off zero; the kit's own ``train``
        (no data) runs with ``update_interval: 0``."""
        return selection_example(self.name, {"target_modules": ["q_proj", "v_proj", "down_proj"], "update_interval": 0})


# ----- GreenTrainer -------------------------------------------------------------------------------------------
def linear_flops(model: nn.Module, loss_fn: LossFn, batch: Any) -> tuple[list[str], torch.Tensor, torch.Tensor, float]:
    """Every linear module of ``model`` in module order, with its ``t_dy`` and ``t_dw`` (float64) and the
    forward FLOPs, from the token count and sequence length one forward pass of ``batch`` shows."""
    seen: dict[str, tuple[int, ...]] = {}

    def record(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            seen.setdefault(path, tuple(args[0].shape))
        return hook

    handles = [m.register_forward_hook(record(path)) for path, m in model.named_modules() if _linear(m)]
    try:
        with torch.no_grad():
            loss_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
    paths = list(seen)
    t_dy, t_dw = torch.zeros(len(paths), dtype=torch.float64), torch.zeros(len(paths), dtype=torch.float64)
    forward = 0.0
    for k, path in enumerate(paths):
        shape, (out, n_in) = seen[path], af.function_shape(af.module_entry("dense", model.get_submodule(path)))
        tokens = math.prod(shape[:-1])
        t_dw[k] = t_dy[k] = tokens * out * n_in
        forward += tokens * out * n_in
        if path.endswith("v_proj"):
            o = path[: -len("v_proj")] + "o_proj"
            width = model.get_submodule(o).in_features if o in seen else out
            seq = shape[-2] if len(shape) > 2 else 1
            t_dy[k] += 2 * tokens * seq * width
            forward += 2 * tokens * seq * width
    return paths, t_dy, t_dw, forward


def _linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def tensor_importance(model: nn.Module, candidates: dict[str, nn.Module], loss_fn: LossFn, batch: Any,
                      lr: float) -> dict[str, float]:
    """GreenTrainer's ``I_k = -sum(g_1 * dw_0)`` per candidate weight, divided by the largest ``|I|``; the
    weights, every parameter's ``requires_grad`` and the model's gradients are as before afterwards."""
    weights = {p: m.weight for p, m in candidates.items()}
    flags = {q: q.requires_grad for q in model.parameters()}
    grads = {q: q.grad for q in model.parameters()}
    before = {p: w.detach().clone() for p, w in weights.items()}
    for q in model.parameters():
        q.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    try:
        opt = torch.optim.AdamW(list(weights.values()), lr=lr)
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dw = {p: (w.detach() - before[p]).double() for p, w in weights.items()}
        loss_fn(model, batch).backward()
        raw = {p: -float((w.grad.double() * dw[p]).sum()) if w.grad is not None else 0.0 for p, w in weights.items()}
    finally:
        with torch.no_grad():
            for p, w in weights.items():
                w.copy_(before[p])
        for q, flag in flags.items():
            q.grad = grads[q]
            q.requires_grad_(flag)
    top = max(abs(v) for v in raw.values()) or 1.0
    return {p: v / top for p, v in raw.items()}


def select_tensors(t_dy: Sequence[int], t_dw: Sequence[int], importance: Sequence[float], limit: int) -> list[int]:
    """The indices (into the output-first chain) of the subset with the largest summed importance whose cost —
    the chosen ``t_dw`` plus ``t_dy`` of every tensor from the output down to the deepest chosen — is at most
    ``limit``; ``[]`` when no subset has positive importance. Exact: for each deepest tensor ``d``, a 0/1
    knapsack on ``t_dw`` over the tensors before it (integer costs)."""
    best = [0.0] * (limit + 1)  # best[t]: largest importance of tensors before d with summed t_dw <= t
    take: list[list[bool]] = []
    dy_sum, answer, deepest = 0, 0.0, -1
    for d, (dy, dw, gain) in enumerate(zip(t_dy, t_dw, importance)):
        dy_sum += dy
        room = limit - dy_sum - dw
        if room >= 0 and gain + best[room] > answer:
            answer, deepest = gain + best[room], d
        row = [False] * (limit + 1)
        if gain > 0:
            for t in range(limit, dw - 1, -1):
                if best[t - dw] + gain > best[t]:
                    best[t], row[t] = best[t - dw] + gain, True
        take.append(row)
    if deepest < 0:
        return []
    chosen, t = [deepest], limit - sum(t_dy[: deepest + 1]) - t_dw[deepest]
    for k in range(deepest - 1, -1, -1):
        if take[k][t]:
            chosen.append(k)
            t -= t_dw[k]
    return sorted(chosen)


class GreenTrainer(af.Method):
    name = "greentrainer"
    summary = "GreenTrainer: whole weight tensors chosen by importance under a backprop FLOPs budget (kind dense)"
    kinds = ("dense",)
    defaults: ClassVar[dict[str, Any]] = {"target_modules": "all-linear", "rho": 0.5, "importance_lr": 2e-5}
    config_schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": {
        "rho": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "importance_lr": {"type": "number", "exclusiveMinimum": 0},
        "tensors": {"type": "array", "items": {"type": "string"}, "minItems": 1}, **af.TARGETS_SCHEMA}}
    """``tensors``: the chosen modules (recorded by the selection; given, it replaces the selection)."""

    def train(self, model: nn.Module, *, config: dict[str, Any], loss_fn: LossFn | None = None,
              batches: Iterable[Any] | None = None, **options: Any) -> af.TrainSession:
        """Choose the tensors (module docstring) from the first batch, or take ``tensors``; train them whole."""
        self.check_config(config)
        cfg = {**self.defaults, **config}
        if "tensors" not in cfg:
            cfg["tensors"] = self.choose(model, cfg, *calibration(self.name, loss_fn, batches, "tensor selection"))
        return af.inject(model, method=self.name, config=cfg, targets={"target_modules": cfg["tensors"]},
                         build=lambda p, m: dense_layer(m), supported=LINEAR)

    @staticmethod
    def choose(model: nn.Module, cfg: dict[str, Any], loss_fn: LossFn, data: list[Any]) -> list[str]:
        """The module paths whose weights train (the FLOPs-budgeted best subset)."""
        candidates = af.select_targets(model, cfg, supported=LINEAR)
        paths, t_dy, t_dw, forward = linear_flops(model, loss_fn, data[0])
        backward = float((t_dy + t_dw).sum())
        rho_bp = cfg["rho"] * (1 + forward / backward) - forward / backward
        if rho_bp <= 0:
            raise af.FormatError(f"greentrainer config field rho: {cfg['rho']} leaves no backward FLOPs (the forward "
                                 f"pass alone is {forward / (forward + backward):.3f} of a full step)")
        scores = tensor_importance(model, candidates, loss_fn, data[0], cfg["importance_lr"])
        scale = 1000.0 / backward
        dy_q = [int(math.floor(v * scale)) for v in reversed(t_dy.tolist())]
        dw_q = [int(math.floor(v * scale)) for v in reversed(t_dw.tolist())]
        chain = list(reversed(paths))
        gains = [scores.get(p, -math.inf) for p in chain]
        chosen = select_tensors(dy_q, dw_q, gains, int(rho_bp * (sum(dy_q) + sum(dw_q))))
        if not chosen:
            raise af.FormatError(f"greentrainer: no tensor with positive importance fits rho={cfg['rho']}")
        return sorted((chain[k] for k in chosen), key=paths.index)

    def conformance_example(self) -> Any:
        """The kit's example: the selection run for real on the kit's tiny model; the kit's own ``train`` (no
        data) takes the recorded ``tensors``."""
        return selection_example(self.name, {"target_modules": ["q_proj", "v_proj", "down_proj"], "rho": 0.6},
                                 keep=("tensors",))


def dense_layer(module: nn.Module) -> af.TrainableDelta:
    """A trainable ``dense`` (mode ``add``) delta of ``module``'s weight, from zero."""
    entry = af.module_entry("dense", module, {"mode": "add"})
    entry["params"].pop("transposed", None)  # dense is in the stored layout
    return af.TrainableDelta(entry, {"delta": torch.zeros(module.weight.shape, dtype=af.adapter_dtype(module))})


# ----- Light-PEFT ---------------------------------------------------------------------------------------------
class Estimate:
    """Light-PEFT's estimation phase on a model with LoRA injected: trainable head / channel gates on the inputs
    of the head and channel modules, LoRA's rank and module importances recorded per step."""

    def __init__(self, session: af.TrainSession, heads: dict[str, tuple[nn.Module, int]],
                 channels: dict[str, nn.Module]) -> None:
        self.session = session
        self.head_gates = {p: nn.Parameter(torch.ones(m.in_features // hd)) for p, (m, hd) in heads.items()}
        self.channel_gates = {p: nn.Parameter(torch.ones(m.in_features)) for p, m in channels.items()}
        self.rank_scores: dict[str, list[torch.Tensor]] = {p: [] for p in session.layers}
        self.module_scores: dict[str, list[float]] = {p: [] for p in session.layers}
        self.handles = [m.register_forward_pre_hook(self._gate(self.head_gates[p], hd)) for p, (m, hd) in heads.items()]
        self.handles += [m.register_forward_pre_hook(self._gate(self.channel_gates[p], 1)) for p, m in channels.items()]
        self.handles += [layer.register_forward_hook(self._ratio(p)) for p, layer in session.layers.items()]

    @staticmethod
    def _gate(gate: nn.Parameter, group: int) -> Callable[..., tuple[torch.Tensor, ...]]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (args[0] * gate.repeat_interleave(group).to(args[0].dtype), *args[1:])
        return hook

    def _ratio(self, path: str) -> Callable[..., None]:
        def hook(layer: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            if layer.training:  # the reference's "p2": ||LoRA output|| / ||base output|| per token, averaged
                base = args[2].detach()
                ratio = (out.detach() - base).norm(dim=-1) / base.norm(dim=-1)
                self.module_scores[path].append(float(ratio.mean()))
        return hook

    def record_ranks(self) -> None:
        """After a backward pass: each rank's first-order importance ``|mean_j A*gA| + |mean_i B*gB|``."""
        for path, layer in self.session.layers.items():
            a, b = layer.weights.lora_A, layer.weights.lora_B
            if a.grad is None or b.grad is None:
                continue
            score = (a * a.grad).mean(1).abs() + (b * b.grad).mean(0).abs()
            self.rank_scores[path].append(score.detach().float().cpu())

    def l1(self) -> torch.Tensor:
        gates = [*self.head_gates.values(), *self.channel_gates.values()]
        return sum((g.abs().sum() for g in gates), torch.zeros(()))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


RATIO = {"type": "number", "minimum": 0, "exclusiveMaximum": 1}


def late_mean(values: Sequence[Any]) -> torch.Tensor:
    """The mean of the second half of a per-step record (the reference's ``process_peft_imp``), NaN / inf as 0."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in values[len(values) // 2:]])
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0).mean(0)


def above_quantile(values: torch.Tensor, ratio: float) -> torch.Tensor:
    """Which values are above their ``ratio`` quantile (linear interpolation, as ``numpy.quantile``)."""
    return values > torch.quantile(values.double(), ratio).to(values.dtype)


class LightPEFT(af.Method):
    name = "light_peft"
    summary = "Light-PEFT: early pruning of the base's heads / FFN channels (kind mask) and of LoRA modules and ranks"
    kinds = ("lowrank", "mask")
    file_fields = ("structure_from",)
    defaults: ClassVar[dict[str, Any]] = {
        "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "head_module": "o_proj",
        "channel_module": "down_proj", "attn_pruning_ratio": 1 / 3, "ffn_pruning_ratio": 1 / 3,
        "module_pruning_ratio": 0.75, "rank_pruning_ratio": 0.5, "estimate_lr": 3e-4, "l1": 1e-4,
        "attn_mask_lr_coef": 100.0, "ffn_mask_lr_coef": 50.0}
    config_schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": {
        **LORA_KEYS, "head_module": {"type": "string"}, "channel_module": {"type": "string"},
        "head_dim": {"type": "integer", "minimum": 1}, "attn_pruning_ratio": RATIO, "ffn_pruning_ratio": RATIO,
        "module_pruning_ratio": RATIO, "rank_pruning_ratio": RATIO,
        "estimate_steps": {"type": "integer", "minimum": 1}, "estimate_lr": {"type": "number", "exclusiveMinimum": 0},
        "l1": {"type": "number", "minimum": 0}, "attn_mask_lr_coef": {"type": "number", "exclusiveMinimum": 0},
        "ffn_mask_lr_coef": {"type": "number", "exclusiveMinimum": 0},
        "structure_from": {"type": "string", "minLength": 1}, **af.TARGETS_SCHEMA}}
    """``structure_from``: a light_peft adapter whose masks, LoRA modules, ranks and factors this run starts from
    (no estimation, no data)."""

    def train(self, model: nn.Module, *, config: dict[str, Any], loss_fn: LossFn | None = None,
              batches: Iterable[Any] | None = None, **options: Any) -> af.TrainSession:
        """Estimate and prune (see below), or take ``structure_from``; returns the session of the pruned model:
        the ``mask`` entries fixed, the kept LoRA ranks trainable from their estimated values."""
        self.check_config(config)
        if "structure_from" in config:
            given = sorted(set(config) & {"target_modules", "exclude_modules", "layers_to_transform"})
            if given:
                raise af.FormatError(f"light_peft: structure_from gives the modules; drop {', '.join(given)}")
            cfg = {**{k: v for k, v in self.defaults.items() if k != "target_modules"}, **config}
            masks, loras = self.structure_from(cfg["structure_from"])
        else:
            cfg = {**self.defaults, **config}
            masks, loras = self.estimate(model, cfg, *calibration(self.name, loss_fn, batches, "the estimation"))

        def build(path: str, module: nn.Module) -> af.TrainableDelta:
            if path in masks:
                params, keep = masks[path]
                return af.TrainableDelta(af.module_entry("mask", module, params), {}, frozen={"keep": keep})
            a, b, scale = loras[path]
            return af.TrainableDelta(af.module_entry("lowrank", module, {"scale": scale}),
                                     {"lora_A": a, "lora_B": b}, dropout=cfg["dropout"])

        return af.inject(model, method=self.name, config=cfg, targets={"target_modules": sorted({*masks, *loras})},
                         build=build, supported=LINEAR)

    def estimate(self, model: nn.Module, cfg: dict[str, Any], loss_fn: LossFn,
                 data: list[Any]) -> tuple[dict[str, tuple[dict[str, Any], torch.Tensor]],
                                           dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
        """The estimation phase and the pruning decisions (the reference's ``estimate.py`` then ``train.py``):
        ``estimate_steps`` AdamW steps (default: one pass over ``data``, cycled) of LoRA (``estimate_lr``, linear
        decay) and of head / channel gates (that lr times ``attn_mask_lr_coef`` / ``ffn_mask_lr_coef``), L1 on
        the gates (``l1``), gradients clipped to norm 1 (the Trainer's default); then heads below their module's
        ``attn_pruning_ratio`` quantile of gate values, channels below the global ``ffn_pruning_ratio`` quantile,
        LoRA modules below the ``module_pruning_ratio`` quantile of the output-norm ratio and ranks below the
        global ``rank_pruning_ratio`` quantile of first-order importance (both averaged over the second half of
        the steps) are removed; a ratio of 0 prunes nothing. Heads and channels are gated on the inputs of the
        ``head_module`` / ``channel_module`` modules (equal to the reference's gates on attention probabilities
        and FFN activations); the LoRA factors of pruned heads / channels are kept (they only meet removed
        channels), where the reference slices them off."""
        heads = {p: (m, self.head_dim(model, p, m, cfg)) for p, m in
                 (af.select_modules(model, [cfg["head_module"]], supported=(nn.Linear,)).items()
                  if cfg["attn_pruning_ratio"] else ())}
        channels = (af.select_modules(model, [cfg["channel_module"]], supported=(nn.Linear,))
                    if cfg["ffn_pruning_ratio"] else {})
        session = af.inject(model, method=self.name, config=cfg, build=lambda p, m: lora_layer(p, m, cfg),
                            supported=(nn.Linear,))
        overlap = sorted(set(session.layers) & {*heads, *channels})
        if overlap:
            session.remove()
            raise af.FormatError(f"light_peft: target module {overlap[0]!r} is where a head / channel mask goes "
                                 "(head_module, channel_module); one module holds one entry")
        est = Estimate(session, heads, channels)
        lr, steps = cfg["estimate_lr"], cfg.get("estimate_steps", len(data))
        groups = [{"params": list(session.parameters()), "lr": lr},
                  {"params": list(est.head_gates.values()), "lr": lr * cfg["attn_mask_lr_coef"]},
                  {"params": list(est.channel_gates.values()), "lr": lr * cfg["ffn_mask_lr_coef"]}]
        groups = [g for g in groups if g["params"]]
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: max(0.0, (steps - k) / steps))
        params = [p for g in groups for p in g["params"]]
        try:
            model.train()
            for k in range(steps):
                loss = loss_fn(model, data[k % len(data)]) + cfg["l1"] * est.l1()
                loss.backward()
                est.record_ranks()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
        finally:
            est.remove()
        masks: dict[str, tuple[dict[str, Any], torch.Tensor]] = {}
        for p, gate in est.head_gates.items():
            masks[p] = ({"side": "input", "group": heads[p][1]}, above_quantile(gate.detach(), cfg["attn_pruning_ratio"]))
        if channels:
            values = torch.cat([g.detach() for g in est.channel_gates.values()])
            keep = above_quantile(values, cfg["ffn_pruning_ratio"]).split([g.numel() for g in est.channel_gates.values()])
            masks.update({p: ({"side": "input", "group": 1}, k) for p, k in zip(est.channel_gates, keep)})
        masks = {p: (params_, k.to(torch.uint8)) for p, (params_, k) in masks.items() if not bool(k.all())}
        kept = list(session.layers)
        if cfg["module_pruning_ratio"] and kept:
            ratio = torch.stack([late_mean(est.module_scores[p]) for p in kept])
            kept = [p for p, k in zip(kept, above_quantile(ratio, cfg["module_pruning_ratio"]).tolist()) if k]
        ranks = {p: late_mean(est.rank_scores[p]) for p in kept}
        if cfg["rank_pruning_ratio"] and kept:
            keep = above_quantile(torch.cat(list(ranks.values())), cfg["rank_pruning_ratio"])
            rank_keep = dict(zip(kept, keep.split([r.numel() for r in ranks.values()])))
        else:
            rank_keep = {p: torch.ones(r.numel(), dtype=torch.bool) for p, r in ranks.items()}
        loras = {}
        for p in kept:
            k, layer = rank_keep[p], session.layers[p]
            if bool(k.any()):
                loras[p] = (layer.weights.lora_A.detach()[k].clone(), layer.weights.lora_B.detach()[:, k].clone(),
                            float(layer.entry["params"]["scale"]))
        session.remove()
        return masks, loras

    @staticmethod
    def head_dim(model: nn.Module, path: str, module: nn.Module, cfg: dict[str, Any]) -> int:
        """Channels per head at the input of head module ``path``: ``head_dim`` of the config, else of the
        attention module (transformers), else its input width over the attention's or the model's head count."""
        parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
        heads = getattr(parent, "heads", None) or getattr(getattr(model, "config", None), "num_attention_heads", None)
        hd = cfg.get("head_dim") or getattr(parent, "head_dim", None) or (module.in_features // heads if heads else None)
        if not hd or module.in_features % hd:
            raise af.FormatError(f"light_peft: cannot tell the head size at {path!r}; give head_dim in the config")
        return int(hd)

    def structure_from(self, source: str) -> tuple[dict[str, tuple[dict[str, Any], torch.Tensor]],
                                                   dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
        """The masks and LoRA factors of the light_peft adapter at ``source``."""
        adapter = af.validate(source)
        if adapter.method != self.name:
            raise af.FormatError(f"light_peft structure_from: the adapter's method is {adapter.method!r}", path=source)
        masks, loras = {}, {}
        for path, entry in adapter.modules.items():
            t = adapter.module_tensors(path)
            params = {k: v for k, v in entry.get("params", {}).items() if k != "transposed"}
            if entry["kind"] == "mask":
                masks[path] = (params, t["keep"])
            elif entry["kind"] == "lowrank" and set(t) == {"lora_A", "lora_B"}:
                loras[path] = (t["lora_A"].float(), t["lora_B"].float(), float(params.get("scale", 1.0)))
            else:
                raise af.FormatError(f"light_peft structure_from: module {path!r} is not a mask or a plain "
                                     "lowrank entry", path=source)
        return masks, loras

    def conformance_example(self) -> Any:
        """The kit's example: estimation and pruning for real on the kit's tiny model, the result saved (under the
        system's temporary folder, overwritten each time) for the kit's own ``train``, which has no data."""
        import tempfile
        from pathlib import Path

        config = {"target_modules": ["q_proj", "v_proj", "up_proj"], "r": 4, "estimate_steps": 4,
                  "module_pruning_ratio": 0.25}
        ex = selection_example(self.name, config)
        where = af.save(ex.adapter, Path(tempfile.gettempdir(), "adapterfmt-conformance-light_peft.safetensors"),
                        overwrite=True)
        ex.train_config = {"structure_from": str(where)}
        return ex


# ----- the conformance kit's examples -------------------------------------------------------------------------
def selection_example(name: str, config: dict[str, Any], *, keep: Sequence[str] = ()) -> Any:
    """An Example for the kit: method ``name`` trained by its verb on the kit's tiny model with calibration
    batches, its parameters nudged off their start; the kit's ``train`` gets ``config`` plus the recorded
    ``keep`` fields (the choice, so it needs no data)."""
    import copy

    import torch.nn.functional as F
    from adapterfmt.authoring.conformance import Example
    from adapterfmt.tiny import TinyConfig, build_tiny

    model = build_tiny(0, TinyConfig(vocab_size=32, hidden=16, layers=2, heads=2, intermediate=32))
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 32, (4, 6), generator=gen) for _ in range(2)]

    def loss_fn(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        out = m(ids[:, :-1])
        return F.cross_entropy(getattr(out, "logits", out).flatten(0, 1), ids[:, 1:].flatten())

    session = af.registry.get_method(name).train(copy.deepcopy(model), config=config, loss_fn=loss_fn, batches=data)
    with torch.no_grad():
        for p in session.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    adapter = session.extract()
    session.remove()
    kit = {**config, **{k: adapter.config[k] for k in keep}}
    return Example(model, adapter, torch.randint(0, 32, (3, 5), generator=gen), train_config=kit)


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [IST(), GreenTrainer(), LightPEFT()]


__all__ = ["IST", "GreenTrainer", "LightPEFT", "Estimate", "ISTSchedule", "linear_flops", "select_tensors", "tensor_importance"]
