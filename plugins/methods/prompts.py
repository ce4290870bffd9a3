"""Prompt tuning, DePT, EPT and multitask prompt tuning: learned virtual tokens prepended to the input embeddings.

``prompt_tuning`` trains kind ``prompt`` on the model's input embedding module (``get_input_embeddings()``,
or ``config.embedding_module``): ``num_virtual_tokens`` rows initialised at random (``init: random``,
standard normal as PEFT) or from the embeddings of ``init_token_ids`` (repeated to fill, as PEFT does).

``dept`` (Decomposed Prompt Tuning, Shi & Lipani 2023) trains a shorter prompt *and* a low-rank update
of the embedded input sequence. One module has one entry, and both act on the input embedding, so the
plugin supplies kind ``dept`` (roles ``embeddings [n, dim]``, ``offset_A [max_length, r]``,
``offset_B [r, dim]``, ``params.scale``, ``params.position = "prefix"``): applied, the embedding output
``y [batch, T, dim]`` becomes ``concat(embeddings, y + scale * (offset_A @ offset_B)[:T])`` — the update is
per *position* (as in the paper: ``E + A B`` on the padded ``[s, dim]`` input), positions past
``max_length`` are left as they are; inputs should be right-padded. ``offset_B`` starts at zero, so
training starts at plain prompt tuning. Training writes ``scale = alpha / sqrt(r)`` with ``alpha = 8``, as the
authors' code does (``PromptEmbeddingLoRA.scaling`` in DePT's ``peft/tuners/prompt_tuning_lora.py``, whose
``lora_alpha`` keeps its default 8); the applied scale is always the file's ``params.scale``. Neither kind
merges into weights (attach unmerged).

``ept`` (Efficient Prompt Tuning, Lan et al., AAAI 2025: DePT plus prompt fusion and multi-space projection)
trains DePT's short prompt ``P [n, dim]`` and offset ``A [max_length, r]``, ``B [r, dim]`` through a
reparameterisation that depends on no input, so what acts at inference is a DePT adapter and is stored as
one, exactly (kind ``dept``; the reparameterisation's own weights are not stored, as PEFT stores p-tuning's
encoder output). With ``O = scale * A @ B`` and ``K = V = concat(P, O)``:
prompt fusion ``F = P + softmax(P K^T / sqrt(dim)) V`` (the short prompt attends to itself and to the
low-rank knowledge); multi-space projection ``E = F + sum_k g_k * F @ U_k @ W_k`` over ``num_spaces``
rank-``space_rank`` subspaces, gated by ``g = softmax(mean_rows(F) @ G)``; ``E`` is the stored prompt.
Deviations from the paper, stated because no reference code was found to follow (the authors' pages link
the paper and its appendix only): fusion is one parameter-free attention head; each space is a residual
low-rank map (``W_k`` and ``G`` start at zero, so training starts at the fused prompt); the gate weighs the
spaces once per prompt (from its mean row), not per token. A saved EPT adapter cannot resume EPT training
(only its result is stored); an ``adapter train`` checkpoint also holds the short prompt and the fusion /
projection weights (``TrainSession.unstored``, in the schedule state), so a run resumes from it exactly.

``multitask_prompt_tuning`` (Wang et al. 2023, as PEFT's ``MULTITASK_PROMPT_TUNING``) stores one shared prompt
and per-task rank-``r`` factors, kind ``multitask_prompt`` (roles ``embeddings [n, dim]``, ``task_cols
[tasks, n, r]``, ``task_rows [tasks, r, dim]``; ``params.task`` the task applied): task ``t``'s prompt is
``embeddings * (task_cols[t] @ task_rows[t])`` (elementwise), exactly PEFT's ``MultitaskPromptEmbedding``.
Every task stays in the file, so a PEFT file comes back out unchanged; :meth:`MultitaskPromptTuning.for_task`
picks the task an attach applies, and attaching one adapter per task and passing per-row ``adapter_ids``
gives each batch row its own task, as PEFT's ``task_ids``. Training fits one task (``config.task``) with
PEFT's initialisation (all factors normal, std 0.02).

The model's sequence grows by ``n`` positions; outputs for the real tokens are the last ``T`` positions. On a
model whose forward takes ``inputs_embeds`` (transformers) all three kinds act on the model's inputs, as PEFT's
prompt learning: ``model(input_ids, attention_mask=..., labels=...)`` and ``generate`` get the prompt in front of
the embedded ids, the mask and labels extended by ``n`` (``adapterfmt.deltas.prompt.prompted_call``); given
``position_ids`` are dropped (as PEFT). DePT's offset acts on the sequence of that first call (a cached
``generate`` adds none to the tokens it decodes); an encoder-decoder model is refused. On other models they act on
the embedding module's output.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Collection
from typing import Any, ClassVar

import torch
from torch import nn

import adapterfmt as af

_PROMPT_SCHEMA: dict[str, Any] = {
    "num_virtual_tokens": {"type": "integer", "minimum": 1}, "embedding_module": {"type": "string"},
    "init": {"enum": ["random", "tokens"]}, "init_token_ids": {"type": "array", "items": {"type": "integer"}},
    "seed": {"type": "integer"}}


def _embedding_path(model: nn.Module, cfg: dict[str, Any]) -> str:
    if "embedding_module" in cfg:
        return cfg["embedding_module"]
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    path = next((p for p, m in model.named_modules() if m is emb and p), None)
    if path is None:
        paths = [p for p, m in model.named_modules() if isinstance(m, nn.Embedding)]
        if len(paths) != 1:
            raise af.FormatError(f"cannot tell the input embedding among {paths or 'no nn.Embedding'}; "
                                 "give config.embedding_module")
        path = paths[0]
    return path


class PromptTuning(af.Method):
    name = "prompt_tuning"
    summary = "Prompt tuning: virtual token embeddings prepended to the input embeddings"
    kinds = ("prompt",)
    config_schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": _PROMPT_SCHEMA}
    defaults: ClassVar[dict[str, Any]] = {"num_virtual_tokens": 8, "init": "random", "seed": 0}

    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> af.TrainSession:
        """Inject trainable virtual tokens on the input embedding; see the plugin docstring."""
        cfg = {**self.defaults, **config}
        self.check_config(cfg)
        if cfg["init"] == "tokens" and not cfg.get("init_token_ids"):
            raise af.FormatError("init 'tokens' needs init_token_ids")
        cfg["embedding_module"] = _embedding_path(model, cfg)
        return af.inject(model, method=self.name, config=cfg, build=lambda p, m: self.layer(m, cfg),
                         supported=(nn.Embedding,), targets={"target_modules": re.escape(cfg["embedding_module"])})

    def layer(self, module: nn.Module, cfg: dict[str, Any]) -> af.TrainableDelta:
        entry = {"kind": self.kinds[0], "shape": list(module.weight.shape), "params": {"position": "prefix"}}
        return af.TrainableDelta(entry, {"embeddings": self.prompt(module, cfg)})

    @staticmethod
    def prompt(module: nn.Module, cfg: dict[str, Any]) -> torch.Tensor:
        n, dtype = cfg["num_virtual_tokens"], af.adapter_dtype(module)
        if cfg["init"] == "tokens":
            ids = cfg["init_token_ids"]
            ids = (ids * math.ceil(n / len(ids)))[:n]
            return module.weight.detach()[torch.tensor(ids, device=module.weight.device)].to(dtype).clone()
        gen = torch.Generator().manual_seed(cfg["seed"])
        return torch.randn(n, module.weight.shape[1], generator=gen).to(dtype)


class PromptLikeKind(af.DeltaKind):
    """What the plugin's prompt kinds share with kind ``prompt``: they prepend its number of positions, are not
    additive and cannot be merged into weights (``label`` names the adapter in that refusal)."""

    label = "prompt adapter"

    def is_additive(self, entry: dict[str, Any], roles: Collection[str]) -> bool:
        return False

    def prepends(self, entry: dict[str, Any], t: dict[str, torch.Tensor]) -> int:
        return af.registry.get_kind("prompt").prepends(entry, t)

    def merge(self, module: nn.Module, entry: dict[str, Any], t: dict[str, torch.Tensor]) -> Any:
        raise af.UnsupportedError(f"a {self.label} cannot be merged into weights; attach it unmerged")


class DePTKind(PromptLikeKind):
    """Kind ``dept``: a prompt plus a low-rank per-position update of the embedded input (plugin docstring)."""

    name = "dept"
    label = "DePT adapter"
    required_roles = ("embeddings", "offset_A", "offset_B")

    def check(self, module: str, entry: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
        af.registry.get_kind("prompt").check(module, entry, shapes)
        a, b, dim = shapes["offset_A"], shapes["offset_B"], entry["shape"][1]
        if len(a) != 2 or len(b) != 2 or a[1] != b[0] or b[1] != dim:
            raise af.FormatError(f"module {module!r}: dept offset_A {list(a)} and offset_B {list(b)} must be "
                                 f"[max_length, r] and [r, {dim}]")

    def forward(self, module: nn.Module, entry: dict[str, Any], t: dict[str, torch.Tensor], x: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
        scale = float(entry.get("params", {}).get("scale", 1.0))
        offset = (scale * (t["offset_A"] @ t["offset_B"])).to(y.dtype)
        n = min(y.shape[-2], offset.shape[0])
        pad = y.new_zeros(y.shape[-2] - n, y.shape[-1])
        y = y + torch.cat([offset[:n], pad])
        return af.registry.get_kind("prompt").forward(module, entry, t, x, y)



class DePT(PromptTuning):
    name = "dept"
    summary = "DePT: a shorter prompt plus a low-rank per-position update of the input embeddings"
    kinds = ("dept",)
    config_schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": {
        **_PROMPT_SCHEMA, "r": {"type": "integer", "minimum": 1}, "alpha": {"type": "number"},
        "max_length": {"type": "integer", "minimum": 1}}}
    defaults: ClassVar[dict[str, Any]] = {**PromptTuning.defaults, "num_virtual_tokens": 4, "r": 4, "alpha": 8,
                                          "max_length": 256}

    def layer(self, module: nn.Module, cfg: dict[str, Any]) -> af.TrainableDelta:
        entry = {"kind": "dept", "shape": list(module.weight.shape),
                 "params": {"position": "prefix", "scale": cfg["alpha"] / math.sqrt(cfg["r"])}}
        dtype = af.adapter_dtype(module)
        a = torch.empty(cfg["max_length"], cfg["r"], dtype=dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        params = {"embeddings": self.prompt(module, cfg), "offset_A": a,
                  "offset_B": torch.zeros(cfg["r"], module.weight.shape[1], dtype=dtype)}
        return af.TrainableDelta(entry, params)


class EPTDelta(af.TrainableDelta):
    """EPT in training: its parameters are the short prompt, DePT's offset factors and the fusion / projection
    weights; its roles (what the forward uses and :meth:`stored` gives) are kind ``dept``'s."""

    def prompt(self) -> torch.Tensor:
        """The fused, projected prompt ``E [n, dim]`` (plugin docstring)."""
        w = dict(self.weights.items())
        p, scale = w["prompt"], float(self.entry["params"]["scale"])
        kv = torch.cat([p, scale * (w["offset_A"] @ w["offset_B"])])
        fused = p + torch.softmax(p @ kv.T / math.sqrt(p.shape[1]), dim=-1) @ kv
        gate = torch.softmax(fused.mean(0) @ w["gate"], dim=-1)
        return fused + torch.einsum("k,nd,kdq,kqe->ne", gate, fused, w["space_U"], w["space_W"])

    def tensors(self) -> dict[str, torch.Tensor]:
        w = dict(self.weights.items())
        return {"embeddings": self.prompt(), "offset_A": w["offset_A"], "offset_B": w["offset_B"]}

    def stored(self) -> dict[str, torch.Tensor]:
        return self.tensors()


class EPT(DePT):
    name = "ept"
    summary = "EPT: DePT with prompt fusion and a gated multi-space projection, stored as DePT"
    config_schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": {
        **DePT.config_schema["properties"], "num_spaces": {"type": "integer", "minimum": 1},
        "space_rank": {"type": "integer", "minimum": 1}}}
    defaults: ClassVar[dict[str, Any]] = {**DePT.defaults, "num_spaces": 4, "space_rank": 4}

    def layer(self, module: nn.Module, cfg: dict[str, Any]) -> af.TrainableDelta:
        dept = super().layer(module, cfg)
        dim, spaces, q = module.weight.shape[1], cfg["num_spaces"], cfg["space_rank"]
        w = dict(dept.weights.items())
        gen = torch.Generator().manual_seed(cfg["seed"] + 2)
        dtype = w["offset_A"].dtype
        params = {"prompt": w["embeddings"].detach(), "offset_A": w["offset_A"].detach(),
                  "offset_B": w["offset_B"].detach(),
                  "space_U": (torch.randn(spaces, dim, q, generator=gen) / math.sqrt(dim)).to(dtype),
                  "space_W": torch.zeros(spaces, q, dim, dtype=dtype), "gate": torch.zeros(dim, spaces, dtype=dtype)}
        return EPTDelta(dept.entry, params)


class MultitaskPromptKind(PromptLikeKind):
    """Kind ``multitask_prompt``: a shared prompt scaled elementwise by a task's low-rank matrix (plugin docstring)."""

    name = "multitask_prompt"
    label = "multitask prompt"
    required_roles = ("embeddings", "task_cols", "task_rows")

    def check(self, module: str, entry: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
        af.registry.get_kind("prompt").check(module, entry, shapes)
        (n, dim), cols, rows = shapes["embeddings"], shapes["task_cols"], shapes["task_rows"]
        if len(cols) != 3 or len(rows) != 3 or cols[0] != rows[0] or cols[1] != n or cols[2] != rows[1] \
                or rows[2] != dim or cols[0] < 1:
            raise af.FormatError(f"module {module!r}: multitask_prompt task_cols {list(cols)} and task_rows "
                                 f"{list(rows)} must be [tasks, {n}, r] and [tasks, r, {dim}]")
        task = entry.get("params", {}).get("task")
        if task is not None and (type(task) is not int or not 0 <= task < cols[0]):
            raise af.FormatError(f"module {module!r}: multitask_prompt params.task {task!r} is not a task id "
                                 f"in [0, {cols[0]})")

    @staticmethod
    def prompt(entry: dict[str, Any], t: dict[str, torch.Tensor]) -> torch.Tensor:
        """Task ``params.task``'s prompt ``[n, dim]`` (the only task when there is one)."""
        tasks = t["task_cols"].shape[0]
        task = entry.get("params", {}).get("task", 0 if tasks == 1 else None)
        if task is None:
            raise af.UnsupportedError(f"a multitask prompt of {tasks} tasks applies one: choose it with params.task "
                                      "(MultitaskPromptTuning.for_task)")
        return t["embeddings"] * (t["task_cols"][task] @ t["task_rows"][task])

    def bind(self, module: nn.Module, entry: dict[str, Any], t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.prompt(entry, t)  # refuses at attach when no task is chosen
        return t

    def forward(self, module: nn.Module, entry: dict[str, Any], t: dict[str, torch.Tensor], x: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
        return af.registry.get_kind("prompt").forward(module, entry, {"embeddings": self.prompt(entry, t)}, x, y)

    def forward_rows(self, module: nn.Module, present: list[tuple[int, Any]], x: torch.Tensor, y: torch.Tensor,
                     ids: torch.Tensor) -> torch.Tensor:
        """Per-row tasks (PEFT's ``task_ids``): row ``i`` gets the prompt of the adapter ``ids[i]`` names. Every
        row needs a prompt of one length (a row without one would be shorter)."""
        prompts = {i: self.prompt(b.entry, b.tensors) for i, b in present}
        if y.dim() != 3 or not set(ids.tolist()) <= set(prompts) or len({p.shape for p in prompts.values()}) != 1:
            raise af.UnsupportedError("per-row multitask prompts need a prompt of one length on every row of a "
                                      "[batch, T] input")
        return torch.cat([torch.stack([prompts[i] for i in ids.tolist()]).to(y.dtype), y], dim=1)



class MultitaskPromptTuning(PromptTuning):
    name = "multitask_prompt_tuning"
    summary = "Multitask prompt tuning: a shared prompt times a per-task low-rank matrix (PEFT's MPT)"
    kinds = ("multitask_prompt",)
    config_schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": {
        **_PROMPT_SCHEMA, "num_tasks": {"type": "integer", "minimum": 1},
        "num_ranks": {"type": "integer", "minimum": 1}, "task": {"type": "integer", "minimum": 0}}}
    defaults: ClassVar[dict[str, Any]] = {**PromptTuning.defaults, "num_tasks": 1, "num_ranks": 1, "task": 0}

    def layer(self, module: nn.Module, cfg: dict[str, Any]) -> af.TrainableDelta:
        if cfg["task"] >= cfg["num_tasks"]:
            raise af.FormatError(f"task {cfg['task']} is not below num_tasks {cfg['num_tasks']}")
        n, (tasks, r), dim = cfg["num_virtual_tokens"], (cfg["num_tasks"], cfg["num_ranks"]), module.weight.shape[1]
        gen = torch.Generator().manual_seed(cfg["seed"] + 1)
        dtype = af.adapter_dtype(module)
        params = {"embeddings": self.prompt(module, cfg),
                  "task_cols": (0.02 * torch.randn(tasks, n, r, generator=gen)).to(dtype),
                  "task_rows": (0.02 * torch.randn(tasks, r, dim, generator=gen)).to(dtype)}
        entry = {"kind": "multitask_prompt", "shape": list(module.weight.shape),
                 "params": {"position": "prefix", "task": cfg["task"]}}
        return af.TrainableDelta(entry, params)

    @staticmethod
    def for_task(adapter: af.Adapter, task: int) -> af.Adapter:
        """``adapter`` (in memory, tensors shared) with every ``multitask_prompt`` entry applying task ``task``;
        checked like any entry (a task id out of range is refused)."""
        manifest = copy.deepcopy(adapter.manifest)
        entries = [e for e in manifest["modules"].values() if e["kind"] == "multitask_prompt"]
        if not entries:
            raise af.FormatError("the adapter has no multitask_prompt entry", path=adapter.source)
        for e in entries:
            e.setdefault("params", {})["task"] = task
        out = af.Adapter(manifest, adapter.tensors())
        af.validate(out)
        return out


@af.hookimpl
def adapterfmt_delta_kinds() -> list[af.DeltaKind]:
    return [DePTKind(), MultitaskPromptKind()]


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [PromptTuning(), DePT(), EPT(), MultitaskPromptTuning()]
