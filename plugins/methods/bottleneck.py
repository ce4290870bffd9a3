"""Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2021, He et al. 2022's parallel form), as
AdapterHub's ``adapters`` stores them.

With roles ``down [r, d]``, ``down_bias [r]``, ``up [d, r]``, ``up_bias [d]``, ``params.activation`` (one of
:data:`ACTIVATIONS`) and ``params.scale`` ``s`` (default 1), the bottleneck is
``f(x) = s * (up @ act(down @ x + down_bias) + up_bias)`` (spec 6.10.15):

- kind ``bottleneck`` on a module whose output ``y [..., d]`` stays in the residual stream: ``y' = y + f(y)``;
- kind ``parallel_bottleneck`` on a block with submodules ``params.reads`` and ``params.adds``: during the
  block's forward, ``f`` reads the input of ``reads`` (the sub-block's residual input) and is added to the output
  of ``adds``. With lists of as many ``reads`` and ``adds``, the entry holds one bottleneck per pair, its roles
  stacked on a leading dimension (AdapterHub's parallel adapters at both sub-blocks of a layer).

A tuple output (attention, decoder layers) is changed in its first element. Where the adapter sits is the
module chosen: the ``adapterhub`` format maps ``adapters``' locations onto them. Not additive: no ``dW``, attach
unmerged. The method has no train verb (its adapters come from ``adapter convert``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import adapterfmt as af

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "tanh": torch.tanh, "leaky_relu": F.leaky_relu, "identity": lambda x: x}
"""The non-linearities (``leaky_relu``: slope 0.01; ``gelu``: the exact erf form; ``gelu_tanh``: the tanh form)."""
ROLES = ("down", "down_bias", "up", "up_bias")


class BottleneckKind(af.DeltaKind):
    """Kind ``bottleneck``: a residual down-projection / non-linearity / up-projection on a module's output."""

    name = "bottleneck"
    required_roles = ROLES

    def is_additive(self, entry: dict[str, Any], roles: Collection[str]) -> bool:
        return False

    def check(self, module: str, entry: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
        params = entry.get("params", {})
        if params.get("activation") not in ACTIVATIONS:
            raise af.FormatError(f"module {module!r}: bottleneck params.activation must be one of "
                                 f"{sorted(ACTIVATIONS)}, got {params.get('activation')!r}")
        d = entry["shape"][0] if len(entry["shape"]) == 1 else -1
        down = shapes["down"]
        r = down[0] if len(down) == 2 else -1
        want = {"down": (r, d), "down_bias": (r,), "up": (d, r), "up_bias": (d,)}
        bad = [k for k, s in want.items() if tuple(shapes[k]) != s or min(s) < 1]
        if bad:
            raise af.FormatError(f"module {module!r}: bottleneck {bad[0]} {list(shapes[bad[0]])} does not fit "
                                 f"shape {list(entry['shape'])} = [d] (down [r, d], down_bias [r], up [d, r], "
                                 "up_bias [d])")

    def bind(self, module: nn.Module, entry: dict[str, Any], t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """On the device and dtype of the module's first parameter, its submodules' included (a decoder layer
        holds none of its own)."""
        ref = next(module.parameters(), None)
        return t if ref is None else {r: v.to(device=ref.device, dtype=ref.dtype) for r, v in t.items()}

    def check_module(self, path: str, entry: dict[str, Any], module: nn.Module) -> None:
        out = getattr(module, "out_features", None)
        if out is not None and out != entry["shape"][0]:
            raise af.FormatError(f"module {path!r}: the bottleneck reads outputs of width {entry['shape'][0]}, "
                                 f"the module gives {out}")

    def forward(self, module: nn.Module, entry: dict[str, Any], t: dict[str, torch.Tensor], x: torch.Tensor,
                y: Any) -> Any:
        if isinstance(y, tuple):
            return (self.forward(module, entry, t, x, y[0]), *y[1:])
        if y.shape[-1] != t["up_bias"].shape[0]:
            raise af.FormatError(f"the bottleneck reads outputs of width {t['up_bias'].shape[0]}, the module "
                                 f"gives {y.shape[-1]}")
        return y + bottleneck(entry.get("params", {}), t, y)

    def merge(self, module: nn.Module, entry: dict[str, Any], t: dict[str, torch.Tensor]) -> Any:
        raise af.UnsupportedError("a bottleneck adapter cannot be merged into weights; attach it unmerged")


def bottleneck(params: dict[str, Any], t: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``f(x) = s * (up @ act(down @ x + down_bias) + up_bias)``."""
    h = ACTIVATIONS[params["activation"]](F.linear(x, t["down"], t["down_bias"]))
    return float(params.get("scale", 1.0)) * F.linear(h, t["up"], t["up_bias"])


HOOKS_ATTR = "_adapterfmt_parallel_bottleneck_hooks"


def sites(params: dict[str, Any]) -> list[tuple[str, str]]:
    """The ``(reads, adds)`` pairs of a ``parallel_bottleneck`` entry (one, or one per list item)."""
    reads, adds = params.get("reads"), params.get("adds")
    return list(zip(reads, adds)) if isinstance(reads, list) and isinstance(adds, list) else [(reads, adds)]


class ParallelBottleneckKind(BottleneckKind):
    """Kind ``parallel_bottleneck``: ``f`` of submodule ``params.reads``' input, added to submodule
    ``params.adds``' output, on the targeted block; with lists, one bottleneck per pair, the roles' leading
    dimension indexing them (module docstring)."""

    name = "parallel_bottleneck"

    def check(self, module: str, entry: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
        params = entry.get("params", {})
        reads, adds = params.get("reads"), params.get("adds")
        stacked = isinstance(reads, list)
        pairs = sites(params)
        if (stacked != isinstance(adds, list) or (stacked and (len(reads) != len(adds) or not reads))
                or not all(isinstance(n, str) and n for pair in pairs for n in pair)):
            raise af.FormatError(f"module {module!r}: parallel_bottleneck params.reads {reads!r} and params.adds "
                                 f"{adds!r} must both name a submodule, or be lists of as many")
        if stacked:
            bad = [r for r, s in shapes.items() if not s or s[0] != len(pairs)]
            if bad:
                raise af.FormatError(f"module {module!r}: parallel_bottleneck {bad[0]} {list(shapes[bad[0]])} must "
                                     f"lead with {len(pairs)}, one per params.reads / params.adds pair")
            shapes = {r: tuple(s[1:]) for r, s in shapes.items()}
        super().check(module, entry, shapes)

    def check_module(self, path: str, entry: dict[str, Any], module: nn.Module) -> None:
        for pair in sites(entry["params"]):
            for key, name in zip(("reads", "adds"), pair):
                try:
                    module.get_submodule(name)
                except AttributeError:
                    raise af.FormatError(f"module {path!r} has no submodule {name!r} (params.{key})") from None
            super().check_module(path, entry, module.get_submodule(pair[1]))

    def pre_forward(self, module: nn.Module, entry: dict[str, Any], t: dict[str, torch.Tensor],
                    args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Hooks for this call of the block: each ``reads``' input goes through its ``f``, the result onto its
        ``adds``' output, once; :meth:`forward` (the block's output) removes any left."""
        params, pairs = entry["params"], sites(entry["params"])
        self._unhook(module)
        handles: list[Any] = []
        module.__dict__[HOOKS_ATTR] = handles
        for i, (reads, adds) in enumerate(pairs):
            ti = {r: v[i] for r, v in t.items()} if isinstance(params["reads"], list) else t
            read, add = self._site_hooks(params, ti, (reads, adds), handles)
            handles.extend([module.get_submodule(reads).register_forward_pre_hook(read, with_kwargs=True),
                            module.get_submodule(adds).register_forward_hook(add)])
        return args, kwargs

    def forward(self, module: nn.Module, entry: dict[str, Any], t: dict[str, torch.Tensor], x: torch.Tensor,
                y: Any) -> Any:
        self._unhook(module)
        return y

    @staticmethod
    def _site_hooks(params: dict[str, Any], t: dict[str, torch.Tensor], names: tuple[str, str],
                    handles: list[Any]) -> tuple[Callable[..., None], Callable[..., Any]]:
        """The pre-hook on ``reads`` and the hook on ``adds`` of one site; the latter removes both (the last two
        of ``handles`` once registered)."""
        held: list[torch.Tensor] = []
        mine = len(handles)

        def read(_: nn.Module, a: tuple[Any, ...], kw: dict[str, Any]) -> None:
            held.append(bottleneck(params, t, a[0] if a else kw["hidden_states"]))

        def add(_: nn.Module, a: tuple[Any, ...], y: Any) -> Any:
            if not held:
                raise af.UnsupportedError(f"submodule {names[1]!r} ran before {names[0]!r}: the parallel "
                                          "bottleneck has no input to read")
            out = held.pop()
            for handle in handles[mine:mine + 2]:
                handle.remove()
            return (y[0] + out, *y[1:]) if isinstance(y, tuple) else y + out

        return read, add

    @staticmethod
    def _unhook(module: nn.Module) -> None:
        for handle in module.__dict__.pop(HOOKS_ATTR, ()):
            handle.remove()


def bottleneck_entry(d: int, activation: str, scale: float = 1.0, *, reads: str | None = None,
                     adds: str | None = None) -> dict[str, Any]:
    """A ``bottleneck`` module entry on outputs of width ``d``; with ``reads`` and ``adds``, a
    ``parallel_bottleneck`` one."""
    params: dict[str, Any] = {"activation": activation, "scale": float(scale)}
    if reads is None and adds is None:
        return {"kind": "bottleneck", "shape": [d], "params": params}
    return {"kind": "parallel_bottleneck", "shape": [d], "params": {**params, "reads": reads, "adds": adds}}


class Bottleneck(af.Method):
    name = "bottleneck"
    summary = "Bottleneck adapters (Houlsby, Pfeiffer, parallel): a down/up projection beside a sub-block"
    kinds = ("bottleneck", "parallel_bottleneck")
    config_schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": {}}  # no options

    def port(self, adapter: af.Adapter, *, new_base: Any, **options: Any) -> af.Adapter:
        """A bottleneck fits a module of the same output width (:func:`adapterfmt.port_live`)."""
        return af.port_live(adapter, new_base=new_base, **options)

    def conformance_example(self) -> Any:
        """Random rank-4 bottlenecks after the tiny model's attention output and MLP (Houlsby's places)."""
        from adapterfmt.authoring.conformance import Example
        from adapterfmt.tiny import TinyConfig, build_tiny

        model = build_tiny(0, TinyConfig(vocab_size=32, hidden=16, layers=1, heads=2, intermediate=32))
        gen = torch.Generator().manual_seed(3)
        modules, tensors = {}, {}
        for path in ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp"):
            modules[path] = bottleneck_entry(16, "silu", 0.5)
            for role, shape in zip(ROLES, ((4, 16), (4,), (16, 4), (16,))):
                tensors[f"{path}.{role}"] = 0.3 * torch.randn(*shape, generator=gen)
        inputs = torch.randint(0, 32, (3, 5), generator=torch.Generator().manual_seed(1))
        return Example(model, af.Adapter(af.new_manifest("bottleneck", modules), tensors), inputs)


@af.hookimpl
def adapterfmt_delta_kinds() -> list[af.DeltaKind]:
    return [BottleneckKind(), ParallelBottleneckKind()]


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [Bottleneck()]
