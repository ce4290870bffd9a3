"""Quantisation-aware adapters: kind ``qscale`` and methods ``peqa`` and ``l4q`` (spec 6.12).

PEQA (Kim et al., "Memory-Efficient Fine-Tuning of Compressed Large Language Models via sub-4-bit Integer
Quantization", NeurIPS 2023) quantises the base, ``W = s (W_int - z)``, freezes ``W_int`` and ``z`` and
trains only the scales ``s``. Here the base is quantised by the reference RTN quantiser
(:mod:`adapterfmt.format.quant`) with the record ``params.quant``, and the adapter stores ``ratio = s' / s``
per ``[out, group]``: on a dequantised base (one on the grid) the new weight is ``ratio * W`` per group; on
a module held as codes and scales (:class:`QuantizedLinear`, see :func:`quantize_model`) merging swaps its
scales, ``s <- ratio * s``. The kind re-quantises a float module's current weight, so an unquantised base
gets PEQA's own RTN first, as in the paper.

``train`` injects ``ratio`` (ones) on the targeted modules; the scales are the only trainable tensors. When
the base already lies on the grid (a dequantised or packed base), the adapter records it in
``base.quantization``. Adapters are not combined in delta space (not additive); merging into weights writes
the new weights; ``port`` goes only onto the recorded base or one whose targeted weights lie on the grid.

L4Q (Jeon et al., "L4Q: Parameter Efficient Quantization-Aware Fine-Tuning on Large Language Models", 2024)
trains a LoRA together with the quantisation step sizes, so that the merged weight lands on the grid:
``W' = s' clamp(round((W + dW) / s'))`` (asymmetric: ``+ m'`` inside and out), rounding straight-through in
training (:func:`adapterfmt.requantize`). Stored as ``qscale`` with ``lora_A`` / ``lora_B`` beside ``ratio``;
merging writes the quantised weights (new codes and scales on a :class:`QuantizedLinear`). Deviations from
the paper: the steps start at the RTN's (ratio 1) rather than LSQ's initialisation, and the zero point stays
the RTN's (``m' = ratio * m``) rather than being learned.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import adapterfmt as af

QUANT_SCHEMA: dict[str, Any] = {
    "bits": {"type": "integer", "minimum": 2, "maximum": 8},
    "group_size": {"type": ["integer", "null"], "minimum": 1},
    "zero_point": {"enum": list(af.QuantSpec.ZERO_POINTS)},
}
DEFAULT_QUANT = {"bits": 4, "group_size": None, "zero_point": "asymmetric"}
"""PEQA's setting: 4 bits, one scale per output channel, a zero point."""


def quant_spec(module: str, entry: Mapping[str, Any]) -> af.QuantSpec:
    """The entry's ``params.quant``, refused naming the module."""
    return af.QuantSpec.from_json(entry.get("params", {}).get("quant"), what=f"module {module!r}: params.quant")


class QScale(af.DeltaKind):
    """New quantisation scales relative to the base's (spec 6.12)."""

    name = "qscale"
    required_roles = ("ratio",)
    optional_roles = ("lora_A", "lora_B")
    additive = False
    layout_sensitive = True

    def is_additive(self, entry: Mapping[str, Any], roles: Collection[str]) -> bool:
        return False

    def check(self, module: str, entry: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> None:
        spec = quant_spec(module, entry)
        try:
            out, groups, _ = spec.groups(af.function_shape(entry))
        except af.FormatError as e:
            raise af.FormatError(f"module {module!r}: {e.message}") from None
        if tuple(shapes["ratio"]) != (out, groups):
            raise af.FormatError(f"module {module!r}: qscale ratio must be [{out}, {groups}], "
                                 f"got {list(shapes['ratio'])}")
        if ("lora_A" in shapes) != ("lora_B" in shapes):
            raise af.FormatError(f"module {module!r}: qscale has lora_A and lora_B together or neither")
        if "lora_A" in shapes:
            a, b, n = shapes["lora_A"], shapes["lora_B"], math.prod(af.function_shape(entry)[1:])
            if len(a) != 2 or len(b) != 2 or a[1] != n or b[0] != out or b[1] != a[0]:
                raise af.FormatError(f"module {module!r}: qscale lora_A must be [r, {n}] and lora_B [{out}, r], "
                                     f"got {list(a)}, {list(b)}")

    def check_data(self, module: str, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor]) -> None:
        if not t["ratio"].is_floating_point() or not bool(torch.isfinite(t["ratio"]).all()):
            raise af.FormatError(f"module {module!r}: qscale ratio must be finite floats")

    def check_module(self, path: str, entry: Mapping[str, Any], module: nn.Module) -> None:
        if not isinstance(module, QuantizedLinear):
            super().check_module(path, entry, module)
            return
        if list(module.shape) != list(entry["shape"]) or entry.get("parameter", "weight") != "weight":
            raise af.FormatError(f"module {path!r}: adapter expects weight of shape {list(entry['shape'])}, the "
                                 f"model has {list(module.shape)}")
        if module.spec != quant_spec(path, entry):
            raise af.FormatError(f"module {path!r} is held quantised as {module.spec.to_json()}, the entry's "
                                 f"params.quant is {entry['params']['quant']}: not the same grid")

    def new_grid(self, module: nn.Module, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor]
                 ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(codes, W', s', m')``: the new weight in function layout (float32, differentiable in the roles;
        straight-through rounding) on the grid of the new scales ``s'`` and offsets ``m'``; ``codes`` (float)
        when they were recomputed (L4Q), else None (PEQA keeps the base's)."""
        w = af.function_weight(module).detach().float()
        q = module.quantized() if isinstance(module, QuantizedLinear) else af.quantize(w, quant_spec("?", entry))
        ratio = t["ratio"].float()
        scale = ratio * q.scale
        offset = q.offset if q.offset is None or q.spec.integer_zero else ratio * q.offset  # an integer z stays
        if "lora_A" not in t:
            return None, af.dequantize(q, scale=scale), scale, offset
        dw = entry.get("params", {}).get("scale", 1) * (t["lora_B"].float() @ t["lora_A"].float())
        codes, new = af.requantize(w + dw.reshape(w.shape), q.spec, scale, offset)
        return codes, new, scale, offset

    def new_weight(self, module: nn.Module, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``W'`` in function layout and the module's dtype."""
        dtype = module.dtype if isinstance(module, QuantizedLinear) else module.weight.dtype
        return self.new_grid(module, entry, t)[1].to(dtype)

    def forward(self, module: nn.Module, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor], x: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
        w, bias = self.new_weight(module, entry, t), getattr(module, "bias", None)
        out = F.linear(x, w.to(x.dtype)) if isinstance(module, QuantizedLinear) else af.weight_function(module, x, w)
        return out + (0 if bias is None else bias)

    def merge(self, module: nn.Module, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor]) -> Any:
        """Write ``W'``; on a :class:`QuantizedLinear`, its new scales and offsets (and L4Q's new codes)."""
        if isinstance(module, QuantizedLinear):
            saved = (module.codes.clone(), module.scale.clone(), None if module.offset is None else module.offset.clone())
            with torch.no_grad():
                codes, _, scale, offset = self.new_grid(module, entry, t)
                if codes is not None:
                    module.codes.copy_(codes.to(module.codes.dtype))
                module.scale.copy_(scale)
                if offset is not None:
                    module.offset.copy_(offset)
            return saved
        param = getattr(module, entry.get("parameter", "weight"))
        saved = param.detach().clone()
        new = self.new_weight(module, entry, t)
        with torch.no_grad():
            param.copy_(new.t() if af.is_transposed(module) else new)
        return saved

    def unmerge(self, module: nn.Module, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor], state: Any) -> None:
        if isinstance(module, QuantizedLinear):
            module.codes.copy_(state[0])
            module.scale.copy_(state[1])
            if module.offset is not None:
                module.offset.copy_(state[2])
            return
        with torch.no_grad():
            getattr(module, entry.get("parameter", "weight")).copy_(state)


class QuantizedLinear(nn.Module):
    """A linear layer held as RTN codes, scales and offsets (:func:`adapterfmt.quantize`), dequantised in each
    forward: a quantised base that runs anywhere torch does. It has no ``weight`` parameter: ``lowrank`` attaches
    to it unmerged (on :meth:`dequantized`) and refuses to merge, ``qscale`` changes its scales, other kinds refuse
    it (one error at attach) instead of changing a dequantised copy."""

    def __init__(self, linear: nn.Linear, spec: af.QuantSpec) -> None:
        super().__init__()
        q = af.quantize(linear.weight, spec)
        self.spec, self.shape, self.dtype = spec, q.shape, linear.weight.dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("codes", q.codes)
        self.register_buffer("scale", q.scale)
        self.register_buffer("offset", q.offset)
        self.bias = linear.bias

    def quantized(self) -> af.Quantized:
        return af.Quantized(self.spec, self.codes, self.scale, self.offset, self.shape)

    def dequantized(self) -> torch.Tensor:
        """The weight ``[out, in]`` in the layer's dtype (a new tensor: writing to it changes nothing)."""
        return af.dequantize(self.quantized()).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype), self.bias)


def quantize_model(model: nn.Module, spec: af.QuantSpec, config: Mapping[str, Any], *, pack: bool = False
                   ) -> list[str]:
    """RTN-quantise the modules ``config`` targets: their weights replaced by the dequantisation (a dequantised
    base), or with ``pack`` the ``nn.Linear`` s replaced by :class:`QuantizedLinear`; returns the paths."""
    chosen = af.select_targets(model, dict(config), supported=(nn.Linear,) if pack else (nn.Linear, "Conv1D"))
    with torch.no_grad():
        for path, module in chosen.items():
            if pack:
                parent, _, name = path.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, name, QuantizedLinear(module, spec))
                continue
            w = module.weight
            f = w.t() if af.is_transposed(module) else w
            new = af.fake_quantize(f, spec)
            w.copy_(new.t() if af.is_transposed(module) else new)
    return sorted(chosen)


class PEQA(af.Method):
    name = "peqa"
    summary = "PEQA: train only the quantisation scales of an RTN-quantised base (kind qscale)"
    kinds = ("qscale",)
    config_schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": {**QUANT_SCHEMA, **af.TARGETS_SCHEMA}}
    defaults: ClassVar[dict[str, Any]] = DEFAULT_QUANT

    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> af.TrainSession:
        """Inject trainable scale ratios (ones) on the targeted modules; nothing else is trainable."""
        self.check_config(config)
        if options:
            raise af.FormatError(f"{self.name} train takes no option(s) {', '.join(sorted(options))}")
        cfg = {**self.defaults, **config}
        spec = af.QuantSpec(cfg["bits"], cfg["group_size"], cfg["zero_point"])

        def build(path: str, module: nn.Module) -> af.TrainableDelta:
            if isinstance(module, QuantizedLinear) and module.spec != spec:
                raise af.FormatError(f"module {path!r} is held quantised as {module.spec.to_json()}; train {self.name} "
                                     f"with that grid (config bits, group_size, zero_point)")
            params = {"quant": spec.to_json()}
            entry = {"kind": "qscale", "shape": list(module.shape), "params": params} \
                if isinstance(module, QuantizedLinear) else af.module_entry("qscale", module, params)
            out, groups, _ = spec.groups(af.function_shape(entry))
            return af.TrainableDelta(entry, self.roles(module, entry, out, groups, cfg))

        session = af.inject(model, method=self.name, config=cfg, build=build,
                            supported=(nn.Linear, "Conv1D", QuantizedLinear))
        on_grid = all(af.fits_grid(af.function_weight(model.get_submodule(p)), spec) for p in session.layers)
        session.base_quantization = spec.to_json() if on_grid else None
        return session

    def roles(self, module: nn.Module, entry: dict[str, Any], out: int, groups: int,
              cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The trainable roles of one module: the scale ratios, ones (the base's scales)."""
        return {"ratio": torch.ones(out, groups, dtype=af.adapter_dtype(module))}

    def port(self, adapter: af.Adapter, *, new_base: Any, **options: Any) -> af.Adapter:
        """Port onto the recorded base, or onto one whose targeted weights lie on the adapter's grid."""
        if isinstance(new_base, nn.Module):
            recorded, actual = adapter.base.get("fingerprint") or {}, af.fingerprint_module(new_base)
            if any(recorded.get(k) != actual[k] for k in ("algorithm", "structure", "values")):
                for path, entry in sorted(adapter.modules.items()):
                    module = new_base.get_submodule(path)
                    if not af.fits_grid(af.function_weight(module).detach(), quant_spec(path, entry)):
                        raise af.BaseMismatchError(f"module {path!r}: qscale adapters port only onto a base on "
                                                   f"the same quantisation grid, and this weight is not on it",
                                                   path=adapter.source)
        else:
            raise af.UnsupportedError("peqa port takes the new base as a live model", path=adapter.source)
        return super().port(adapter, new_base=new_base, **options)


class L4Q(PEQA):
    name = "l4q"
    summary = "L4Q: LoRA and learned step sizes, the merged weight rounded onto the grid (kind qscale)"
    config_schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": {
        "r": {"type": "integer", "minimum": 1}, "alpha": {"type": "number"}, **QUANT_SCHEMA, **af.TARGETS_SCHEMA}}
    defaults: ClassVar[dict[str, Any]] = {**DEFAULT_QUANT, "r": 8, "alpha": 8}

    def roles(self, module: nn.Module, entry: dict[str, Any], out: int, groups: int,
              cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Step sizes at the RTN's (ratio 1), A Kaiming-uniform and B zero: training starts at the RTN base."""
        entry["params"]["scale"] = cfg["alpha"] / cfg["r"]
        dtype = af.adapter_dtype(module)
        a = torch.empty(cfg["r"], math.prod(af.function_shape(entry)[1:]), dtype=dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        return {**super().roles(module, entry, out, groups, cfg), "lora_A": a,
                "lora_B": torch.zeros(out, cfg["r"], dtype=dtype)}


@af.hookimpl
def adapterfmt_delta_kinds() -> list[af.DeltaKind]:
    return [QScale()]


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [PEQA(), L4Q()]
