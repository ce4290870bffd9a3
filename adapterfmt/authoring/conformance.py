"""The conformance kit: does an installed method work with every verb of the toolkit?

``check_method(name)`` builds an example (a base model, an adapter of the method, a batch of inputs) and
runs each check of :data:`CHECKS` on fresh copies of it; every check is a named :class:`CheckResult`:
``pass``, ``fail`` (with what went wrong) or ``skip`` (with why the method's kinds cannot do it, e.g. a
prompt cannot be merged into weights). The example comes from, in order:

1. ``factory``: a callable returning an :class:`Example` (any torch model, adapter and inputs);
2. a ``conformance_example()`` method on the :class:`~adapterfmt.Method` object, if it defines one;
3. the method's ``train`` verb on a tiny Llama-shaped model (:func:`adapterfmt.tiny.build_tiny`), its
   parameters nudged away from their initial values so the adapter changes the output;
4. random tensors of the method's first delta kind, for the built-in kinds.

In a plugin's tests, parametrize over :func:`conformance_cases`; each :class:`Case` called inside a test
asserts its check passed, or skips the test with the check's reason::

    @pytest.mark.parametrize("case", conformance_cases("my_method"), ids=str)
    def test_conformance(case):
        case()
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedError
from ..format import manifest as mf
from ..format.adapter import Adapter, load, save
from ..format.fingerprint import fingerprint_module
from ..format.validate import validate
from ..plugin.registry import get_kind, get_method, understood_extensions, verb
from ..threads import one_thread
from ..tiny import TinyConfig, build_tiny
from ..deltas.base_part import is_derived
from ..verbs.apply import adapter_ids, attach, detach, merge_into, unmerge

TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
"""Relative tolerance (of the reference output's largest magnitude) when two computations of one output
may round differently, by the model's dtype."""
RESTORE_ATOL = {torch.float64: 1e-6, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}
"""Absolute tolerance on weights after merge then unmerge, by the weight's dtype."""
TRAIN_CONFIG: dict[str, Any] = {"target_modules": ["q_proj", "v_proj", "down_proj"]}
"""Training config of the default (tiny-model) example; ``check_method(train_config=...)`` replaces it."""
TRAIN_STEPS = 20


@dataclass
class Example:
    """What the checks run on: a base model, an adapter of the method for it, and a batch of inputs
    (at least 2 rows; row i of the output must depend on row i of the input only)."""

    model: nn.Module
    adapter: Adapter
    inputs: torch.Tensor
    train_config: dict[str, Any] | None = None
    """Config for the ``train`` verb on ``model`` (None: :data:`TRAIN_CONFIG`)."""


Factory = Callable[[], Example]


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str
    """``pass``, ``fail`` or ``skip``."""
    detail: str
    seconds: float


@dataclass
class Report:
    """The results of every check for one method."""

    method: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.status != "fail" for r in self.results)

    def by_status(self, status: str) -> dict[str, str]:
        """``{check name: detail}`` of the checks with this status (``skipped`` reasons, failures)."""
        return {r.name: r.detail for r in self.results if r.status == status}

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "ok": self.ok, "results": [asdict(r) for r in self.results]}


class Skip(Exception):
    """Raised by a check that does not apply to the method's kinds; the message is the reason."""


class Failed(Exception):
    """Raised by a check that found the method broken; the message says how."""


# ----- building the example -------------------------------------------------------------------------
def _tiny_base(dtype: torch.dtype = torch.float32) -> nn.Module:
    return build_tiny(0, TinyConfig(vocab_size=32, hidden=16, layers=1, heads=2, intermediate=32)).to(dtype)


def _tiny_inputs(model: nn.Module) -> torch.Tensor:
    vocab = model.config.vocab_size
    return torch.randint(0, vocab, (3, 5), generator=torch.Generator().manual_seed(1))


def _trained_example(name: str, config: dict[str, Any], dtype: torch.dtype) -> Example:
    model = _tiny_base(dtype)
    session = verb(name, "train")(copy.deepcopy(model), config=config)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in session.parameters():
            p.add_((0.05 * torch.randn(p.shape, generator=gen)).to(p.dtype))
    adapter = session.extract()
    session.remove()
    return Example(model, adapter, _tiny_inputs(model), train_config=config)


def _randn(*shape: int, gen: torch.Generator, scale: float = 0.1) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=gen)


def _kind_modules(kind: str, model: nn.Module, gen: torch.Generator) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Module entries and tensors of a random adapter of a built-in ``kind`` for the tiny model."""
    q, down, emb = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.embed_tokens"
    shape = {p: list(model.get_submodule(p).weight.shape) for p in (q, down, emb)}
    if kind == "lowrank":
        modules = {p: {"kind": kind, "shape": shape[p], "params": {"scale": 2.0}} for p in (q, down)}
        return modules, {t: v for p in (q, down) for t, v in (
            (f"{p}.lora_A", _randn(4, shape[p][1], gen=gen)), (f"{p}.lora_B", _randn(shape[p][0], 4, gen=gen)))}
    if kind == "dense":
        modules = {p: {"kind": kind, "shape": shape[p], "params": {"mode": "add"}} for p in (q, down)}
        return modules, {f"{p}.delta": _randn(*shape[p], gen=gen, scale=0.02) for p in (q, down)}
    if kind == "sparse":
        modules, tensors = {}, {}
        for p in (q, down):
            modules[p] = {"kind": kind, "shape": shape[p], "params": {"scale": 1.0}}
            n = math.prod(shape[p])
            tensors[f"{p}.indices"] = torch.randperm(n, generator=gen)[: n // 10].sort().values
            tensors[f"{p}.values"] = _randn(n // 10, gen=gen)
        return modules, tensors
    if kind == "vector":
        modules = {q: {"kind": kind, "shape": shape[q], "params": {"op": "scale", "side": "output"}},
                   down: {"kind": kind, "shape": shape[down], "params": {"op": "scale", "side": "input"}}}
        return modules, {f"{q}.vector": 1 + _randn(shape[q][0], gen=gen), f"{down}.vector": 1 + _randn(shape[down][1], gen=gen)}
    if kind == "prompt":
        return ({emb: {"kind": kind, "shape": shape[emb], "params": {}}},
                {f"{emb}.embeddings": _randn(4, shape[emb][1], gen=gen, scale=1.0)})
    if kind == "rows":
        return ({emb: {"kind": kind, "shape": shape[emb], "params": {}}},
                {f"{emb}.indices": torch.tensor([1, 5, 7, 30]), f"{emb}.values": _randn(4, shape[emb][1], gen=gen)})
    raise UnsupportedError(f"the conformance kit has no example of delta kind {kind!r}: pass a factory "
                           "(check_method(name, factory=...), CLI --factory module:function)")


def _kind_example(name: str, kinds: tuple[str, ...], dtype: torch.dtype) -> Example:
    if not kinds:
        raise UnsupportedError(f"method {name!r} lists no delta kinds and has no train verb: pass a factory")
    model = _tiny_base(dtype)
    modules, tensors = _kind_modules(kinds[0], model, torch.Generator().manual_seed(3))
    base = {"name": "adapterfmt-tiny", "revision": None, "fingerprint": fingerprint_module(model)}
    adapter = Adapter(mf.new_manifest(name, modules, base=base, provenance=[{"tool": "adapterfmt conformance"}]),
                      {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()})
    return Example(model, adapter, _tiny_inputs(model))


def _trainable(name: str) -> bool:
    from ..verbs.method import Method

    override = verb(name, "train")
    return getattr(override, "__func__", None) is not Method.train


def build_example(name: str, factory: Factory | None = None, *, train_config: dict[str, Any] | None = None,
                  dtype: torch.dtype = torch.float32) -> Example:
    """The example the checks of method ``name`` run on (see the module docstring for where it comes from)."""
    method = get_method(name)
    if factory is None:
        factory = getattr(method, "conformance_example", None)
    if factory is not None:
        example = factory()
        if not isinstance(example, Example):
            raise UnsupportedError(f"the conformance factory of {name!r} returned {type(example).__name__}, "
                                   "not an adapterfmt.authoring.conformance.Example")
        return example
    if _trainable(name):
        return _trained_example(name, train_config or _default_train_config(method), dtype)
    return _kind_example(name, tuple(method.kinds), dtype)


# ----- helpers ------------------------------------------------------------------------------------------
def _default_train_config(method: Any) -> dict[str, Any]:
    """:data:`TRAIN_CONFIG` less the keys the method's config schema does not know (prompt methods take no
    target modules, and unknown keys are refused)."""
    known = (method.config_schema or {}).get("properties")
    return {k: v for k, v in TRAIN_CONFIG.items() if known is None or k in known}


def _output(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(inputs)
    if not isinstance(out, torch.Tensor):
        out = out.logits if hasattr(out, "logits") else out[0]
    return out.detach().float()


def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _expect_close(what: str, got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> str:
    """Fail unless ``got`` is within the dtype's tolerance of ``ref``; returns the measured difference."""
    d = _diff(got, ref)
    limit = TOLERANCE.get(dtype, 1e-2) * max(1.0, float(ref.abs().max()) if ref.numel() else 1.0)
    if not d <= limit:
        shapes = "" if got.shape == ref.shape else f" (shapes {list(got.shape)} vs {list(ref.shape)})"
        raise Failed(f"{what}: max |diff| {d:.3g} > {limit:.3g}{shapes}")
    return f"max |diff| {d:.2g}"


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _copy(adapter: Adapter) -> Adapter:
    return Adapter(mf.copy_manifest(adapter.manifest), adapter.tensors())


def _mergeability(ex: Example) -> str | None:
    """Why the adapter cannot be merged into the model's weights (None: it can)."""
    model = copy.deepcopy(ex.model)
    attach(model, _copy(ex.adapter), name="a")
    try:
        merge_into(model, "a")
    except UnsupportedError as e:
        return f"not mergeable into weights: {e.message}"
    finally:
        detach(model)
    return None


def _not_additive(adapter: Adapter) -> list[str]:
    """``module (kind)`` for each entry that is not ``W + dW`` (cannot be combined in delta space)."""
    out = []
    for path, entry in sorted(adapter.modules.items()):
        if not get_kind(entry["kind"]).is_additive(entry, adapter.roles(path)):
            out.append(f"{path} ({entry['kind']})")
    return out


def _with_adapter(ex: Example, adapter: Adapter, *, merge: bool = False) -> torch.Tensor:
    """The output of a fresh copy of the base with ``adapter`` applied by its method's ``apply`` verb."""
    model = copy.deepcopy(ex.model)
    verb(adapter.method, "apply")(model, adapter, name="a", merge=merge)
    return _output(model, ex.inputs)


# ----- the checks ---------------------------------------------------------------------------------------
def check_manifest(name: str, ex: Example) -> str:
    """The manifest follows the schema, names the method, uses its kinds, and its config validates."""
    a = ex.adapter
    with tempfile.TemporaryDirectory(prefix="adapterfmt-conformance-") as tmp:
        written = save(_copy(a), Path(tmp, "a")) / "adapter.json"
        mf.check_manifest(mf.loads(written.read_bytes()), path=written, understood=understood_extensions())
    if a.method != name:
        raise Failed(f"the example adapter's method is {a.method!r}, not {name!r}")
    method = get_method(name)
    kinds = sorted({e["kind"] for e in a.modules.values()})
    foreign = [k for k in kinds if method.kinds and k not in method.kinds]
    if foreign:
        raise Failed(f"modules use kind(s) {foreign} that method {name!r} does not list in kinds {list(method.kinds)}")
    for k in kinds:
        get_kind(k)
    method.check_config(a.config)
    return f"{len(a.modules)} module(s), kinds {', '.join(kinds)}"


def _roundtrip(ex: Example, single_file: bool) -> str:
    suffix = ".safetensors" if single_file else ""
    with tempfile.TemporaryDirectory(prefix="adapterfmt-conformance-") as tmp:
        first, second = Path(tmp, "first" + suffix), Path(tmp, "second" + suffix)
        save(_copy(ex.adapter), first)
        loaded = load(first)
        save(loaded, second)
        files = [("", first, second)] if single_file else [
            (f"/{n}", first / n, second / n) for n in sorted(p.name for p in first.iterdir())]
        for rel, p1, p2 in files:
            if p1.read_bytes() != (p2.read_bytes() if p2.exists() else None):
                raise Failed(f"save -> load -> save changed {p1.name}{rel if not single_file else ''}")
        for role in ex.adapter.tensor_names():
            if not torch.equal(loaded.tensor(role), ex.adapter.tensor(role)):
                raise Failed(f"tensor {role} changed in the round trip")
        return f"{sum(p.stat().st_size for _, p, _ in files)} bytes, identical"


def check_roundtrip_folder(name: str, ex: Example) -> str:
    """save -> load -> save of the folder form is byte-identical, tensors unchanged."""
    return _roundtrip(ex, single_file=False)


def check_roundtrip_file(name: str, ex: Example) -> str:
    """save -> load -> save of the single-file form is byte-identical, tensors unchanged."""
    return _roundtrip(ex, single_file=True)


def check_validate(name: str, ex: Example) -> str:
    """Full validation passes in memory and on both saved forms."""
    validate(_copy(ex.adapter))
    with tempfile.TemporaryDirectory(prefix="adapterfmt-conformance-") as tmp:
        for p in (Path(tmp, "folder"), Path(tmp, "file.safetensors")):
            validate(save(_copy(ex.adapter), p))
    return "in memory, folder and single file"


def check_attach(name: str, ex: Example) -> str:
    """Attached unmerged, the adapter changes the model's output."""
    base = _output(ex.model, ex.inputs)
    got = _with_adapter(ex, _copy(ex.adapter))
    d = _diff(got, base)
    if got.shape == base.shape and d <= TOLERANCE.get(_dtype(ex.model), 1e-2) * max(1.0, float(base.abs().max())):
        raise Failed(f"attaching the adapter left the output unchanged (max |diff| {d:.3g}); "
                     "is the example adapter all zeros, or does the kind's forward do nothing?")
    return f"output moved by {d:.3g}" if math.isfinite(d) else f"output shape {list(base.shape)} -> {list(got.shape)}"


def check_merge_equals_unmerged(name: str, ex: Example) -> str:
    """Merged into the weights, the adapter gives the unmerged output (within the dtype's tolerance)."""
    reason = _mergeability(ex)
    if reason:
        raise Skip(reason)
    return _expect_close("merged vs unmerged output", _with_adapter(ex, _copy(ex.adapter), merge=True),
                         _with_adapter(ex, _copy(ex.adapter)), _dtype(ex.model))


def check_unmerge_restores(name: str, ex: Example) -> str:
    """merge then unmerge gives the original weights back."""
    reason = _mergeability(ex)
    if reason:
        raise Skip(reason)
    model = copy.deepcopy(ex.model)
    before = _state(model)
    attach(model, _copy(ex.adapter), name="a", merge=True)
    moved = max(_diff(v, before[k]) for k, v in model.state_dict().items())
    unmerge(model, "a")
    worst = 0.0
    for k, v in model.state_dict().items():
        d = _diff(v, before[k])
        if not d <= RESTORE_ATOL.get(v.dtype, 0.0):
            raise Failed(f"after unmerge {k} differs from the original by {d:.3g}")
        worst = max(worst, d)
    if moved == 0:
        raise Failed("merging changed no weight")
    return f"weights restored to {worst:.2g} (merge moved them {moved:.3g})"


def check_detach_restores(name: str, ex: Example) -> str:
    """After detach the model is as before: hooks gone, weights and output exactly as they were after an
    unmerged adapter, weights within the restore tolerance after a merged one."""
    model = copy.deepcopy(ex.model)
    before, base = _state(model), _output(model, ex.inputs)
    hooks = {p: dict(m._forward_hooks) for p, m in model.named_modules()}
    attach(model, _copy(ex.adapter), name="a")
    detach(model)
    for k, v in model.state_dict().items():
        if not torch.equal(v, before[k]):
            raise Failed(f"after detach of an unmerged adapter {k} differs from the original by "
                         f"{_diff(v, before[k]):.3g}")
    left = [p for p, m in model.named_modules() if dict(m._forward_hooks) != hooks[p]]
    if left:
        raise Failed(f"after detach module {left[0]!r} still has a forward hook")
    if not torch.equal(_output(model, ex.inputs), base):
        raise Failed("after detach the output differs from the base model's")
    if _mergeability(ex) is not None:
        return "hooks, weights and output exactly as before"
    attach(model, _copy(ex.adapter), name="a", merge=True)
    detach(model)
    worst = max(_diff(v, before[k]) for k, v in model.state_dict().items())
    if not all(_diff(v, before[k]) <= RESTORE_ATOL.get(v.dtype, 0.0) for k, v in model.state_dict().items()):
        raise Failed(f"after detach of a merged adapter the weights differ from the original by {worst:.3g}")
    return f"exactly as before (unmerged); weights within {worst:.2g} (merged)"


def check_per_row(name: str, ex: Example) -> str:
    """With per-row adapter ids (two adapter names and base rows mixed), each row equals its own run."""
    base, single = _output(ex.model, ex.inputs), _with_adapter(ex, _copy(ex.adapter))
    if single.shape != base.shape:
        raise Skip(f"the adapter changes the output's shape ({list(base.shape)} -> {list(single.shape)}), "
                   "so rows of one batch cannot mix it with base rows")
    n = ex.inputs.shape[0]
    if n < 2:
        raise Failed("the example's inputs need 2 or more rows")
    rows = [("a", None, "b")[i % 3] for i in range(n)]
    model = copy.deepcopy(ex.model)
    attach(model, _copy(ex.adapter), name="a")
    attach(model, _copy(ex.adapter), name="b")
    with adapter_ids(model, rows):
        try:
            got = _output(model, ex.inputs)
        except UnsupportedError as e:  # a refusal in one line (e.g. a prefix acts on the whole batch)
            raise Skip(f"per-row ids refused: {e.message}") from None
    want = torch.stack([base[i] if r is None else single[i] for i, r in enumerate(rows)])
    return _expect_close(f"per-row output (rows {rows})", got, want, _dtype(ex.model))


def check_merge_verb(name: str, ex: Example) -> str:
    """The merge verb: linear, weights [0.5, 0.5] of the adapter with itself, acts as the adapter."""
    blocked = _not_additive(ex.adapter)
    if blocked:
        raise Skip(f"not W + dW, cannot combine in delta space: {', '.join(blocked)}")
    derived = sorted(p for p, e in ex.adapter.modules.items() if is_derived(e))
    if derived:
        raise Skip(f"a derived base part is computed from the base, which a delta-space merge does not take "
                   f"(spec 6.2.1): {derived[0]}")
    merged = verb(name, "merge")([_copy(ex.adapter), _copy(ex.adapter)], weights=[0.5, 0.5], strategy="linear")
    validate(merged)
    return _expect_close("output of the 0.5/0.5 self-merge vs the adapter", _with_adapter(ex, merged),
                         _with_adapter(ex, _copy(ex.adapter)), _dtype(ex.model))


def check_compress_verb(name: str, ex: Example) -> str:
    """The compress verb (int8 quantization) runs, records what it did, and its result validates and applies."""
    out = verb(name, "compress")(_copy(ex.adapter), steps=[{"method": "quantize", "bits": 8}])
    rec = out.manifest.get("compression") or {}
    missing = [k for k in ("steps", "source_tensor_bytes", "tensor_bytes", "module_errors") if k not in rec]
    if missing:
        raise Failed(f"manifest.compression lacks {missing}")
    if set(rec["module_errors"]) != set(ex.adapter.modules):
        raise Failed("manifest.compression.module_errors does not cover every module")
    with tempfile.TemporaryDirectory(prefix="adapterfmt-conformance-") as tmp:
        reloaded = validate(save(out, Path(tmp, "c.safetensors")))
        y = _with_adapter(ex, reloaded)
    if not bool(torch.isfinite(y).all()):
        raise Failed("the compressed adapter gives non-finite outputs")
    err = rec.get("dW_rel_error_max")
    return (f"{rec['source_tensor_bytes']} -> {rec['tensor_bytes']} tensor bytes, "
            f"dW error max {'n/a' if err is None else f'{err:.2g}'}")


def check_port_identity(name: str, ex: Example) -> str:
    """The port verb to the adapter's own base changes no module entry and no tensor."""
    out = verb(name, "port")(_copy(ex.adapter), new_base=copy.deepcopy(ex.model))
    if out.modules != ex.adapter.modules:
        changed = sorted(p for p in set(out.modules) | set(ex.adapter.modules)
                         if out.modules.get(p) != ex.adapter.modules.get(p))
        raise Failed(f"port to the same base changed module entries: {changed}")
    if out.tensor_names() != ex.adapter.tensor_names():
        raise Failed("port to the same base changed the tensor names")
    for n in out.tensor_names():
        if not torch.equal(out.tensor(n), ex.adapter.tensor(n)):
            raise Failed(f"port to the same base changed tensor {n}")
    return f"{len(out.tensor_names())} tensors unchanged"


def _train(name: str, ex: Example) -> tuple[float, float, nn.Module, Any]:
    if not _trainable(name):
        raise Skip(f"method {name!r} has no train verb (its adapters are made by extract or convert)")
    model = copy.deepcopy(ex.model)
    session = verb(name, "train")(model, config=dict(ex.train_config or _default_train_config(get_method(name))))
    target = torch.randn(_output(model, ex.inputs).shape, generator=torch.Generator().manual_seed(4))
    opt = torch.optim.Adam(list(session.parameters()), lr=1e-2)
    losses = []
    for _ in range(TRAIN_STEPS):
        out = model(ex.inputs)
        out = out if isinstance(out, torch.Tensor) else (out.logits if hasattr(out, "logits") else out[0])
        loss = (out.float() - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses[0], losses[-1], model, session


def check_train(name: str, ex: Example) -> str:
    """The train verb injects trainable deltas that lower a loss, and nothing else trains."""
    first, last, model, session = _train(name, ex)
    try:
        trained = {id(p) for p in session.parameters()}
        extra = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in trained]
        if extra:
            raise Failed(f"base parameter {extra[0]} is trainable during the session")
        if not last < first:
            raise Failed(f"{TRAIN_STEPS} Adam steps did not lower the loss ({first:.4g} -> {last:.4g})")
    finally:
        session.remove()
    return f"loss {first:.4g} -> {last:.4g} in {TRAIN_STEPS} steps"


def check_train_extract(name: str, ex: Example) -> str:
    """The trained adapter, extracted, saved and reloaded, attached to a fresh base gives the session's output."""
    _, _, model, session = _train(name, ex)
    try:
        model.eval()
        want = _output(model, ex.inputs)
        adapter = session.extract()
    finally:
        session.remove()
    with tempfile.TemporaryDirectory(prefix="adapterfmt-conformance-") as tmp:
        reloaded = validate(save(adapter, Path(tmp, "trained")))
        return _expect_close("reloaded adapter vs training session output", _with_adapter(ex, reloaded), want,
                             _dtype(ex.model))


CHECKS: dict[str, Callable[[str, Example], str]] = {
    "manifest": check_manifest,
    "roundtrip_folder": check_roundtrip_folder,
    "roundtrip_file": check_roundtrip_file,
    "validate": check_validate,
    "attach": check_attach,
    "merge_equals_unmerged": check_merge_equals_unmerged,
    "unmerge_restores": check_unmerge_restores,
    "detach_restores": check_detach_restores,
    "per_row_ids": check_per_row,
    "merge_verb": check_merge_verb,
    "compress_verb": check_compress_verb,
    "port_identity": check_port_identity,
    "train": check_train,
    "train_extract": check_train_extract,
}
"""Every check, by name, in the order they run. Each takes (method name, example) and returns what it measured."""


# ----- running ------------------------------------------------------------------------------------------
def run_check(check: str, name: str, example: Example | Callable[[], Example]) -> CheckResult:
    """Run one check; any exception other than :class:`Skip` is a failure, reported by its message."""
    fn = CHECKS[check]
    t0 = time.perf_counter()
    try:
        with one_thread():  # tiny models: one thread beats two contended ones by far
            ex = example if isinstance(example, Example) else example()
            status, detail = "pass", fn(name, ex)
    except Skip as e:
        status, detail = "skip", str(e)
    except Exception as e:  # a conformance failure, whatever raised it
        status, detail = "fail", str(e) if isinstance(e, Failed) else f"{type(e).__name__}: {e}"
    return CheckResult(check, status, detail, round(time.perf_counter() - t0, 4))


def check_method(name: str, factory: Factory | None = None, *, checks: Iterator[str] | None = None,
                 train_config: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> Report:
    """Run the conformance checks (all of :data:`CHECKS` by default) on installed method ``name``.

    A failure to build the example (e.g. a kind the kit has no example of, and no factory) fails every check.
    """
    get_method(name)  # an unknown method is an error, not 14 failed checks
    example = _cached_example(name, factory, train_config, dtype)
    return Report(name, [run_check(c, name, example) for c in (checks or CHECKS)])


_EXAMPLES: dict[tuple[Any, ...], Example] = {}


def _cached_example(name: str, factory: Factory | None, train_config: dict[str, Any] | None,
                    dtype: torch.dtype) -> Callable[[], Example]:
    """A callable building the example once per (method, factory, config, dtype) in this process."""
    def get() -> Example:
        key = (get_method(name), factory, json.dumps(train_config, sort_keys=True), dtype)
        if key not in _EXAMPLES:
            _EXAMPLES[key] = build_example(name, factory, train_config=train_config, dtype=dtype)
        return _EXAMPLES[key]

    return get


@dataclass(frozen=True)
class Case:
    """One check of one method, for ``pytest.mark.parametrize`` (its ``str`` is the test id)."""

    method: str
    check: str
    factory: Factory | None = None
    train_config: str = "null"
    dtype: torch.dtype = torch.float32

    def __str__(self) -> str:
        return f"{self.method}-{self.check}"

    def run(self) -> CheckResult:
        return run_check(self.check, self.method,
                         _cached_example(self.method, self.factory, json.loads(self.train_config), self.dtype))

    def __call__(self) -> CheckResult:
        """Run inside a test: fail with the check's detail, or skip the test with its reason."""
        result = self.run()
        if result.status == "skip":
            import pytest

            pytest.skip(f"{self}: {result.detail}")
        assert result.status == "pass", f"{self}: {result.detail}"
        return result


def conformance_cases(name: str, factory: Factory | None = None, *, train_config: dict[str, Any] | None = None,
                      dtype: torch.dtype = torch.float32) -> list[Case]:
    """One :class:`Case` per check for ``pytest.mark.parametrize`` (the example is built on first use)."""
    cfg = json.dumps(train_config, sort_keys=True)
    return [Case(name, c, factory, cfg, dtype) for c in CHECKS]


__all__ = ["CHECKS", "Example", "CheckResult", "Report", "Case", "check_method", "conformance_cases",
           "build_example", "run_check", "TOLERANCE", "RESTORE_ATOL", "TRAIN_CONFIG"]
