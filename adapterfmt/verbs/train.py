"""Training by injection: trainable deltas on the targeted modules of any torch model, the rest frozen.

A method's ``train`` verb selects modules (:func:`adapterfmt.verbs.targets.select_targets`), builds one
:class:`TrainableDelta` per module and hands them to :func:`inject`. A trainable delta is a delta kind's
module entry whose tensors are ``nn.Parameter`` s: its forward *is* the kind's unmerged forward, so what
is trained is exactly what :func:`adapterfmt.attach` applies later. Train with any loop over
``session.parameters()``; ``session.extract()`` returns the :class:`Adapter`; ``session.remove()`` gives
the model back as it was (module names and ``state_dict`` keys are untouched while no session is live).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..deltas.modules import held_quantized, is_transposed, weight_shape
from ..deltas.prompt import on_model_inputs, prompted_call
from ..errors import AdapterError
from ..format.adapter import Adapter
from ..format.fingerprint import fingerprint_module
from ..format.manifest import new_manifest
from ..plugin.registry import get_kind, get_method
from .targets import select_targets

GradMask = Callable[[str, nn.Parameter, int], "torch.Tensor | None"]
"""A gradient mask: ``fn(name, parameter, step)`` -> a mask to multiply the gradient by, or ``None``."""

LAYER_ATTR = "adapterfmt_delta"
"""Name under which a trainable delta is registered as a child of its target module."""


def module_entry(kind: str, module: nn.Module, params: Mapping[str, Any] | None = None, *,
                 parameter: str = "weight") -> dict[str, Any]:
    """A module entry of ``kind`` for a live module: its parameter's stored shape and, when the module
    stores that weight ``[in, out]`` (Conv1D, Embedding), ``params.transposed``."""
    p = dict(params or {})
    if is_transposed(module):
        p["transposed"] = True
    return {"kind": kind, "shape": weight_shape(module, parameter), "params": p,
            **({"parameter": parameter} if parameter != "weight" else {})}


def adapter_dtype(module: nn.Module) -> torch.dtype:
    """The dtype new adapter parameters get: the module's, but fp32 for half-precision and quantised modules."""
    ref = getattr(module, "weight", None)
    if not isinstance(ref, torch.Tensor) or ref.dtype in (torch.float16, torch.bfloat16) or held_quantized(module):
        return torch.float32
    return ref.dtype


def orthonormality(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """A regulariser for low-rank factors: the mean over ``(A [r, in], B [out, r])`` pairs of ``||A A^T - I||_F``
    and ``||B^T B - I||_F`` (SORSA's ``calc_ortho``, AdaLoRA's and TriAdaptLoRA's orthogonality term)."""
    terms = []
    for a, b in pairs:
        terms.append(torch.linalg.norm(a @ a.t() - torch.eye(a.shape[0], device=a.device, dtype=a.dtype)))
        terms.append(torch.linalg.norm(b.t() @ b - torch.eye(b.shape[1], device=b.device, dtype=b.dtype)))
    return torch.stack(terms).mean()


class RoleParameters(nn.Module):
    """A delta's trainable roles as parameters named by role (``nn.ParameterDict`` refuses role names
    such as ``values`` or ``keys``, which are its own methods)."""

    def __init__(self, params: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        for role, t in params.items():
            self.register_parameter(role, nn.Parameter(t))

    def items(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.named_parameters(recurse=False)


class TrainableDelta(nn.Module):
    """One module's delta in training: a module entry of a delta kind, its trainable roles as parameters,
    ``frozen`` roles of this module stored as they are (e.g. a sparse delta's chosen ``indices``),
    ``shared`` roles (``{role: (tensor name, tensor)}``) stored once for the whole adapter (frozen, or trained
    when the tensor is an ``nn.Parameter``: pass the same one to every module that shares it), and
    ``derived`` roles the forward uses but :meth:`TrainSession.extract` does not store, because readers
    recompute them from the base (a lowrank derived base part, spec 6.2.1)."""

    def __init__(self, entry: dict[str, Any], params: Mapping[str, torch.Tensor], *,
                 frozen: Mapping[str, torch.Tensor] | None = None,
                 shared: Mapping[str, tuple[str, torch.Tensor]] | None = None,
                 derived: Mapping[str, torch.Tensor] | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.entry = copy.deepcopy(entry)
        self.kind = get_kind(entry["kind"])
        self.weights = RoleParameters(params)
        self.frozen_roles = tuple(frozen or ())
        for role, t in (frozen or {}).items():
            self.register_buffer(role, t, persistent=False)
        self.shared_names = {role: name for role, (name, _) in (shared or {}).items()}
        for role, (_, t) in (shared or {}).items():
            if isinstance(t, nn.Parameter):
                self.register_parameter(role, t)
            else:
                self.register_buffer(role, t, persistent=False)
        if self.shared_names:
            self.entry.setdefault("params", {})["shared"] = dict(self.shared_names)
        self.derived_roles = tuple(derived or ())
        for role, t in (derived or {}).items():
            self.register_buffer(role, t, persistent=False)
        self.dropout_p = float(dropout)
        self.keep_dropout = False
        """Apply the input dropout in eval mode too (Monte-Carlo estimates; :meth:`TrainSession.mc_dropout`)."""

    def tensors(self) -> dict[str, torch.Tensor]:
        fixed = (*self.shared_names, *self.frozen_roles, *self.derived_roles)
        return {**{r: getattr(self, r) for r in fixed}, **dict(self.weights.items())}

    def stored(self) -> dict[str, torch.Tensor]:
        """The module's own roles as :meth:`TrainSession.extract` stores them: the trained and frozen roles
        (a delta whose trained tensors are not its stored roles, e.g. blocks of a growing rank, overrides this)."""
        return {**dict(self.weights.items()), **{r: getattr(self, r) for r in self.frozen_roles}}

    def restored(self) -> None:
        """Rebuild what the delta derives from its roles after a checkpoint replaced them (none by default)."""

    def forward(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.dropout_p:
            x = nn.functional.dropout(x, self.dropout_p, training=self.training or self.keep_dropout)
        return self.kind.forward(module, self.entry, self.tensors(), x, y)


class TrainSession:
    """A model with trainable deltas injected; see the module docstring."""

    def __init__(self, model: nn.Module, method: str, config: Mapping[str, Any]) -> None:
        self.model, self.method = model, method
        self.config = json.loads(json.dumps(dict(config), default=list))
        self.fingerprint = fingerprint_module(model)
        self.layers: dict[str, TrainableDelta] = {}
        self._handles: dict[str, Any] = {}
        self._grad = {name: p.requires_grad for name, p in model.named_parameters()}  # by name: holds no weight
        for p in model.parameters():
            p.requires_grad_(False)
        self._step_hooks: list[Callable[[torch.optim.Optimizer | None], None]] = []
        self._grad_masks: list[GradMask] = []
        self._freezes: dict[str, int] = {}
        self._skips: list[Callable[[str, int], bool]] = []
        self._unarmed: dict[int, nn.Parameter] = {}
        self._rank_masks: dict[str, torch.Tensor] = {}
        self.steps = 0
        """Optimizer steps taken (:meth:`step` counts them; a resumed run sets it to the checkpoint's step)."""
        self.optimizer_factory: Callable[..., torch.optim.Optimizer] | None = None
        """The method's own optimizer class or factory (``factory(params, **kwargs)``), when it needs one."""
        self.base_quantization: dict[str, Any] | None = None
        """The quantisation record of the base the deltas train on (spec 6.12), written to ``base.quantization``."""
        self.tasks: tuple[str, ...] | None = None
        """The task names the method supervises per token (a mixture's experts: MeteoRA's gate labels), or None.
        When set, ``adapter train`` reads each record's ``task`` and passes ``task_ids`` ``[B, T]`` (indices into
        this tuple, -100 for none) to :meth:`regularization`."""

    def add(self, path: str, module: nn.Module, layer: TrainableDelta) -> None:
        ref = getattr(module, "weight", None)
        if isinstance(ref, torch.Tensor):
            layer.to(device=ref.device)
        module.add_module(LAYER_ATTR, layer)
        self.layers[path] = layer
        n = layer.kind.prepends(layer.entry, layer.tensors())
        if n and on_model_inputs(self.model):  # a prompt acts on the model's inputs, as attached (apply.Slot)
            def pre_hook(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                self._arm(path, layer)
                return prompted_call(model, args, kwargs, n, module, lambda ids, y: layer(module, ids, y))

            self._handles[path] = self.model.register_forward_pre_hook(pre_hook, with_kwargs=True)
            return
        busy = False

        def hook(m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
            nonlocal busy
            if busy:  # a kind whose forward calls the module again (dense: functional_call) gets the plain module
                return None
            busy = True
            try:
                self._arm(path, layer)
                return layer(m, args[0], out)
            finally:
                busy = False

        self._handles[path] = module.register_forward_hook(hook)

    def keep_hook(self, name: str, handle: Any) -> None:
        """Keep a hook ``handle`` a method registered on the model (e.g. to read activations for its loss term):
        :meth:`remove` removes it with the deltas. ``name`` must not be a trained module's path."""
        if name in self._handles:
            raise AdapterError(f"keep_hook: {name!r} is taken")
        self._handles[name] = handle

    def on_step(self, fn: Callable[[torch.optim.Optimizer | None], None]) -> None:
        """Run ``fn(optimizer)`` at every :meth:`step` (a method's schedule, e.g. SpIEL's mask reselection). A
        hook with ``state_dict()`` and ``load_state_dict(state)`` (tensors, numbers, strings, lists, dicts)
        is checkpointed (:meth:`schedule_state`); the state of one without them cannot be."""
        self._step_hooks.append(fn)

    @property
    def has_schedule(self) -> bool:
        """Whether the session holds schedule state a checkpoint cannot save: an :meth:`on_step` hook without
        ``state_dict`` / ``load_state_dict``. Pruned ranks are saved (:meth:`schedule_state`); :meth:`freeze_after`
        and gradient masks are functions of :attr:`steps`."""
        return any(not (hasattr(fn, "state_dict") and hasattr(fn, "load_state_dict")) for fn in self._step_hooks)

    @property
    def static(self) -> bool:
        """Whether what trains is fixed while training: no :meth:`on_step` schedule (which may grow, drop or prune
        deltas) and no :meth:`skip_gradients`; :meth:`freeze_after` and gradient masks only drop gradients."""
        return not self._step_hooks and not self._skips

    def schedule_state(self) -> dict[str, Any]:
        """What a checkpoint holds besides the adapter and the optimizer: the pruned ranks' masks, each
        :meth:`on_step` hook's ``state_dict()`` (refused while :attr:`has_schedule`) and the trained tensors the
        adapter does not store as themselves (:meth:`unstored`, e.g. EPT's reparameterisation)."""
        if self.has_schedule:
            raise AdapterError("an on_step hook without state_dict / load_state_dict: its state cannot be saved")
        return {"rank_masks": {p: m.cpu() for p, m in self._rank_masks.items()},
                "hooks": [fn.state_dict() for fn in self._step_hooks],  # type: ignore[attr-defined]
                "weights": {f"{path}.{role}": p.detach().cpu() for path, layer in self.layers.items()
                            for role, p in self.unstored(layer)}}

    @staticmethod
    def unstored(layer: TrainableDelta) -> list[tuple[str, torch.Tensor]]:
        """``layer``'s trained ``(role, parameter)`` pairs that its :meth:`~TrainableDelta.stored` roles do not
        hold as themselves (a role computed from them, e.g. EPT's prompt, or none): a checkpoint's adapter cannot
        restore them, so :meth:`schedule_state` saves them."""
        stored = layer.stored()
        return [(role, p) for role, p in layer.weights.items() if stored.get(role) is not p]

    def load_schedule_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`schedule_state` into a session built the same way (the same hooks, in order)."""
        if len(state["hooks"]) != len(self._step_hooks) or not set(state["rank_masks"]) <= set(self.layers):
            raise AdapterError("the schedule state does not fit this session (other on_step hooks or modules)")
        for path, m in state["rank_masks"].items():
            self._rank_masks[path] = m.to(self.layers[path].weights.lora_A.device)
            self._project(path)
        for fn, st in zip(self._step_hooks, state["hooks"], strict=True):
            fn.load_state_dict(st)  # type: ignore[attr-defined]
        want = {f"{path}.{role}": p for path, layer in self.layers.items() for role, p in self.unstored(layer)}
        weights = state.get("weights", {})
        if set(weights) != set(want):
            raise AdapterError("the schedule state does not fit this session (other unstored trained tensors)")
        with torch.no_grad():
            for name, p in want.items():
                p.copy_(weights[name])

    def mask_gradients(self, fn: GradMask) -> None:
        """After each backward pass (:meth:`after_backward`), ``fn(name, parameter, step)`` gives a mask the
        gradient is multiplied by (broadcast to its shape), or ``None`` to leave it. ``name`` is as in
        :meth:`named_parameters`; ``step`` counts optimizer steps taken. A masked entry gets no gradient, but a
        momentum optimizer still moves it by its history; use :meth:`freeze_after` to stop a parameter."""
        self._grad_masks.append(fn)

    def freeze_after(self, paths: str | Iterable[str], step: int) -> None:
        """Stop training the deltas of module ``paths`` once ``step`` optimizer steps are taken: from then on
        their gradients are dropped (``None``), so the optimizer skips them (no momentum, no weight decay)."""
        for path in [paths] if isinstance(paths, str) else list(paths):
            if path not in self.layers:
                raise AdapterError(f"freeze_after: no trained delta on module {path!r}")
            self._freezes[path] = step

    def skip_gradients(self, fn: Callable[[str, int], bool]) -> None:
        """At each step where ``fn(path, step)`` is true, module ``path``'s deltas get no gradient (``None``): the
        optimizer skips them (no momentum, no weight decay). Their trained roles do not require grad in that step's
        forward passes (set as each delta runs, with grad enabled; :meth:`after_backward` turns the flags back on),
        so autograd computes no gradient for them and, below the lowest delta that trains, no backward at all.
        A step must train some parameter (else its loss has no gradient). A per-step layer schedule (IST) calls
        this once; ``step`` counts optimizer steps taken."""
        self._skips.append(fn)

    def _skipped(self, path: str) -> bool:
        return any(fn(path, self.steps) for fn in self._skips)

    def _arm(self, path: str, layer: TrainableDelta) -> None:
        """Before ``layer``'s forward with grad enabled: turn off ``requires_grad`` of its trained roles where
        :meth:`skip_gradients` skips ``path`` at this step, back on where it no longer does."""
        if not self._skips or not torch.is_grad_enabled():
            return
        skip = self._skipped(path)
        for p in layer.weights.parameters():
            if skip and p.requires_grad:
                p.requires_grad_(False)
                self._unarmed[id(p)] = p
            elif not skip and self._unarmed.pop(id(p), None) is not None:
                p.requires_grad_(True)

    def prune_rank(self, path: str, rank: int) -> None:
        """Keep the ``rank`` most important components of module ``path``'s lowrank delta (importance
        ``||B[:, i]|| * ||A[i, :]||``, ties to the lower index) and zero the others for good: their factors
        are zeroed now and after every :meth:`step`, their gradients masked. A rank-pruning schedule calls
        this from an :meth:`on_step` hook; pruning again keeps a subset of what is kept."""
        layer = self.layers.get(path)
        if layer is None or layer.entry["kind"] != "lowrank" or "lora_mid" in dict(layer.weights.items()):
            raise AdapterError(f"prune_rank: module {path!r} has no trained lowrank delta with factors A and B only")
        a, b = layer.weights.lora_A, layer.weights.lora_B
        keep = self._rank_masks.get(path, torch.ones(a.shape[0], dtype=torch.bool, device=a.device))
        if not 0 <= rank <= a.shape[0]:
            raise AdapterError(f"prune_rank: rank {rank} outside 0..{a.shape[0]} for module {path!r}")
        with torch.no_grad():
            score = (b.norm(dim=0) * a.norm(dim=1)).float().masked_fill(~keep, -1.0)
            order = torch.argsort(-score, stable=True)
            mask = torch.zeros_like(keep)
            mask[order[:rank]] = True
            self._rank_masks[path] = mask & keep
            self._project(path)

    def drop(self, path: str) -> None:
        """Take module ``path``'s delta out of the session for good (a module-selection schedule); an optimizer
        that holds its parameters skips them from now on (they get no gradient)."""
        layer = self.layers.pop(path, None)
        if layer is None:
            raise AdapterError(f"drop: no trained delta on module {path!r}")
        self._handles.pop(path).remove()
        delattr(self.model.get_submodule(path), LAYER_ATTR)
        self._freezes.pop(path, None)
        self._rank_masks.pop(path, None)

    def ranks(self) -> dict[str, int]:
        """The rank each pruned module keeps."""
        return {path: int(m.sum()) for path, m in self._rank_masks.items()}

    def _project(self, path: str) -> None:
        layer, mask = self.layers[path], self._rank_masks[path]
        with torch.no_grad():
            layer.weights.lora_A.mul_(mask[:, None].to(layer.weights.lora_A.dtype))
            layer.weights.lora_B.mul_(mask[None, :].to(layer.weights.lora_B.dtype))

    def after_backward(self) -> None:
        """Call between the backward pass and the optimizer step: applies :meth:`freeze_after`,
        :meth:`skip_gradients` (and turns its ``requires_grad`` flags back on), :meth:`prune_rank` and
        :meth:`mask_gradients` to the gradients."""
        for p in self._unarmed.values():
            p.requires_grad_(True)
        self._unarmed = {}
        for path, layer in self.layers.items():
            frozen = (path in self._freezes and self.steps >= self._freezes[path]) or self._skipped(path)
            mask = self._rank_masks.get(path)
            for role, p in layer.weights.items():
                if frozen:
                    p.grad = None
                    continue
                if p.grad is None:
                    continue
                if mask is not None and role in ("lora_A", "lora_B"):
                    p.grad.mul_((mask[:, None] if role == "lora_A" else mask[None, :]).to(p.grad.dtype))
                for fn in self._grad_masks:
                    m = fn(f"{path}.{role}", p, self.steps)
                    if m is not None:
                        p.grad.mul_(m.to(p.grad.dtype))

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Call after each optimizer step of your loop: counts the step, keeps pruned ranks at zero and runs the
        method's schedule (a no-op for static methods)."""
        self.steps += 1
        for path in self._rank_masks:
            self._project(path)
        for fn in self._step_hooks:
            fn(optimizer)

    @contextlib.contextmanager
    def mc_dropout(self) -> Iterator[None]:
        """Within the block the deltas' input dropout acts in eval mode too, so repeated forward passes sample
        it (Monte-Carlo dropout estimates of the mean and its uncertainty)."""
        for layer in self.layers.values():
            layer.keep_dropout = True
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.keep_dropout = False

    def optimizer(self, **kwargs: Any) -> torch.optim.Optimizer:
        """An optimizer over :meth:`parameters`: the method's own (:attr:`optimizer_factory`) or ``AdamW``."""
        factory = self.optimizer_factory or torch.optim.AdamW
        return factory(list(self.parameters()), **kwargs)

    def regularization(self, **outputs: torch.Tensor) -> torch.Tensor:
        """The method's regularisation term on the current parameters (a 0-dim tensor, 0 for most methods), to
        add to the task loss in any training loop; ``outputs`` are what some methods need besides the
        parameters (e.g. ``logits`` and ``base_logits``). See :meth:`Method.regularization`."""
        return get_method(self.method).regularization(self, **outputs)

    def parameters(self) -> Iterator[nn.Parameter]:
        """The trainable parameters (pass these to your optimizer)."""
        for _, p in self.named_parameters():
            yield p

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(module path.role, parameter)`` of each delta, then each trained shared tensor once, under its
        tensor name."""
        for path, layer in self.layers.items():
            for role, p in layer.weights.items():
                yield f"{path}.{role}", p
        seen = set()
        for layer in self.layers.values():
            for role, name in layer.shared_names.items():
                p = getattr(layer, role)
                if isinstance(p, nn.Parameter) and name not in seen:
                    seen.add(name)
                    yield name, p

    def extract(self, *, dtype: torch.dtype | None = None, base_name: str | None = None) -> Adapter:
        """The adapter as trained so far (tensors copied; the session goes on training)."""
        if not self.layers:
            raise AdapterError("this training session was removed; nothing to extract")
        modules: dict[str, dict[str, Any]] = {}
        tensors: dict[str, torch.Tensor] = {}

        def keep(t: torch.Tensor) -> torch.Tensor:
            t = t.detach().to("cpu", copy=True)
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t.contiguous()

        for path, layer in self.layers.items():
            modules[path] = copy.deepcopy(layer.entry)
            tensors.update({f"{path}.{role}": keep(t) for role, t in layer.stored().items()})
            for role, name in layer.shared_names.items():
                if name not in tensors:
                    tensors[name] = keep(getattr(layer, role))
        base = {"name": base_name, "revision": None, "fingerprint": self.fingerprint}
        if self.base_quantization is not None:
            base["quantization"] = dict(self.base_quantization)
        manifest = new_manifest(self.method, modules, config=self.config, base=base,
                                provenance=[{"tool": "adapterfmt train"}])
        return Adapter(manifest, tensors)

    def remove(self) -> None:
        """Take the injected deltas out and restore every parameter's ``requires_grad``."""
        for h in self._handles.values():
            h.remove()
        for path in self.layers:
            delattr(self.model.get_submodule(path), LAYER_ATTR)
        for name, flag in self._grad.items():
            self.model.get_parameter(name).requires_grad_(flag)
        self._handles, self.layers, self._step_hooks = {}, {}, []
        self._grad_masks, self._freezes, self._rank_masks, self._skips, self._unarmed = [], {}, {}, [], {}

    def __enter__(self) -> TrainSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def inject(model: nn.Module, *, method: str, config: Mapping[str, Any],
           build: Callable[[str, nn.Module], TrainableDelta],
           supported: tuple[type | str, ...] = (nn.Linear, "Conv1D"),
           targets: Mapping[str, Any] | None = None) -> TrainSession:
    """Select modules by ``config`` (``target_modules``, ``exclude_modules``, ``layers_to_transform``,
    ``layers_pattern``), freeze the model, and inject ``build(path, module)`` into each selected module.

    ``targets`` replaces ``config`` for the selection only, for methods whose modules follow from other
    fields (a prompt's embedding module); ``config`` is what the adapter records."""
    chosen = select_targets(model, config if targets is None else targets, supported=supported)
    session = TrainSession(model, method, config)
    try:
        for path, module in chosen.items():
            layer = build(path, module)
            if held_quantized(module):  # only kinds that compute on the module's dequantisation train on it
                get_kind(layer.entry["kind"]).check_module(path, layer.entry, module)
            session.add(path, module, layer)
    except BaseException:
        session.remove()
        raise
    return session
