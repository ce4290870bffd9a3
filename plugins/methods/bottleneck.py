"""Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2021), as AdapterHub's ``adapters`` stores them.

Kind ``bottleneck`` (spec 6.10.15) on a module whose output ``y [..., d]`` stays in the residual stream:
``y' = y + s * (up @ act(down @ y + down_bias) + up_bias)`` with roles ``down [r, d]``, ``down_bias [r]``,
``up [d, r]``, ``up_bias [d]``, ``params.activation`` (one of :data:`ACTIVATIONS`) and ``params.scale`` ``s``
(default 1). A tuple output (attention, decoder layers) is changed in its first element. Where the
adapter sits is the module chosen: the ``adapterhub`` format maps ``adapters``' locations onto them. Not
additive: no ``dW``, attach unmerged. The method has no train verb (its adapters come from ``adapter convert``).
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
                                 f"shape {list(entry['shape'])} = [d] (down [r, d], down_bias [r], up [d, r], up_bias [d])")

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
        params = entry.get("params", {})
        h = ACTIVATIONS[params["activation"]](F.linear(y, t["down"], t["down_bias"]))
        return y + float(params.get("scale", 1.0)) * F.linear(h, t["up"], t["up_bias"])

    def merge(self, module: nn.Module, entry: dict[str, Any], t: dict[str, torch.Tensor]) -> Any:
        raise af.UnsupportedError("a bottleneck adapter cannot be merged into weights; attach it unmerged")


def bottleneck_entry(d: int, activation: str, scale: float = 1.0) -> dict[str, Any]:
    """A ``bottleneck`` module entry on outputs of width ``d``."""
    return {"kind": "bottleneck", "shape": [d], "params": {"activation": activation, "scale": float(scale)}}


class Bottleneck(af.Method):
    name = "bottleneck"
    summary = "Bottleneck adapters (Houlsby, Pfeiffer): a residual down/up projection on a sub-block's output"
    kinds = ("bottleneck",)
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
    return [BottleneckKind()]


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [Bottleneck()]
