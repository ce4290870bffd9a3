"""AdapterHub ``adapters`` 1.x bottleneck adapter folders (``save_adapter``), read and written back.

A folder holds ``adapter_config.json`` (``build_full_config`` in ``adapters/configuration/
model_adapters_config.py``: ``{"config": {...}, "hidden_size", "model_class", "model_name", "model_type",
"name", "version": "adapters.<v>"}``) and ``adapter.safetensors`` (``use_safetensors=True``) or
``pytorch_adapter.bin`` (a pickle, read only with ``allow_pickle``). Weights are named
``<prefix>layers.<N>.<attention|output>_adapters.adapters.<name>.adapter_down.0.<weight|bias>`` and
``....adapter_up.<weight|bias>``. ``detect`` needs the ``config`` object and an ``adapters.`` version, so
PEFT folders (same config file name) are never taken for these.

Where the adapter acts, for Llama (``LlamaDecoderLayerWithAdapters.forward`` in ``adapters/models/llama/
modeling_llama.py`` calls ``attention_adapters(h, residual, None)`` after the attention and
``output_adapters(h, residual, None)`` after the MLP, so ``layer_norm`` is None in ``Adapter.pre_forward`` /
``post_forward`` of ``adapters/methods/modeling.py``): with ``f`` the bottleneck and ``r`` the sub-block's
residual input,

- ``original_ln_before = false`` (Houlsby, ``DoubleSeqBnConfig``): ``h + f(h) + r``, i.e. kind ``bottleneck``
  on the sub-block's output module: ``self_attn.o_proj`` (attention) or ``mlp`` (output);
- ``original_ln_before = true`` (Pfeiffer, ``SeqBnConfig``, output adapter only): ``f(h + r) + h + r``, i.e.
  ``bottleneck`` on the decoder layer ``layers.<N>`` (whose output is ``h + r``).

Refused in one line, naming the field: other model types, other architectures (LoRA, prefix tuning ...),
``is_parallel`` (``f`` reads ``r``, which no module of a pre-norm layer takes as its input),
``original_ln_after = false``, ``residual_before_ln = false`` with ``original_ln_before``, ``ln_before`` /
``ln_after``, ``use_gating``, ``phm_layer``, ``inv_adapter``, ``cross_adapter``, a non-number ``scaling``,
an unknown ``non_linearity``, weights at a location the config turns off (``mh_adapter`` / ``output_adapter``).
``dropout``, ``stochastic_depth``, ``init_weights*`` act only in training; ``reduction_factor``,
``leave_out`` and ``hidden_size`` are what the weights' shapes and names already say (written back from them:
one factor, or a per-layer mapping, from which adapters' ``int(hidden_size // factor)`` gives each rank).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

import adapterfmt as af

CONFIG_FILE = "adapter_config.json"
SAFE_FILE = "adapter.safetensors"
PICKLE_FILE = "pytorch_adapter.bin"
VERSION = "adapters.1.3.0"
MODEL_TYPES = ("llama",)
KEY = re.compile(r"^(?P<layer>(?:.+\.)?layers\.(?P<n>\d+))\.(?P<loc>attention|output)_adapters\.adapters\."
                 r"(?P<name>[^.]+)\.(?P<part>adapter_down\.0|adapter_up)\.(?P<what>weight|bias)$")
ACTIVATIONS = {"relu": "relu", "swish": "silu", "silu": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "tanh": "tanh", "leakyrelu": "leaky_relu"}
"""``non_linearity`` (lower-cased, as ``Activation_Function_Class`` does) -> the ``bottleneck`` activation
(transformers' ``ACT2FN``: ``swish`` is SiLU, ``gelu`` the erf form, ``gelu_new`` the tanh form)."""
MUST = {"is_parallel": False, "original_ln_after": True, "ln_before": False, "ln_after": False,
        "use_gating": False, "phm_layer": False, "inv_adapter": None, "cross_adapter": False}
"""Config fields whose other values change the function in ways kind ``bottleneck`` does not hold."""
ROLE = {("adapter_down.0", "weight"): "down", ("adapter_down.0", "bias"): "down_bias",
        ("adapter_up", "weight"): "up", ("adapter_up", "bias"): "up_bias"}


def _module(layer: str, loc: str, ln_before: bool) -> str:
    if ln_before:
        return layer
    return f"{layer}.self_attn.o_proj" if loc == "attention" else f"{layer}.mlp"


def read_adapterhub(path: str | Path, *, allow_pickle: bool = False) -> af.Adapter:
    """Read an ``adapters`` bottleneck folder (module docstring)."""
    path = Path(path)
    meta = af.read_json_object(path / CONFIG_FILE)
    cfg, where = meta.get("config"), path / CONFIG_FILE
    if meta.get("model_type") not in MODEL_TYPES:
        raise af.UnsupportedError(f"model_type {meta.get('model_type')!r} is not supported (supported: "
                                  f"{', '.join(MODEL_TYPES)}): where its adapters act is model-specific", path=where)
    if not isinstance(cfg, dict) or cfg.get("architecture") is not None:
        arch = cfg.get("architecture") if isinstance(cfg, dict) else cfg
        raise af.UnsupportedError(f"config.architecture {arch!r} is not supported (only bottleneck adapters)", path=where)
    for key, want in MUST.items():
        if cfg.get(key, want) != want:
            raise af.UnsupportedError(f"config.{key}={cfg[key]!r} cannot be represented (kind bottleneck needs "
                                      f"{want!r})", path=where)
    ln_before = bool(cfg.get("original_ln_before", False))
    if ln_before and cfg.get("residual_before_ln", True) is False:
        raise af.UnsupportedError("config.residual_before_ln=false with original_ln_before=true cannot be "
                                  "represented", path=where)
    scale, act = cfg.get("scaling", 1.0), str(cfg.get("non_linearity")).lower()
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise af.UnsupportedError(f"config.scaling={scale!r} cannot be represented (a number is)", path=where)
    if act not in ACTIVATIONS:
        raise af.UnsupportedError(f"config.non_linearity={cfg.get('non_linearity')!r} is not supported "
                                  f"(supported: {', '.join(ACTIVATIONS)})", path=where)
    if (path / SAFE_FILE).is_file():
        raw = af.read_tensor_file(path / SAFE_FILE)[0]
    elif (path / PICKLE_FILE).is_file():
        raw = af.read_pickle_tensors(path / PICKLE_FILE, allow_pickle=allow_pickle)
    else:
        raise af.MissingFileError(f"adapters folder has neither {SAFE_FILE} nor {PICKLE_FILE}", path=path)
    modules: dict[str, dict[str, Any]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, t in sorted(raw.items()):
        m = KEY.match(key)
        if m is None or m["name"] != meta.get("name"):
            raise af.UnsupportedError(f"tensor {key!r} is not a weight of bottleneck adapter "
                                      f"{meta.get('name')!r}", path=path)
        flag = "mh_adapter" if m["loc"] == "attention" else "output_adapter"
        if cfg.get(flag) is False:
            raise af.UnsupportedError(f"tensor {key!r} is at a location the config turns off ({flag}=false): "
                                      "adapters would not load it", path=path)
        if ln_before and m["loc"] == "attention":
            raise af.UnsupportedError("an attention adapter with config.original_ln_before=true (f(h + r) in "
                                      "mid-layer) cannot be represented", path=where)
        module = _module(m["layer"], m["loc"], ln_before)
        modules[module] = {"kind": "bottleneck", "shape": [0],
                           "params": {"activation": ACTIVATIONS[act], "scale": float(scale)}}
        tensors[f"{module}.{ROLE[m['part'], m['what']]}"] = t
    if not modules:
        raise af.FormatError("the adapters folder holds no bottleneck weights", path=path)
    for module, entry in modules.items():  # the width is the up projection's (hidden_size may be absent)
        up_bias = tensors.get(f"{module}.up_bias")
        entry["shape"] = [up_bias.shape[0] if up_bias is not None and up_bias.dim() == 1 else 0]
    prov = {"tool": "adapters", "format": "adapterhub", "source": str(path), "config": meta}
    manifest = af.new_manifest("bottleneck", modules, config={}, provenance=[prov],
                               base={"name": meta.get("model_name"), "revision": None, "fingerprint": None})
    return af.Adapter(manifest, tensors)


def write_adapterhub(adapter: af.Adapter, path: str | Path, *, base: Any = None) -> Path:
    """Write a ``bottleneck`` adapter as an ``adapters`` folder (``adapter.safetensors``), the inverse of
    :func:`read_adapterhub`; the layout must be one the reader maps (module docstring)."""
    kinds = {e["kind"] for e in adapter.modules.values()}
    if kinds != {"bottleneck"}:
        raise af.UnsupportedError(f"an adapters bottleneck folder holds only kind bottleneck, not {sorted(kinds)}")
    params = {(e["params"]["activation"], float(e["params"].get("scale", 1.0))) for e in adapter.modules.values()}
    if len(params) != 1:
        raise af.UnsupportedError(f"adapters' config has one non_linearity and one scaling for all modules: "
                                  f"the adapter has {sorted(params)}")
    ((act, scale),) = params
    name = next((p["config"].get("name") for p in adapter.manifest.get("provenance", [])
                 if p.get("format") == "adapterhub"), None) or adapter.method
    forms = {}
    for module in adapter.modules:
        m = re.fullmatch(r"(?P<layer>(?:.+\.)?layers\.\d+)(?P<rest>\.self_attn\.o_proj|\.mlp|)", module)
        if m is None:
            raise af.UnsupportedError(f"module {module!r} is not a place adapters puts a bottleneck (layers.N, "
                                      "layers.N.self_attn.o_proj, layers.N.mlp)")
        forms[module] = (m["layer"], "attention" if m["rest"] == ".self_attn.o_proj" else "output", m["rest"] == "")
    if len({f[2] for f in forms.values()}) != 1:
        raise af.UnsupportedError("adapters' config has one original_ln_before: the adapter mixes decoder-layer "
                                  "and sub-block bottlenecks")
    ln_before = next(iter(forms.values()))[2]
    tensors: dict[str, torch.Tensor] = {}
    for module, (layer, loc, _) in forms.items():
        t = adapter.module_tensors(module)
        for (part, what), role in ROLE.items():
            tensors[f"{layer}.{loc}_adapters.adapters.{name}.{part}.{what}"] = t[role].contiguous()
    d = next(iter(adapter.modules.values()))["shape"][0]
    ranks: dict[str, set[int]] = {}
    for key, t in tensors.items():
        if key.endswith("adapter_down.0.weight"):
            ranks.setdefault(re.search(r"layers\.(\d+)\.", key).group(1), set()).add(t.shape[0])
    factors = {n: _reduction_factor(d, rs, n) for n, rs in sorted(ranks.items(), key=lambda kv: int(kv[0]))}
    first = next(iter(factors.values()))
    reduction = first if len(set(factors.values())) == 1 else {**factors, "default": first}
    n_layers = getattr(getattr(base, "config", None), "num_hidden_layers", None) if isinstance(base, nn.Module) else None
    present = {int(re.search(r"layers\.(\d+)$", f[0]).group(1)) for f in forms.values()}
    leave_out = sorted(set(range(n_layers if n_layers else max(present) + 1)) - present)
    activation = {v: k for k, v in reversed(ACTIVATIONS.items())}[act]
    cfg = {"architecture": None, "mh_adapter": any(f[1] == "attention" for f in forms.values()),
           "output_adapter": any(f[1] == "output" for f in forms.values()), "original_ln_before": ln_before,
           "original_ln_after": True, "residual_before_ln": True, "adapter_residual_before_ln": False,
           "ln_before": False, "ln_after": False, "non_linearity": activation, "reduction_factor": reduction,
           "scaling": scale, "is_parallel": False, "use_gating": False, "phm_layer": False, "inv_adapter": None,
           "cross_adapter": False, "leave_out": leave_out, "dropout": 0.0, "init_weights": "bert"}
    meta = {"config": cfg, "hidden_size": d, "model_class": type(base).__name__ if isinstance(base, nn.Module)
            else None, "model_name": (adapter.base or {}).get("name"), "model_type": "llama", "name": name,
            "version": VERSION}
    return af.write_folder(path, SAFE_FILE, tensors, CONFIG_FILE, meta)


def _reduction_factor(d: int, ranks: set[int], layer: str) -> float:
    """The ``reduction_factor`` from which adapters rebuilds rank ``r`` (``int(hidden_size // factor)``)."""
    if len(ranks) != 1:
        raise af.UnsupportedError(f"layer {layer}: adapters' config gives one rank per layer, the adapter has "
                                  f"{sorted(ranks)}")
    (r,) = ranks
    if int(d // (d / r)) != r:
        raise af.UnsupportedError(f"layer {layer}: rank {r} of width {d} is not int({d} // reduction_factor) "
                                  "for any factor adapters can store")
    return d / r


class AdapterHubFormat:
    """The ``adapterhub`` codec (:class:`adapterfmt.ForeignFormat`)."""

    name = "adapterhub"
    summary = "AdapterHub adapters folder: adapter_config.json ({config, version: adapters.*}) + adapter weights"
    detect_priority = 1  # narrower than PEFT's detect (the same config file name)

    def detect(self, path: Path) -> bool:
        if not (path.is_dir() and (path / CONFIG_FILE).is_file()):
            return False
        try:
            meta = af.read_json_object(path / CONFIG_FILE)
        except af.AdapterError:
            return False
        return isinstance(meta.get("config"), dict) and str(meta.get("version", "")).startswith("adapters.")

    def read(self, path: Path, **options: Any) -> af.Adapter:
        return read_adapterhub(path, allow_pickle=options.get("allow_pickle", False))

    def write(self, adapter: af.Adapter, path: Path, **options: Any) -> None:
        write_adapterhub(adapter, path, base=options.get("base"))


@af.hookimpl
def adapterfmt_formats() -> list[Any]:
    return [AdapterHubFormat()]
