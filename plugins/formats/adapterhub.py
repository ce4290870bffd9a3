"""AdapterHub ``adapters`` 1.x folders (``save_adapter``) of bottleneck adapters, prefix tuning and unions of one
of each (``ConfigUnion``, e.g. ``MAMConfig``: one adapter holding both kinds' entries), read and written back.

A folder holds ``adapter_config.json`` (``build_full_config`` in ``adapters/configuration/
model_adapters_config.py``: ``{"config": {...}, "hidden_size", "model_class", "model_name", "model_type",
"name", "version": "adapters.<v>"}``) and ``adapter.safetensors`` (``use_safetensors=True``) or
``pytorch_adapter.bin`` (a pickle, read only with ``allow_pickle``; adapters 1.3 can save prefix tuning only
so). Bottleneck weights are named ``<site>.adapters.<name>.adapter_down.0.<weight|bias>`` and
``....adapter_up.<weight|bias>``, ``<site>`` the adapters-only module of one location of one layer
(:data:`LAYOUTS`). ``detect`` needs the ``config`` object and an ``adapters.`` version, so PEFT folders (same
config file name) are never taken for these.

Where a bottleneck acts (``bottleneck_layer_forward`` in ``adapters/methods/bottleneck.py``, ``Adapter`` /
``ParallelAdapter`` in ``adapters/methods/modeling.py``, each model's ``modeling_*.py``): with ``f`` the
bottleneck, ``h`` the sub-block's output (attention or MLP) and ``r`` its residual input, the layer norm ``LN``
after the sum for BERT (post-norm) and none for Llama / GPT-2 (pre-norm),

- sequential, ``original_ln_before = false`` (Houlsby, ``DoubleSeqBnConfig``): ``LN(h + f(h) + r)``, i.e. kind
  ``bottleneck`` on the module whose output is ``h``;
- sequential, ``original_ln_before = true`` (Pfeiffer, ``SeqBnConfig``, output location, pre-norm models):
  ``f(h + r) + h + r``, i.e. ``bottleneck`` on the decoder layer (whose output is ``h + r``);
- ``is_parallel`` (``ParBnConfig``): ``LN(h + f(r) + r)``, i.e. kind ``parallel_bottleneck`` on the layer,
  reading the input of the submodule that receives ``r`` and adding to the output ``h``; at both locations
  (``mh_adapter`` and ``output_adapter``) one entry per layer holds both, stacked, attention first (adapters
  gives both the same rank: ``reduction_factor`` is per layer).

Refused in one line, naming the field: other model types, other architectures (LoRA, IA3, prompt tuning,
ReFT, unions of other parts or of two of a kind ...),
``original_ln_before`` on BERT (``f`` reads ``LN(h + r)`` and its sum re-enters that ``LN``) or at the
attention location (``f(h + r)`` is added mid-layer, where no module output holds ``h + r``),
``original_ln_after = false``,
``residual_before_ln`` other than true with ``original_ln_before``, ``ln_before`` / ``ln_after``,
``use_gating``, ``phm_layer``, ``inv_adapter``, ``cross_adapter``, a non-number ``scaling``, an unknown
``non_linearity``, weights at a location the config turns off (``mh_adapter`` / ``output_adapter``), a layer
without weights at a location the config turns on (adapters would run it at its initial weights).
``dropout``, ``stochastic_depth``, ``init_weights*`` act only in training; ``adapter_residual_before_ln`` and
``residual_before_ln`` (without ``original_ln_before``) change nothing without ``ln_after``;
``reduction_factor``, ``leave_out`` and ``hidden_size`` are what the weights' shapes and names already say
(written back from them: one factor, or a per-layer mapping, from which adapters' ``int(hidden_size //
factor)`` gives each rank); the PHM fields (``phm_*``, ``hypercomplex_nonlinearity``, ``factorized_phm_*``,
``learn_phm``, ``shared_*``) are unused without ``phm_layer``.

Prefix tuning (``PrefixTuningConfig``; ``adapters/methods/prefix_tuning.py``) on Llama and GPT-2: the pool's
``wte`` + ``control_trans`` MLP (``non_linearity``, ``bottleneck_size``) is evaluated once, as
``eject_prefix_tuning`` does, or its ``flat`` vector taken (an ejected prefix is saved with ``flat = false``
and flat weights: the weights decide), into kind ``prefix`` on the decoder stack with ``positions =
"from_zero"``: adapters concatenates the unrotated prefix to each layer's keys after RoPE, and the real tokens
keep positions ``0 ... T - 1``. Layers and heads come from the base (``--base``). The per-layer copies of the
pool must equal it. Written back in adapters' flat form (``flat = true``). Refused: BERT (the kind acts through
a causal LM's cache), ``use_gating``, a non-empty ``leave_out``. ``dropout`` acts only in training,
``init_weights_seed`` only at init, ``shared_gating`` only with gating; ``encoder_prefix`` / ``cross_prefix``
select encoder / cross-attention prefixes, which decoder-only models lack. Matched to adapters' eager attention:
with SDPA and no 4-D mask, adapters 1.3 on transformers 4.57 aligns the causal mask top-left over prefix +
sequence (query ``i`` sees keys ``0 ... i``), which is not prefix tuning.

The head files ``save_adapter`` writes beside (``head_config.json``, ``model_head.*``, the model's own static
head) are not read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import adapterfmt as af

CONFIG_FILE = "adapter_config.json"
SAFE_FILE = "adapter.safetensors"
PICKLE_FILE = "pytorch_adapter.bin"
VERSION = "adapters.1.3.0"
LOCATIONS = ("attention", "output")


@dataclass(frozen=True)
class Layout:
    """Where ``adapters`` puts a model type's bottlenecks, per location (``attention`` / ``output``)."""

    layer: str
    """A decoder (encoder) layer's path, as a regex."""
    sites: tuple[str, str]
    """The adapters-only module under the layer that holds the weights."""
    outputs: tuple[str, str]
    """The submodule whose output is ``h``."""
    inputs: tuple[str, str]
    """The submodule whose input is ``r`` (parallel adapters read it)."""
    pre_norm: bool
    """No layer norm after the sum (``original_ln_before`` then acts on the layer's output)."""
    stack: str | None
    """The decoder stack a prefix targets (kind ``prefix``); None: prefix tuning is refused."""
    attention: str = ""
    """Each layer's attention under the stack (``{}`` the layer), which holds a copy of the prefix pool."""


LAYOUTS = {
    "llama": Layout(r"(?:.+\.)?layers\.\d+", ("attention_adapters", "output_adapters"), ("self_attn.o_proj", "mlp"),
                    ("input_layernorm", "post_attention_layernorm"), True, "model", "layers.{}.self_attn"),
    "gpt2": Layout(r"(?:.+\.)?h\.\d+", ("attention_adapters", "output_adapters"), ("attn", "mlp"), ("ln_1", "ln_2"),
                   True, "transformer", "h.{}.attn"),
    "bert": Layout(r"(?:.+\.)?encoder\.layer\.\d+", ("attention.output", "output"),
                   ("attention.output.dense", "output.dense"), ("attention.self", "intermediate"), False, None),
}
LAYOUTS["roberta"] = LAYOUTS["bert"]  # adapters' RoBERTa layers are BERT's (the same mixins)
"""Checked against ``adapters`` 1.3's own forward (tests/fixtures/adapterhub)."""
TAIL = re.compile(r"^(?P<site>.+)\.adapters\.(?P<name>[^.]+)\.(?P<part>adapter_down\.0|adapter_up)\."
                  r"(?P<what>weight|bias)$")
ACTIVATIONS = {"relu": "relu", "swish": "silu", "silu": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "tanh": "tanh", "leakyrelu": "leaky_relu"}
"""``non_linearity`` (lower-cased, as ``Activation_Function_Class`` does) -> the ``bottleneck`` activation
(transformers' ``ACT2FN``: ``swish`` is SiLU, ``gelu`` the erf form, ``gelu_new`` the tanh form)."""
MUST = {"original_ln_after": True, "ln_before": False, "ln_after": False,
        "use_gating": False, "phm_layer": False, "inv_adapter": None, "cross_adapter": False}
"""Config fields whose other values change the function in ways the bottleneck kinds do not hold."""
ROLE = {("adapter_down.0", "weight"): "down", ("adapter_down.0", "bias"): "down_bias",
        ("adapter_up", "weight"): "up", ("adapter_up", "bias"): "up_bias"}


def _split(layout: Layout, site: str) -> tuple[str, str] | None:
    """(layer, location) of an adapters site path, or None."""
    for loc, tail in zip(LOCATIONS, layout.sites):
        m = re.fullmatch(f"(?P<layer>{layout.layer})\\.{re.escape(tail)}", site)
        if m:
            return m["layer"], loc
    return None


def read_adapterhub(path: str | Path, *, base: Any = None, allow_pickle: bool = False) -> af.Adapter:
    """Read an ``adapters`` folder (module docstring); a ``base`` gives the fingerprint (and a prefix's
    geometry)."""
    path = Path(path)
    meta = af.read_json_object(path / CONFIG_FILE)
    cfg, where = meta.get("config"), path / CONFIG_FILE
    layout = LAYOUTS.get(meta.get("model_type"))  # type: ignore[arg-type]
    if layout is None:
        raise af.UnsupportedError(f"model_type {meta.get('model_type')!r} is not supported (supported: "
                                  f"{', '.join(LAYOUTS)}): where its adapters act is model-specific", path=where)
    union = isinstance(cfg, dict) and cfg.get("architecture") == "union"
    parts = cfg.get("configs") if union else [cfg]  # type: ignore[union-attr]
    if not isinstance(parts, list) or not parts or not all(isinstance(c, dict) for c in parts):
        raise af.FormatError(f"config{'.configs' if union else ''} is not {'a list of ' if union else 'an '}"
                             "adapters config object", path=where)
    archs = [c.get("architecture") or "bottleneck" for c in parts]
    bad = [a for a in archs if a not in ("bottleneck", "prefix_tuning")]
    bad += [archs] if len(set(archs)) < len(archs) else []
    if bad:
        raise af.UnsupportedError(f"config.architecture {bad[0]!r} is not supported (bottleneck adapters and prefix "
                                  "tuning are, alone or one of each in a union)", path=where)
    raw = _weights(path, allow_pickle)
    both = len(parts) == 2
    modules: dict[str, dict[str, Any]] = {}
    tensors: dict[str, torch.Tensor] = {}
    config: dict[str, Any] = {}
    notes: list[str] = []
    for sub in parts:
        prefix = sub.get("architecture") == "prefix_tuning"
        mine = {k: t for k, t in raw.items() if not both or (".prefix_tuning." in k) == prefix}
        if prefix:
            m, t, config, notes = _read_prefix(path, {**meta, "config": sub}, layout, mine, base)
        else:
            m, t = _read_bottleneck(path, {**meta, "config": sub}, layout, mine)
        modules |= m
        tensors |= t
    method = "prefix_tuning" if archs == ["prefix_tuning"] else "bottleneck"
    prov = {"tool": "adapters", "format": "adapterhub", "source": str(path), "config": meta, "notes": notes}
    manifest = af.new_manifest(method, modules, config=config, provenance=[prov],
                               base={"name": meta.get("model_name") or None, "revision": None,
                                     "fingerprint": af.base_fingerprint(base)})
    return af.Adapter(manifest, tensors)


def _read_bottleneck(path: Path, meta: dict[str, Any], layout: Layout,
                     raw: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ``bottleneck`` / ``parallel_bottleneck`` entries and tensors of a bottleneck config (module docstring)."""
    cfg, where = meta["config"], path / CONFIG_FILE
    for key, want in MUST.items():
        if cfg.get(key, want) != want:
            raise af.UnsupportedError(f"config.{key}={cfg[key]!r} cannot be represented (the bottleneck kinds "
                                      f"need {want!r})", path=where)
    parallel = bool(cfg.get("is_parallel", False))
    ln_before = not parallel and bool(cfg.get("original_ln_before", False))
    if ln_before and cfg.get("residual_before_ln", True) is not True:
        raise af.UnsupportedError(f"config.residual_before_ln={cfg.get('residual_before_ln')!r} with "
                                  "original_ln_before=true cannot be represented", path=where)
    if ln_before and not layout.pre_norm:
        raise af.UnsupportedError(f"config.original_ln_before=true on {meta['model_type']} cannot be represented: "
                                  "the adapter reads LN(h + r) and its sum re-enters that layer norm", path=where)
    scale, act = cfg.get("scaling", 1.0), str(cfg.get("non_linearity")).lower()
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise af.UnsupportedError(f"config.scaling={scale!r} cannot be represented (a number is)", path=where)
    if act not in ACTIVATIONS:
        raise af.UnsupportedError(f"config.non_linearity={cfg.get('non_linearity')!r} is not supported "
                                  f"(supported: {', '.join(ACTIVATIONS)})", path=where)
    params = {"activation": ACTIVATIONS[act], "scale": float(scale)}
    modules: dict[str, dict[str, Any]] = {}
    tensors: dict[str, torch.Tensor] = {}
    stacked: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    seen: dict[str, set[str]] = {}
    for key, t in sorted(raw.items()):
        m = TAIL.match(key)
        found = _split(layout, m["site"]) if m is not None and m["name"] == meta.get("name") else None
        if found is None:
            raise af.UnsupportedError(f"tensor {key!r} is not a weight of bottleneck adapter "
                                      f"{meta.get('name')!r} on {meta['model_type']}", path=path)
        layer, loc = found
        seen.setdefault(layer, set()).add(loc)
        flag = "mh_adapter" if loc == "attention" else "output_adapter"
        if cfg.get(flag) is False:
            raise af.UnsupportedError(f"tensor {key!r} is at a location the config turns off ({flag}=false): "
                                      "adapters would not load it", path=path)
        if ln_before and loc == "attention":
            raise af.UnsupportedError("an attention adapter with config.original_ln_before=true (f(h + r) in "
                                      "mid-layer) cannot be represented", path=where)
        i = LOCATIONS.index(loc)
        if parallel:
            stacked.setdefault(layer, {}).setdefault(i, {})[ROLE[m["part"], m["what"]]] = t
            continue
        module = layer if ln_before else f"{layer}.{layout.outputs[i]}"
        modules[module] = {"kind": "bottleneck", "shape": [0], "params": dict(params)}
        tensors[f"{module}.{ROLE[m['part'], m['what']]}"] = t
    for layer, locs in sorted(seen.items()):
        off = [f for f, loc in (("mh_adapter", "attention"), ("output_adapter", "output"))
               if cfg.get(f) and loc not in locs]
        if off:
            raise af.UnsupportedError(f"config.{off[0]}=true but layer {layer!r} has no weights there: adapters would "
                                      "run that adapter at its initial weights", path=path)
    for layer, by_site in stacked.items():  # one entry per layer: one site as is, both stacked (attention first)
        idx = sorted(by_site)
        for role in ROLE.values():
            parts = [by_site[i].get(role) for i in idx]
            if any(v is None for v in parts) or len({tuple(v.shape) for v in parts}) != 1:
                raise af.UnsupportedError(f"layer {layer!r}: parallel bottleneck {role} missing or of different "
                                          "shapes at its two locations (one entry holds them stacked)", path=path)
            tensors[f"{layer}.{role}"] = parts[0] if len(idx) == 1 else torch.stack(parts)
        reads, adds = [layout.inputs[i] for i in idx], [layout.outputs[i] for i in idx]
        modules[layer] = {"kind": "parallel_bottleneck", "shape": [0], "params": {
            **params, "reads": reads[0] if len(idx) == 1 else reads, "adds": adds[0] if len(idx) == 1 else adds}}
    if not modules:
        raise af.FormatError("the adapters folder holds no bottleneck weights", path=path)
    for module, entry in modules.items():  # the width is the up projection's (hidden_size may be absent)
        up_bias = tensors.get(f"{module}.up_bias")
        entry["shape"] = [up_bias.shape[-1] if up_bias is not None and up_bias.dim() >= 1 else 0]
    return modules, tensors


def _weights(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if (path / SAFE_FILE).is_file():
        return af.read_tensor_file(path / SAFE_FILE)[0]
    if (path / PICKLE_FILE).is_file():
        return af.read_pickle_tensors(path / PICKLE_FILE, allow_pickle=allow_pickle)
    raise af.MissingFileError(f"adapters folder has neither {SAFE_FILE} nor {PICKLE_FILE}", path=path)


def _geometry(base: Any, meta: dict[str, Any], where: Path) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of the base, as adapters' ``PrefixTuningLayer.add_adapter`` takes them."""
    cfg = af.base_config(base)
    heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    if not heads or not layers:
        raise af.UnsupportedError("an adapters prefix is stored as one flat vector per adapter: its layers and "
                                  "heads come from the base; pass --base (base= in Python)", path=where)
    hidden = meta.get("hidden_size") or cfg.get("hidden_size") or cfg.get("n_embd")
    return int(layers), int(cfg.get("num_key_value_heads") or heads), int(hidden) // int(heads)


def _read_prefix(path: Path, meta: dict[str, Any], layout: Layout, raw: dict[str, torch.Tensor],
                 base: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """The ``prefix`` entry (``positions = "from_zero"``), its tensors, method config and notes of a prefix-tuning
    config (module docstring)."""
    cfg, where, name = meta["config"], path / CONFIG_FILE, meta.get("name")
    if layout.stack is None:
        raise af.UnsupportedError(f"prefix tuning on {meta['model_type']} cannot be represented: kind prefix "
                                  "acts through a causal LM's attention cache", path=where)
    for key, want in (("use_gating", False), ("leave_out", [])):
        if cfg.get(key, want) != want:
            raise af.UnsupportedError(f"config.{key}={cfg[key]!r} cannot be represented (kind prefix needs "
                                      f"{want!r})", path=where)
    pool = f"{layout.stack}.prefix_tuning.prefix_tunings.{name}.self_prefix."
    own = {k[len(pool):]: t for k, t in raw.items() if k.startswith(pool)}
    for key, t in raw.items():  # each layer's attention holds the same pool: equal copies
        part = key.partition(f".prefix_tuning.pool.prefix_tunings.{name}.self_prefix.")[2]
        if not key.startswith(pool) and not (part in own and torch.equal(t, own[part])):
            raise af.UnsupportedError(f"tensor {key!r} is not a weight of prefix {name!r} (nor a copy of one)",
                                      path=path)
    layers, heads, head_dim = _geometry(base, meta, where)
    n = int(cfg.get("prefix_length", 0))
    if cfg.get("flat") or set(own) == {"control_trans"}:  # eject_prefix_tuning saves flat weights, flat=false
        flat = own.get("control_trans")
    elif {"wte.weight", "control_trans.0.weight", "control_trans.0.bias", "control_trans.2.weight",
          "control_trans.2.bias"} <= own.keys():
        from transformers.activations import get_activation

        act = str(cfg.get("non_linearity", "tanh")).lower()
        f = torch.nn.functional.leaky_relu if act == "leakyrelu" else get_activation(act)  # Activation_Function_Class
        with torch.no_grad():  # PrefixTuning.forward: control_trans(wte(0 ... n - 1)), what eject() stores
            h = f(torch.nn.functional.linear(own["wte.weight"][:n], own["control_trans.0.weight"],
                                             own["control_trans.0.bias"]))
            flat = torch.nn.functional.linear(h, own["control_trans.2.weight"], own["control_trans.2.bias"])
    else:
        flat = None
    if flat is None or flat.numel() != n * layers * 2 * heads * head_dim:
        what = "flat control_trans" if cfg.get("flat") else "wte / control_trans"
        raise af.UnsupportedError(f"prefix {name!r}: no {what} of {n} x {layers} layers x 2 x {heads} heads x "
                                  f"{head_dim} values (config.prefix_length, the base's geometry)", path=path)
    kv = flat.reshape(n, layers * 2, heads, head_dim).permute(1, 0, 2, 3)  # PrefixTuning.forward's view
    entry = {"kind": "prefix", "shape": [layers, heads, head_dim], "params": {"positions": "from_zero"}}
    tensors = {f"{layout.stack}.keys": kv[0::2].contiguous(), f"{layout.stack}.values": kv[1::2].contiguous()}
    notes = [] if "wte.weight" not in own else [("the prefix MLP (wte, control_trans) is stored evaluated, as "
                                                 "adapters' eject_prefix_tuning gives it")]
    return {layout.stack: entry}, tensors, {"num_virtual_tokens": n}, notes


Part = tuple[str, dict[str, Any], dict[str, torch.Tensor]]
"""(model type, adapters config, tensors) of one adapters config."""


def _prefix_part(stack: str, entry: dict[str, Any], t: dict[str, torch.Tensor], name: str,
                 base_type: str | None) -> Part:
    """A ``prefix`` entry (``positions = "from_zero"``) as adapters' flat prefix (``FlatPrefixTuning``)."""
    positions = entry.get("params", {}).get("positions", "after_prefix")
    if positions != "from_zero":
        raise af.UnsupportedError(f"module {stack!r}: adapters numbers the real tokens from 0 after a prefix; this "
                                  f"one (params.positions {positions!r}, PEFT's) gives other logits there")
    model_type = next((n for n, lay in LAYOUTS.items() if lay.stack == stack and base_type in (None, n)), None)
    if model_type is None:
        raise af.UnsupportedError(f"module {stack!r} is not a decoder stack adapters puts a prefix on "
                                  f"({', '.join(str(lay.stack) for lay in LAYOUTS.values() if lay.stack)})")
    layers, n, heads, head_dim = t["keys"].shape
    kv = torch.stack([t["keys"], t["values"]], dim=1).reshape(layers * 2, n, heads, head_dim)
    flat = kv.permute(1, 0, 2, 3).reshape(-1).contiguous()
    cfg = {"architecture": "prefix_tuning", "flat": True, "prefix_length": n, "bottleneck_size": 512,
           "non_linearity": "tanh", "dropout": 0.0, "encoder_prefix": True, "cross_prefix": True, "leave_out": [],
           "use_gating": False, "shared_gating": True, "init_weights_seed": None}
    tensors = {f"{stack}.prefix_tuning.prefix_tunings.{name}.self_prefix.control_trans": flat}
    tensors |= {f"{stack}.{LAYOUTS[model_type].attention.format(i)}.prefix_tuning.pool.prefix_tunings.{name}."
                "self_prefix.control_trans": flat.clone() for i in range(layers)}  # as save_adapter writes it
    return model_type, cfg, tensors


Place = tuple[str, str, str, int | None]
"""(layer, location, form, index in the entry's stacked roles or None); form ``sequential``, ``ln_before``
(Pfeiffer on the layer) or ``parallel``."""


def _places(layout: Layout, module: str, entry: dict[str, Any]) -> list[Place] | None:
    """Where adapters holds a bottleneck entry in this layout (two places for stacked parallel ones), or None."""
    if not re.fullmatch(layout.layer, module):
        for i, tail in enumerate(layout.outputs):
            if entry["kind"] == "bottleneck" and module.endswith(f".{tail}") and \
                    re.fullmatch(layout.layer, module[:-len(tail) - 1]):
                return [(module[:-len(tail) - 1], LOCATIONS[i], "sequential", None)]
        return None
    if entry["kind"] == "bottleneck":
        return [(module, "output", "ln_before", None)] if layout.pre_norm else None
    reads, adds = entry["params"].get("reads"), entry["params"].get("adds")
    stacked = isinstance(reads, list) and isinstance(adds, list)
    out: list[Place] = []
    for k, pair in enumerate(zip(reads, adds) if stacked else [(reads, adds)]):
        i = next((i for i in range(2) if pair == (layout.inputs[i], layout.outputs[i])), None)
        if i is None:
            return None
        out.append((module, LOCATIONS[i], "parallel", k if stacked else None))
    return out


def _layout_of(adapter: af.Adapter, base_type: str | None) -> tuple[str, Layout]:
    """The model type: the base's, else the one the adapter was read from, else the one whose places fit."""
    named = [base_type]
    named += [p["config"].get("model_type") for p in adapter.manifest.get("provenance", [])
              if p.get("format") == "adapterhub" and isinstance(p.get("config"), dict)]
    fits = [n for n in named if n in LAYOUTS] or [
        n for n, lay in LAYOUTS.items() if all(_places(lay, m, e) for m, e in adapter.modules.items())]
    if not fits:
        raise af.UnsupportedError(f"no model type adapters supports ({', '.join(LAYOUTS)}) puts its bottlenecks "
                                  f"at modules {sorted(adapter.modules)[:2]}")
    return fits[0], LAYOUTS[fits[0]]


def write_adapterhub(adapter: af.Adapter, path: str | Path, *, base: Any = None) -> Path:
    """Write a ``bottleneck`` / ``prefix`` adapter (or one of each kind, as a union) as an ``adapters`` folder
    (``adapter.safetensors``), the inverse of :func:`read_adapterhub` (module docstring)."""
    kinds = {e["kind"] for e in adapter.modules.values()}
    name = next((p["config"].get("name") for p in adapter.manifest.get("provenance", [])
                 if p.get("format") == "adapterhub"), None) or adapter.method
    prefixes = [m for m, e in adapter.modules.items() if e["kind"] == "prefix"]
    base_cfg = af.base_config(base)
    base_type = base_cfg.get("model_type")
    if base_type is not None and base_type not in LAYOUTS:
        raise af.UnsupportedError(f"the base's model_type {base_type!r} is not one whose adapters layout is known "
                                  f"here ({', '.join(LAYOUTS)})")
    if not kinds - {"prefix"} <= {"bottleneck", "parallel_bottleneck"} or len(prefixes) > 1:
        raise af.UnsupportedError(f"an adapters folder holds kinds bottleneck and parallel_bottleneck, and one "
                                  f"prefix, not {sorted(kinds)} ({len(prefixes)} prefixes)")
    parts = [_prefix_part(m, adapter.modules[m], adapter.module_tensors(m), name, base_type) for m in prefixes]
    rest = {m: e for m, e in adapter.modules.items() if e["kind"] != "prefix"}
    if rest:
        tensors = {f"{m}.{r}": t for m in rest for r, t in adapter.module_tensors(m).items()}
        sub = af.Adapter({**adapter.manifest, "modules": rest}, tensors)
        parts.append(_bottleneck_part(sub, base_cfg, base_type, name))
    types = {t for t, _, _ in parts}
    if len(types) != 1:
        raise af.UnsupportedError(f"the prefix and the bottlenecks are for different model types: {sorted(types)}")
    cfg = parts[0][1] if len(parts) == 1 else {"architecture": "union", "configs": [c for _, c, _ in parts]}
    width = next((e["shape"][0] for e in rest.values()), None)  # a bottleneck's width is the hidden size
    meta = {"config": cfg, "hidden_size": base_cfg.get("hidden_size") or base_cfg.get("n_embd") or width,
            "model_class": type(base).__name__ if isinstance(base, nn.Module)
            else next(iter(base_cfg.get("architectures") or []), None), "model_name": (adapter.base or {}).get("name"),
            "model_type": types.pop(), "name": name, "version": VERSION}
    tensors = {k: v for _, _, t in parts for k, v in t.items()}
    return af.write_folder(path, SAFE_FILE, tensors, CONFIG_FILE, meta)


def _bottleneck_part(adapter: af.Adapter, base_cfg: dict[str, Any], base_type: str | None, name: str) -> Part:
    """The bottleneck entries (all of ``adapter``) as one adapters bottleneck config."""
    params = {(e["params"]["activation"], float(e["params"].get("scale", 1.0))) for e in adapter.modules.values()}
    if len(params) != 1:
        raise af.UnsupportedError(f"adapters' config has one non_linearity and one scaling for all modules: "
                                  f"the adapter has {sorted(params)}")
    ((act, scale),) = params
    model_type, layout = _layout_of(adapter, base_type)
    places: list[tuple[str, Place]] = []
    for module, entry in adapter.modules.items():
        found = _places(layout, module, entry)
        if found is None:
            raise af.UnsupportedError(f"module {module!r} ({entry['kind']}) is not a place adapters puts a "
                                      f"bottleneck on {model_type}")
        places += [(module, place) for place in found]
    forms = {place[2] for _, place in places}
    if len(forms) != 1:
        raise af.UnsupportedError(f"adapters' config has one form for all bottlenecks: the adapter mixes "
                                  f"{' and '.join(sorted(forms))}")
    (form,) = forms
    layers: dict[str, set[str]] = {}
    for _, (layer, loc, _, _) in places:
        layers.setdefault(layer, set()).add(loc)
    locs = set().union(*layers.values())
    if any(v != locs for v in layers.values()):
        have = sorted((k, sorted(v)) for k, v in layers.items())
        raise af.UnsupportedError(f"adapters' config puts the same locations in every layer ({form}): the adapter "
                                  f"has {have}")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, set[int]] = {}
    for module, (layer, loc, _, k) in places:
        t = {r: v if k is None else v[k] for r, v in adapter.module_tensors(module).items()}
        for (part, what), role in ROLE.items():
            site = layout.sites[LOCATIONS.index(loc)]
            tensors[f"{layer}.{site}.adapters.{name}.{part}.{what}"] = t[role].contiguous()
        n = re.search(r"\.(\d+)$", layer).group(1)  # type: ignore[union-attr]
        ranks.setdefault(n, set()).add(t["down"].shape[0])
    d = next(iter(adapter.modules.values()))["shape"][0]
    factors = {n: _reduction_factor(d, rs, n) for n, rs in sorted(ranks.items(), key=lambda kv: int(kv[0]))}
    first = next(iter(factors.values()))
    reduction = first if len(set(factors.values())) == 1 else {**factors, "default": first}
    n_layers = base_cfg.get("num_hidden_layers") or base_cfg.get("n_layer")
    present = {int(n) for n in ranks}
    leave_out = sorted(set(range(n_layers if n_layers else max(present) + 1)) - present)
    activation = {v: k for k, v in reversed(ACTIVATIONS.items())}[act]
    cfg = {"mh_adapter": "attention" in locs, "output_adapter": "output" in locs,
           "original_ln_before": form == "ln_before", "original_ln_after": True, "residual_before_ln": True,
           "adapter_residual_before_ln": False, "ln_before": False, "ln_after": False, "non_linearity": activation,
           "reduction_factor": reduction, "scaling": scale, "is_parallel": form == "parallel", "use_gating": False,
           "phm_layer": False, "inv_adapter": None, "inv_adapter_reduction_factor": None, "cross_adapter": False,
           "leave_out": leave_out, "dropout": 0.0, "stochastic_depth": 0.0,
           "init_weights": "mam_adapter" if form == "parallel" else "bert", "init_weights_seed": None}
    return model_type, cfg, tensors


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
        return read_adapterhub(path, base=options.get("base"), allow_pickle=options.get("allow_pickle", False))

    def write(self, adapter: af.Adapter, path: Path, **options: Any) -> None:
        write_adapterhub(adapter, path, base=options.get("base"))


@af.hookimpl
def adapterfmt_formats() -> list[Any]:
    return [AdapterHubFormat()]
