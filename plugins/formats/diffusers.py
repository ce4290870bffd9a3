"""The diffusers LoRA format for ``adapter convert``: one ``.safetensors`` (``pytorch_lora_weights.safetensors``).

Keys are ``<component>.<module path>.<role>`` with component ``unet``, ``transformer``, ``text_encoder`` or
``text_encoder_2``; the module path in adapterfmt keeps the component (``unet.down_blocks.0.proj_in``), as
a pipeline module holding the components names it. Roles: PEFT style ``lora_A.weight`` ``[r, in(, kh, kw)]``
/ ``lora_B.weight`` ``[out, r(, 1, 1)]``, or the older ``lora.down.weight`` / ``lora.up.weight``;
dW = scale * B @ A.

The scale comes, as diffusers 0.42 loads it, from one of:

- ``lora_adapter_metadata`` in the file's ``__metadata__`` (what diffusers' ``save_lora_weights`` writes): a
  JSON object of PEFT ``LoraConfig`` fields prefixed by component (``unet.r``, ``unet.lora_alpha`` ...).
  diffusers builds each component's ``LoraConfig`` from its fields (none: PEFT's defaults, r = alpha = 8),
  so per module r and alpha follow ``rank_pattern`` / ``alpha_pattern`` under PEFT's rule (the first key
  matching a dotted suffix of the module path within its component), scale = alpha / r (alpha / sqrt(r)
  with ``use_rslora``). An r that differs from the tensors' (diffusers cannot load the file), a field that
  changes the function otherwise (``use_dora``, ``lora_bias``, ``fan_in_fan_out``, an ``init_lora_weights``
  that rewrites the base, ``modules_to_save`` ..., any unknown field with a value) is refused by name. The
  unet / transformer take their modules from the tensors; the text encoders (loaded by transformers) from
  ``target_modules``, so there every module must be in that list (exact name or dotted suffix).
- otherwise optional scalar ``<component>.<module>.alpha`` keys (older kohya-converted files): alpha / r,
  absent alpha = r (scale 1). A file with both is refused.

Writing keeps the source file's key style and writes PEFT keys otherwise, never ``.alpha`` keys (diffusers'
``load_lora_weights`` refuses them): the scales go into ``lora_adapter_metadata``, one ``LoraConfig`` per
component (``r`` / ``lora_alpha`` the most common values, exact ``^name`` patterns for the rest, the
modules as ``target_modules``); a source's config is kept where it still gives every module its r and
scale. No metadata is written when every scale is 1 and the source had none. Modules outside the four
components, other kinds, DoRA and LoRA bias are refused by name; so is any tensor a reader cannot place.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import adapterfmt as af

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
STYLES = {"peft": (".lora_A.weight", ".lora_B.weight"), "legacy": (".lora.down.weight", ".lora.up.weight")}
SUFFIXES = {s: (style, i) for style, pair in STYLES.items() for i, s in enumerate(pair)}
METADATA_KEY = "lora_adapter_metadata"
PEFT_DEFAULT_R = PEFT_DEFAULT_ALPHA = 8
READ_FIELDS = frozenset({"r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora"})
IGNORED_FIELDS = frozenset({
    "peft_type", "peft_version", "task_type", "inference_mode", "auto_mapping", "base_model_name_or_path",
    "revision", "lora_dropout", "megatron_core", "megatron_config", "qalora_group_size", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "target_modules", "exclude_modules", "layers_to_transform",
    "layers_pattern", "init_lora_weights",
})
"""``LoraConfig`` fields that only steer training or initialisation (``init_lora_weights`` is checked on its
own), or targeting, which the tensors decide for the unet / transformer (text encoders are checked)."""
NEUTRAL = (None, False, {}, [], "none")
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")
"""``init_lora_weights`` values that only set initial factors, which the file's tensors replace."""


def _split(key: str) -> tuple[str, str] | None:
    """``(module, role)`` of a diffusers key, role in SUFFIXES or ``.alpha``; None if not one."""
    if key.split(".", 1)[0] not in COMPONENTS:
        return None
    for suffix in (*SUFFIXES, ".alpha"):
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], suffix
    return None


def _configs(meta: Mapping[str, str], path: Path | None) -> dict[str, dict[str, Any]] | None:
    """``{component: LoraConfig fields}`` from ``lora_adapter_metadata``; None when the file has none."""
    raw = meta.get(METADATA_KEY)
    if not raw:
        return None
    try:
        fields = json.loads(raw)
    except json.JSONDecodeError as e:
        raise af.FormatError(f"__metadata__ {METADATA_KEY} is not valid JSON ({e.msg})", path=path) from None
    if not isinstance(fields, dict):
        raise af.FormatError(f"__metadata__ {METADATA_KEY} is not a JSON object", path=path)
    configs: dict[str, dict[str, Any]] = {c: {} for c in COMPONENTS}
    for key, value in fields.items():
        comp, _, field = key.partition(".")
        if comp in configs:
            configs[comp][field] = value
    return configs


def _is(kind: str, value: Any) -> bool:
    """Whether a JSON value is an ``integer``, a ``number`` or a ``boolean``."""
    if kind == "boolean" or isinstance(value, bool):
        return kind == "boolean" and isinstance(value, bool)
    return isinstance(value, int) or (kind == "number" and isinstance(value, float))


def _regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def _check_config(comp: str, cfg: Mapping[str, Any], modules: list[str], path: Path | None) -> None:
    """Refuse, by name, every field of ``comp``'s config that changes the function and is not read."""
    bad = [f"{comp}.{k}={v!r}" for k, v in sorted(cfg.items())
           if k not in READ_FIELDS and k not in IGNORED_FIELDS and v not in NEUTRAL]
    init = cfg.get("init_lora_weights", True)
    if not any(init is p or (isinstance(p, str) and init == p) for p in PLAIN_INITS):
        bad.append(f"{comp}.init_lora_weights={init!r} (PEFT rewrites the base or the forward with it)")
    if comp in TEXT_ENCODERS:
        for k in ("exclude_modules", "layers_to_transform", "layers_pattern"):
            if cfg.get(k) not in NEUTRAL:
                bad.append(f"{comp}.{k}={cfg[k]!r} (transformers targets a text encoder's modules by config)")
        targets = cfg.get("target_modules")
        missed = [m for m in modules if not isinstance(targets, list)
                  or not any(m == t or m.endswith("." + t) for t in targets)]
        if missed:
            bad.append(f"{comp}.target_modules={targets!r} does not list {', '.join(missed)} (transformers "
                       "would leave them out)")
    for k, want in (("r", "integer"), ("lora_alpha", "number"), ("use_rslora", "boolean")):
        if k in cfg and not _is(want, cfg[k]):
            bad.append(f"{comp}.{k}={cfg[k]!r} (not a {want})")
    for k, want in (("rank_pattern", "integer"), ("alpha_pattern", "number")):
        patterns = cfg.get(k) or {}
        if not isinstance(patterns, dict) or not all(_is(want, v) and _regex(p) for p, v in patterns.items()):
            bad.append(f"{comp}.{k}={cfg[k]!r} (not an object of regexes to {want}s)")
    if bad:
        raise af.UnsupportedError(f"diffusers {METADATA_KEY} fields this converter cannot hold: " + "; ".join(bad),
                                  path=path)


def _metadata_scales(configs: Mapping[str, Mapping[str, Any]], ranks: Mapping[str, int],
                     path: Path | None) -> dict[str, float]:
    """``{module: scale}`` as diffusers gives it from the components' configs (see the module docstring)."""
    by_comp: dict[str, list[str]] = {}
    for m in ranks:
        comp, _, rel = m.partition(".")
        by_comp.setdefault(comp, []).append(rel)
    scales, wrong = {}, []
    for comp, rels in sorted(by_comp.items()):
        cfg = configs.get(comp, {})
        _check_config(comp, cfg, rels, path)
        rslora = bool(cfg.get("use_rslora", False))
        for rel in rels:
            r = ranks[f"{comp}.{rel}"]
            want = af.peft_pattern(cfg.get("rank_pattern") or {}, rel, cfg.get("r", PEFT_DEFAULT_R))
            if want != r:
                wrong.append(f"{comp}.{rel} (rank {r}, the config gives {want})")
            alpha = af.peft_pattern(cfg.get("alpha_pattern") or {}, rel, cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA))
            scales[f"{comp}.{rel}"] = alpha / math.sqrt(r) if rslora else alpha / r
    if wrong:
        raise af.UnsupportedError(f"diffusers {METADATA_KEY} ranks differ from the tensors' (diffusers cannot "
                                  "load this file): " + ", ".join(wrong), path=path)
    return scales


def read_diffusers(path: str | Path, *, base: Any = None) -> af.Adapter:
    """Read a diffusers LoRA ``.safetensors`` (see the module docstring)."""
    path = Path(path)
    raw, meta = af.read_tensor_file(path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown, styles = [], set()
    for key, t in raw.items():
        split = _split(key)
        if split is None:
            unknown.append(key)
            continue
        parts.setdefault(split[0], {})[split[1]] = t
        if split[1] in SUFFIXES:
            styles.add(SUFFIXES[split[1]][0])
    pairs = {}
    for m, p in parts.items():
        pair = next((STYLES[s] for s in STYLES if STYLES[s][0] in p and STYLES[s][1] in p), None)
        if pair is None or len(p) - (".alpha" in p) != 2:
            unknown.append(f"{m} ({', '.join(sorted(p))}: not one lora A/B pair)")
            continue
        pairs[m] = (p[pair[0]], p[pair[1]])
    if unknown:
        raise af.UnsupportedError("diffusers tensors this converter cannot place: " + ", ".join(sorted(unknown)),
                                  path=path)
    configs = _configs(meta, path)
    alpha_keys = sorted(m for m, p in parts.items() if ".alpha" in p)
    if configs is not None and alpha_keys:
        raise af.UnsupportedError(f"both {METADATA_KEY} and .alpha keys ({', '.join(alpha_keys)}) give scales; "
                                  "diffusers loads neither such file", path=path)
    ranks = {m: a.shape[0] for m, (a, _) in pairs.items()}
    scales = (_metadata_scales(configs, ranks, path) if configs is not None else
              {m: float(parts[m][".alpha"]) / ranks[m] if ".alpha" in parts[m] else 1.0 for m in pairs})
    prov = {"tool": "diffusers", "format": "diffusers", "source": str(path), "metadata": meta,
            "style": styles.pop() if len(styles) == 1 else "peft"}
    return af.lowrank_adapter({m: (a, b, scales[m]) for m, (a, b) in pairs.items()}, provenance=prov, base=base,
                              path=path)


def _new_config(rels: Mapping[str, tuple[int, float]]) -> dict[str, Any]:
    """A ``LoraConfig`` giving each module (``{name in component: (r, scale)}``) its rank and scale."""
    ranks = {m: r for m, (r, _) in rels.items()}
    alphas = {m: af.alpha_for(s, r) for m, (r, s) in rels.items()}
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    return {"r": r0, "lora_alpha": a0, "use_rslora": False, "target_modules": sorted(rels),
            "rank_pattern": {"^" + re.escape(m): r for m, r in sorted(ranks.items()) if r != r0},
            "alpha_pattern": {"^" + re.escape(m): a for m, a in sorted(alphas.items()) if a != a0}}


def _write_metadata(factors: af.Factors, meta: Mapping[str, str]) -> dict[str, str]:
    """``meta`` with the ``lora_adapter_metadata`` that gives diffusers every module's rank and scale."""
    out = {k: v for k, v in meta.items() if k != METADATA_KEY}
    old = _configs(meta, None)
    if old is None and all(s == 1.0 for _, _, s in factors.values()):
        return out  # diffusers' default without metadata: alpha = r
    by_comp: dict[str, dict[str, tuple[int, float]]] = {}
    for m, (a, _, s) in factors.items():
        comp, _, rel = m.partition(".")
        by_comp.setdefault(comp, {})[rel] = (a.shape[0], s)
    fields: dict[str, Any] = {}
    for comp, rels in sorted(by_comp.items()):
        cfg = _new_config(rels)
        if old is not None:
            try:
                keep = _metadata_scales({comp: old[comp]}, {f"{comp}.{m}": r for m, (r, _) in rels.items()}, None) \
                    == {f"{comp}.{m}": s for m, (_, s) in rels.items()}
            except af.UnsupportedError:
                keep = False
            cfg = old[comp] if keep else cfg
        fields.update({f"{comp}.{k}": v for k, v in cfg.items()})
    same = meta.get(METADATA_KEY) and json.loads(meta[METADATA_KEY]) == fields
    out[METADATA_KEY] = meta[METADATA_KEY] if same else json.dumps(fields, indent=2, sort_keys=True)
    return out


def write_diffusers(adapter: af.Adapter, path: str | Path) -> Path:
    """Write ``adapter`` (plain LoRA on modules under unet / transformer / text_encoder(_2)) as diffusers LoRA."""
    path = Path(path)
    factors = af.lowrank_factors(adapter, "diffusers")
    outside = sorted(m for m in factors if m.split(".", 1)[0] not in COMPONENTS or "." not in m)
    if outside:
        raise af.UnsupportedError(f"diffusers LoRA modules live under {', '.join(COMPONENTS)}; outside them: "
                                  + ", ".join(outside))
    src = next((p for p in reversed(adapter.manifest.get("provenance", [])) if p.get("format") == "diffusers"), {})
    down, up = STYLES[src.get("style", "peft")]
    tensors = {}
    for m, (a, b, _) in factors.items():
        tensors[m + down], tensors[m + up] = a, b
    af.write_tensor_file(path, tensors, _write_metadata(factors, src.get("metadata") or {}) or None)
    return path


class DiffusersFormat:
    """The ``diffusers`` codec (:class:`adapterfmt.ForeignFormat`)."""

    name = "diffusers"
    summary = "diffusers LoRA .safetensors (unet./transformer./text_encoder. keys, lora_A/lora_B or lora.down/up)"

    def detect(self, path: Path) -> bool:
        names = af.tensor_names(path)
        return bool(names) and all(_split(n) for n in names)

    def read(self, path: Path, **options: Any) -> af.Adapter:
        return read_diffusers(path, base=options.get("base"))

    def write(self, adapter: af.Adapter, path: Path, **options: Any) -> None:
        write_diffusers(adapter, path)


@af.hookimpl
def adapterfmt_formats() -> list[Any]:
    return [DiffusersFormat()]
