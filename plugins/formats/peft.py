"""The PEFT format for ``adapter convert``: a folder with ``adapter_config.json`` + ``adapter_model.safetensors``
(or ``adapter_model.bin``, read only with ``allow_pickle=True`` and ``torch.load(weights_only=True)``).

Mapping (PEFT -> adapterfmt; the reverse writes the same, so a round trip is tensor for tensor):

- LoRA ``<m>.lora_A.weight`` / ``lora_B.weight`` (``lora_embedding_A`` / ``_B`` for embeddings) -> ``lowrank``
  with ``scale = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``), ``r`` and ``alpha`` per module from
  ``rank_pattern`` / ``alpha_pattern`` under PEFT's own matching rule (first key matching a dotted suffix);
  ``lora_B.bias`` (``lora_bias``) -> role ``bias``; ``lora_magnitude_vector`` (DoRA) -> role ``magnitude``;
  ``base_layer.bias`` (the trained base bias of a targeted module, ``bias="lora_only"`` / ``"all"``) -> role
  ``bias_value``;
  ``fan_in_fan_out`` (GPT-2 ``Conv1D``) and embeddings -> ``params.transposed``.
- ``modules_to_save`` -> ``dense`` mode ``replace`` (``value`` / ``bias_value``); ``bias="all"`` base biases of
  untargeted modules -> ``dense`` replace of parameter ``bias``; ``trainable_token_indices`` -> kind ``rows``.
- ``init_lora_weights="pissa"`` / ``"olora"``: PEFT subtracts ``scale * B0 A0`` (top-r SVD / QR of the base
  weight) from the base when it loads the file, so with ``base=`` each Linear module becomes the rank-2r
  ``lowrank`` ``[A; A0]``, ``[B, -B0]`` (B0, A0 recomputed in float32 as PEFT does); without it, an error.
  Values that only set the initial factors are read as plain LoRA; the rest (randomised SVD, CorDA, LoftQ,
  LoRA-GA) are refused by name.
- ``<m>.base_layer.weight`` / ``<m>.weight`` outside ``modules_to_save`` (embeddings saved whole,
  ``save_embedding_layers``), which PEFT loads over the base's: compared with ``base=`` (needed); equal ->
  dropped, else ``dense`` replace (of ``stored + dW`` on a LoRA-targeted module); both noted in the
  provenance (``notes``, shown by ``adapter convert``).
- LoHa / LoKr -> kinds ``hadamard`` / ``kronecker`` (``scale = alpha / r``), VeRA -> kind ``vera`` with the shared
  projections stored once (kinds of the ``lora_variants`` plugin; shapes from ``base=``, or for LoHa / LoKr
  from 2-D factors: a Linear's).
- AdaLoRA -> ``lowrank`` with ``lora_E`` folded into A and ``scale = alpha / (init_r + 1e-5)`` (written back
  as a PEFT LoRA: same function, E is not kept). IA3 ``ia3_l`` -> ``vector`` op ``scale`` (output side, or
  input side for ``feedforward_modules``). Prompt tuning -> ``prompt`` on the input embedding.
- Structured additive types (kinds of the ``structured`` plugin, spec 6.10.8-12): SHiRA -> ``sparse`` (its
  (row, column) pairs as sorted flat indices), LN tuning -> ``dense`` replace, FourierFT -> ``fourier`` (the
  frequencies PEFT draws from ``random_loc_seed`` stored), VB-LoRA -> ``vector_bank`` and RandLoRA ->
  ``randlora`` (shared bank / bases stored once), C3A -> ``circulant`` (``scale = 1 / in``), MiSS and Bone
  (``bone_block``, PEFT <= 0.17; written back as MiSS) -> ``block_share``; RandLoRA ``save_projection=false``
  -> its bases drawn again (needs the base's shapes) and stored. Refused: ``bias`` other than ``"none"``.
- ``base_model_name_or_path`` / ``revision`` -> ``base``; the PEFT config is kept in ``provenance`` so that
  writing back reproduces it when the modules and their scales are unchanged.

Module types are not in a PEFT file: shapes the file does not give (IA3's other dimension, the embedding a
prompt or trainable tokens act on) come from ``base=`` (checkpoint path or live model); when writing, a
transposed 2-D module is taken for an embedding if the live ``base`` says so, else by its name.
The config is type-checked (:data:`CONFIG_SCHEMA`) before use; tensors of a module the config's target fields
do not target (PEFT ignores them) and a config field that changes the function and cannot be represented
are errors naming them.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import torch
from torch import nn

import adapterfmt as af

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PREFIX = "base_model.model."
EMBEDDING_NAMES = ("embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings",
                   "token_type_embeddings", "shared", "embed", "emb", "embeddings", "embedding")

POSITION_NAMES = ("wpe", "position_embeddings", "token_type_embeddings")
"""Embeddings of positions or segments, never the input embedding a prompt is prepended to."""

IGNORED = frozenset({
    "peft_type", "peft_version", "task_type", "inference_mode", "auto_mapping", "base_model_name_or_path",
    "revision", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "lora_dropout",
    "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_config",
    "megatron_core", "qalora_group_size", "init_weights", "module_dropout", "rank_dropout", "init_ia3_weights",
    "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs", "beta1",
    "beta2", "tinit", "tfinal", "deltaT", "orth_reg_weight", "total_step", "target_r", "num_attention_heads",
    "num_layers", "token_dim",
})
"""Fields read elsewhere or that only steer training: the target fields are checked against the tensors
(:func:`peft_targets`), ``init_lora_weights`` by :func:`_base_rewrite` (its ``*_config`` companions matter
only with their value), dropouts act only in training, the rest are metadata or training schedules."""

NEUTRAL = (None, False, {}, [], "none", 0.0)
LORA_FIELDS = frozenset({"r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
                         "fan_in_fan_out", "bias", "lora_bias", "modules_to_save", "trainable_token_indices",
                         "kasa_config"})
ADALORA_FIELDS = LORA_FIELDS - {"kasa_config"} | {"init_r"}
IA3_FIELDS = frozenset({"feedforward_modules", "fan_in_fan_out", "modules_to_save"})
PROMPT_FIELDS = frozenset({"num_virtual_tokens", "num_transformer_submodules", "modules_to_save"})
P_TUNING_FIELDS = PROMPT_FIELDS | {"encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers",
                                   "encoder_dropout"}
"""P-tuning's encoder fields shape only its prompt encoder, whose output PEFT saves as ``prompt_embeddings``."""
MULTITASK_FIELDS = PROMPT_FIELDS | {"num_tasks", "num_ranks", "prompt_tuning_init_state_dict_path",
                                    "prompt_tuning_init_task"}
MULTITASK_TENSORS = ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows")
PREFIX_FIELDS = PROMPT_FIELDS | {"prefix_projection", "encoder_hidden_size"}
"""Prefix tuning: with ``prefix_projection`` PEFT saves the projection's output (the key/value prefix itself)
and runs that file without the projection, so both read the same; ``num_layers`` / ``token_dim`` /
``num_attention_heads`` give the prefix's geometry (:meth:`_Reader.prefix`)."""
LYCORIS_FIELDS = frozenset({"r", "alpha", "rank_pattern", "alpha_pattern", "modules_to_save", "decompose_both",
                            "decompose_factor", "rank_dropout_scale"})
VERA_FIELDS = frozenset({"r", "modules_to_save", "save_projection", "projection_prng_key", "d_initial",
                         "vera_dropout", "bias"})
LYCORIS_ROLES = {"LOHA": ("hadamard", ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")),
                 "LOKR": ("kronecker", ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"))}
"""PEFT LoHa / LoKr tensor names, which are the roles of the ``lora_variants`` plugin's kinds."""
MULTIPLICATIVE_FIELDS = {
    "OFT": frozenset({"r", "oft_block_size", "fan_in_fan_out", "bias", "coft", "eps", "block_share",
                      "use_cayley_neumann", "num_cayley_neumann_terms", "modules_to_save"}),
    "BOFT": frozenset({"boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "boft_dropout",
                       "fan_in_fan_out", "bias", "modules_to_save"}),
    "HRA": frozenset({"r", "apply_GS", "bias", "modules_to_save"}),
}
"""Config fields of PEFT's multiplicative types that are read (``fan_in_fan_out`` has no effect: PEFT applies
these types to ``nn.Linear`` / ``nn.Embedding`` only and resets it to false)."""
MULTIPLICATIVE_KEYS = {"OFT": (".oft_R.weight", ".oft_embedding_R.weight"), "BOFT": (".boft_R", ".boft_s"),
                       "HRA": (".hra_u",)}
"""Tensor-name suffixes of PEFT's multiplicative types (kinds of the ``multiplicative`` plugin)."""
MULTIPLICATIVE_KINDS = {"OFT": "cayley", "BOFT": "butterfly", "HRA": "householder"}

SHIRA_FIELDS = frozenset({"r", "mask_type", "random_seed", "fan_in_fan_out", "modules_to_save"})
FOURIERFT_FIELDS = frozenset({"n_frequency", "scaling", "random_loc_seed", "fan_in_fan_out", "n_frequency_pattern",
                              "bias", "modules_to_save"})
VBLORA_FIELDS = frozenset({"r", "num_vectors", "vector_length", "topk", "save_only_topk_weights", "vblora_dropout",
                           "fan_in_fan_out", "bias", "modules_to_save", "init_vector_bank_bound", "init_logits_std"})
RANDLORA_FIELDS = frozenset({"r", "projection_prng_key", "save_projection", "sparse", "very_sparse", "randlora_dropout",
                             "fan_in_fan_out", "randlora_alpha", "bias", "modules_to_save"})
C3A_FIELDS = frozenset({"block_size", "block_size_pattern", "bias", "modules_to_save"})
MISS_FIELDS = {"MISS": frozenset({"r", "miss_dropout", "mini_r", "bias", "modules_to_save"}),
               "BONE": frozenset({"r", "bone_dropout", "bias", "modules_to_save"})}
"""Config fields read by the structured additive types (``init_weights`` only sets the initial values, except
MiSS / Bone's ``"bat"`` / ``"mini"``, read by :meth:`_Reader.miss`; ``mask_type``, ``random_seed``,
``sparse``, ``very_sparse`` and the init bounds choose values that are in the file)."""


# ----- PEFT's name rules ---------------------------------------------------------------------------------
def peft_matches(spec: str | list[str] | None, path: str) -> bool:
    """PEFT's target rule: a string is a full-match regex; a list holds names matched exactly or as a dotted suffix."""
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == s or path.endswith("." + s) for s in spec)


def dotted_pattern_value(patterns: Mapping[str, Any] | None, path: str, default: Any) -> Any:
    """FourierFT's ``n_frequency_pattern`` / C3A's ``block_size_pattern`` rule: the first key (a regex) matching
    ``.*\\.<key>$``, else the key equal to the whole path, else ``default``."""
    patterns = patterns or {}
    key = next((k for k in patterns if re.match(rf".*\.{k}$", path)), path)
    return patterns.get(key, default)


# ----- the config: types, then meaning -----------------------------------------------------------------------
_STRINGS: dict[str, Any] = {"type": "array", "items": {"type": "string"}}
_NAMES: dict[str, Any] = {"anyOf": [{"type": "null"}, {"type": "string", "format": "regex"}, _STRINGS]}
_INTS: dict[str, Any] = {"type": "array", "items": {"type": "integer"}}


def _patterns_of(value: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [{"type": "null"}, {"type": "object", "propertyNames": {"format": "regex"},
                                         "additionalProperties": value}]}


CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["peft_type"],
    "properties": {
        "peft_type": {"type": "string"},
        "base_model_name_or_path": {"type": ["string", "null"]},
        "revision": {"type": ["string", "null"]},
        "r": {"type": "integer", "minimum": 0},  # OFT's r=0: the block size gives the block count
        "init_r": {"type": "integer", "minimum": 1},
        "lora_alpha": {"type": "number"},
        "alpha": {"type": "number"},
        "rank_pattern": _patterns_of({"type": "integer", "minimum": 1}),
        "alpha_pattern": _patterns_of({"type": "number"}),
        **dict.fromkeys(("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias", "decompose_both",
                         "save_projection"), {"type": "boolean"}),
        "bias": {"type": "string"},
        "init_lora_weights": {"type": ["boolean", "string"]},
        "target_modules": _NAMES, "exclude_modules": _NAMES, "feedforward_modules": _NAMES,
        "modules_to_save": {"anyOf": [{"type": "null"}, _STRINGS]},
        "layers_to_transform": {"anyOf": [{"type": "null"}, {"type": "integer"}, _INTS]},
        "layers_pattern": {"anyOf": [{"type": "null"}, {"type": "string"}, _STRINGS]},
        "trainable_token_indices": {"anyOf": [{"type": "null"}, _INTS,
                                              {"type": "object", "additionalProperties": _INTS}]},
        "num_virtual_tokens": {"type": "integer", "minimum": 1},
        "num_transformer_submodules": {"type": ["integer", "null"]},
        "decompose_factor": {"type": "integer"},
        **dict.fromkeys(("n_frequency", "topk", "num_vectors", "vector_length", "block_size", "mini_r"),
                        {"type": "integer", "minimum": 1}),
        **dict.fromkeys(("random_loc_seed", "projection_prng_key"), {"type": "integer"}),
        "random_seed": {"type": ["integer", "null"]},
        **dict.fromkeys(("scaling", "randlora_alpha"), {"type": "number"}),
        **dict.fromkeys(("n_frequency_pattern", "block_size_pattern"), _patterns_of({"type": "integer", "minimum": 1})),
    },
}
"""JSON Schema of the PEFT config fields this codec reads: a value of the wrong type is one error naming it."""


def _check_types(cfg: Mapping[str, Any], path: Path) -> None:
    validator = jsonschema.Draft202012Validator(CONFIG_SCHEMA, format_checker=jsonschema.FormatChecker())
    err = jsonschema.exceptions.best_match(validator.iter_errors(cfg))
    if err is None:
        return
    message = err.message
    if err.validator == "anyOf":  # say what is wrong inside the value, or which types would do
        inner = [e for e in err.context if e.relative_path or e.validator != "type"]
        if inner:
            err = jsonschema.exceptions.best_match(inner)
            message = err.message
        else:
            types = [t for option in err.validator_value for t in [option.get("type")] if t]
            message = f"{json.dumps(err.instance)} is not {' or '.join(map(str, types))}"
    where = ".".join(str(p) for p in err.absolute_path) or "the top level"
    raise af.FormatError(f"field {where}: {message}", path=path)


def peft_targets(cfg: Mapping[str, Any], module: str) -> bool:
    """Whether PEFT wraps ``module`` when it loads an adapter with this config (its own rule: exclusions,
    ``modules_to_save``, ``target_modules`` as a full-match regex or names matched exactly or as a dotted
    suffix, then ``layers_to_transform`` / ``layers_pattern`` for a list). A module it does not wrap has its
    tensors ignored by PEFT. ``target_modules`` null (PEFT's per-model default) or ``"all-linear"`` cannot
    be decided from the file and count as targeting every module."""
    if peft_matches(cfg.get("exclude_modules"), module) or any(
            re.match(rf"(^|.*\.){m}($|\..*)", module) for m in cfg.get("modules_to_save") or []):
        return False
    targets = cfg.get("target_modules")
    if targets is None or targets == "all-linear":
        return True
    if isinstance(targets, str) or not peft_matches(targets, module):
        return peft_matches(targets, module)
    layers = cfg.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = cfg.get("layers_pattern")
    if not patterns:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        found = next((m for p in ([patterns] if isinstance(patterns, str) else patterns)
                      if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module))), None)
    if found is None:
        return False
    return int(found["idx"]) in ([layers] if isinstance(layers, int) else layers)


def _base_rewrite(init: bool | str, path: Path) -> str | None:
    """What PEFT's ``init_lora_weights`` does to the base when PEFT loads a LoRA adapter (its layer code):
    None when nothing (True, False, "gaussian", "eva", "orthogonal", "mica": they only set the initial
    factors, which the file's replace); "pissa" / "olora" when it subtracts a product computed from the base
    (reproduced exactly given the base); an error for the rest."""
    if isinstance(init, bool) or init in ("eva", "orthogonal") or init.lower() in ("gaussian", "mica"):
        return None
    if init == "pissa" or init.lower() == "olora":
        return "pissa" if init == "pissa" else "olora"
    convert = "; convert the plain LoRA PEFT writes with save_pretrained(path_initial_model_for_weight_conversion=...)"
    why = ("rewrites the base with a randomised SVD when PEFT loads the adapter, which cannot be reproduced" + convert
           if init.startswith("pissa_niter_") else
           "rewrites the base from a dataset's activation statistics (PEFT cannot reload it without them)" + convert
           if init.startswith("corda") else
           "replaces the base by a bitsandbytes-quantised residual when PEFT loads the adapter, which is not "
           "reproduced here" if init == "loftq" else
           "was trained against a base rewritten from gradients, which PEFT does not redo when it loads the "
           "adapter" + convert if init == "lora_ga" else
           "is not an initialisation PEFT can load")
    raise af.UnsupportedError(f"init_lora_weights={init!r} {why}", path=path)


# ----- reading ---------------------------------------------------------------------------------------------
def _check_fields(cfg: Mapping[str, Any], mapped: frozenset[str], path: Path) -> None:
    bad = sorted(k for k, v in cfg.items() if k not in mapped and k not in IGNORED and v not in NEUTRAL)
    if bad:
        raise af.UnsupportedError("PEFT config fields that change the function cannot be represented: "
                                  + ", ".join(f"{k}={cfg[k]!r}" for k in bad), path=path)


def _load_tensors(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if (path / WEIGHTS_FILE).is_file():
        return af.read_tensor_file(path / WEIGHTS_FILE)[0]
    if (path / PICKLE_FILE).is_file():
        return af.read_pickle_tensors(path / PICKLE_FILE, allow_pickle=allow_pickle)
    raise af.MissingFileError(f"PEFT folder has neither {WEIGHTS_FILE} nor {PICKLE_FILE}", path=path)


def _strip(tensors: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    bad = [k for k in tensors if not k.startswith(PREFIX)]
    if bad:
        raise af.FormatError(f"PEFT tensor names must start with {PREFIX!r}: {', '.join(sorted(bad)[:5])}", path=path)
    return {k[len(PREFIX):]: v for k, v in tensors.items()}


def _ia3_shape(ia3_l: torch.Tensor, side: str) -> list[int]:
    """The function-layout weight shape an ``ia3_l`` tensor determines without the base: its ndim and the
    dimension it scales; the other dimensions are 0, unknown (spec 6.6)."""
    shape = [0] * max(ia3_l.dim(), 2)
    shape[0 if side == "output" else 1] = ia3_l.numel()
    return shape


class _Reader:
    """One PEFT folder being turned into module entries and tensors."""

    def __init__(self, path: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], base: Any,
                 task_id: int | None = None) -> None:
        self.path, self.cfg, self.raw, self.task_id = path, cfg, tensors, task_id
        self.shapes = af.base_shapes(base) if base is not None else None
        self.base = base
        self.modules: dict[str, dict[str, Any]] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self.notes: list[str] = []

    def add(self, module: str, entry: dict[str, Any], roles: Mapping[str, torch.Tensor]) -> None:
        if module in self.modules:
            raise af.UnsupportedError(f"module {module!r} carries two PEFT changes ({self.modules[module]['kind']} "
                                      f"and {entry['kind']}); adapterfmt has one entry per module", path=self.path)
        self.modules[module] = entry
        self.tensors.update({f"{module}.{role}": t for role, t in roles.items()})

    def targeted(self, module: str) -> None:
        """Refuse tensors of a module PEFT would not wrap under this config (it would ignore them)."""
        if not peft_targets(self.cfg, module):
            raise af.UnsupportedError(f"module {module!r} has adapter tensors but the config's target_modules / "
                                      "exclude_modules / layers_to_transform / layers_pattern / modules_to_save do "
                                      "not target it (PEFT ignores its tensors)", path=self.path)

    def base_shape(self, module: str, why: str, parameter: str = "weight") -> list[int]:
        name = f"{module}.{parameter}"
        if self.shapes is None:
            raise af.UnsupportedError(f"{why}: the PEFT file does not give the shape of {name}; pass the base model "
                                      "(base= / --base)", path=self.path)
        if name not in self.shapes:
            raise af.BaseMismatchError(f"the base model has no parameter {name!r}", path=self.path)
        return list(self.shapes[name])

    def input_embedding(self, dim: int) -> str:
        """Path of the base's input embedding module (for prompt tuning / a list of trainable tokens)."""
        if isinstance(self.base, nn.Module) and hasattr(self.base, "get_input_embeddings"):
            emb = self.base.get_input_embeddings()
            return next(n for n, m in self.base.named_modules() if m is emb)
        if self.shapes is None:
            raise af.UnsupportedError("the PEFT file does not name the input embedding; pass the base model "
                                      "(base= / --base)", path=self.path)
        found = [n.removesuffix(".weight") for n, s in self.shapes.items() if n.endswith(".weight") and len(s) == 2
                 and s[1] == dim and n.removesuffix(".weight").rsplit(".", 1)[-1] in EMBEDDING_NAMES
                 and n.removesuffix(".weight").rsplit(".", 1)[-1] not in POSITION_NAMES]
        if len(found) != 1:
            raise af.UnsupportedError(f"cannot tell the input embedding among {found or 'no candidates'}; pass the "
                                      "live base model (base=)", path=self.path)
        return found[0]

    # ----- LoRA / AdaLoRA ------------------------------------------------------------------------------
    def lora(self, adalora: bool) -> dict[str, Any]:
        cfg = self.cfg
        _check_fields(cfg, ADALORA_FIELDS if adalora else LORA_FIELDS, self.path)
        if cfg.get("bias", "none") not in ("none", "all", "lora_only"):
            raise af.UnsupportedError(f"PEFT bias={cfg['bias']!r} cannot be represented", path=self.path)
        init = None if adalora else _base_rewrite(cfg.get("init_lora_weights", True), self.path)
        parts: dict[str, dict[str, torch.Tensor]] = {}
        extra: dict[str, torch.Tensor] = {}
        suffixes = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias", ".lora_embedding_A": "eA",
                    ".lora_embedding_B": "eB", ".lora_magnitude_vector": "magnitude", ".lora_A": "A", ".lora_B": "B",
                    ".lora_E": "E", ".base_layer.bias": "base_bias", ".base_layer.weight": "base_weight",
                    ".lora_diag": "diag"}
        for key, t in self.raw.items():
            suffix = next((s for s in suffixes if key.endswith(s)), None)
            if suffix is None:
                extra[key] = t
            else:
                parts.setdefault(key[: -len(suffix)], {})[suffixes[suffix]] = t
        transposed_linear = bool(cfg.get("fan_in_fan_out"))
        rslora = bool(cfg.get("use_rslora"))
        for module, p in sorted(parts.items()):
            embedding = "eA" in p
            a, b = (p.get("eA"), p.get("eB")) if embedding else (p.get("A"), p.get("B"))
            if a is None or b is None:
                raise af.FormatError(f"module {module!r} lacks lora_A or lora_B", path=self.path)
            if ("E" in p) != adalora:
                raise af.FormatError(f"module {module!r}: lora_E (AdaLoRA's singular values) is "
                                     f"{'missing' if adalora else 'present'} but peft_type is {cfg['peft_type']!r}",
                                     path=self.path)
            self.targeted(module)
            r = a.shape[0]
            if adalora:
                init_r = int(cfg.get("init_r", r))
                alpha = cfg.get("lora_alpha", 0)
                scale = (alpha if alpha > 0 else float(init_r)) / (init_r + 1e-5)
                a = a * p["E"].reshape(r, *([1] * (a.dim() - 1)))
            else:
                want_r = af.peft_pattern(cfg.get("rank_pattern"), module, cfg.get("r", 8))
                if want_r != r:
                    raise af.FormatError(f"module {module!r}: lora_A has rank {r}, the config says {want_r}",
                                         path=self.path)
                scale = af.lora_scale(af.peft_pattern(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8)), r, rslora)
            out, fin = b.shape[0], tuple(a.shape[1:])
            transposed = embedding or (transposed_linear and a.dim() == 2)
            shape = [*fin, out] if transposed else [out, *fin]
            stored = p.get("base_weight")
            if stored is not None and not self.same_as_base(module, f"{PREFIX}{module}.base_layer.weight", stored):
                self.replace_lora(module, p, stored, af.lowrank_entry(shape, scale, transposed=transposed))
                continue
            entry = af.lowrank_entry(shape, scale, transposed=transposed)
            roles = {"lora_A": a, "lora_B": b}
            if init is not None and not embedding and stored is None:
                roles.update(self.rewrite(init, module, a, scale, transposed))
                entry["params"]["base_part"] = {"scale": scale}
            if ("diag" in p) != (cfg.get("kasa_config") is not None):
                raise af.FormatError(f"module {module!r}: lora_diag (KaSA's singular values) is "
                                     f"{'present' if 'diag' in p else 'missing'} but kasa_config is "
                                     f"{cfg.get('kasa_config')!r}", path=self.path)
            if "diag" in p:
                roles.update(self.kasa(module, p["diag"], a, transposed))
                entry["params"]["base_part"] = {"scale": 1.0}
            if "bias" in p:
                roles["bias"] = p["bias"]
            if "magnitude" in p:
                roles["magnitude"] = p["magnitude"].reshape(-1)
            if "base_bias" in p:
                roles["bias_value"] = p["base_bias"]
            self.add(module, entry, roles)
        self.aux(extra)
        method_cfg = {"r": int(cfg.get("init_r" if adalora else "r", 8)), "alpha": cfg.get("lora_alpha", 8),
                      "use_rslora": rslora, "use_dora": bool(cfg.get("use_dora")),
                      "lora_bias": bool(cfg.get("lora_bias"))}
        return method_cfg

    def rewrite(self, init: str, module: str, a: torch.Tensor, scale: float, transposed: bool
                ) -> dict[str, torch.Tensor]:
        """PiSSA / OLoRA: PEFT subtracts ``scale * B0 @ A0`` (computed from the base weight, in float32) from
        the base when it loads the adapter, so the file means ``dW = scale * (B A - B0 A0)``: the explicit base
        part (spec 6.2.1) ``init_A = A0``, ``init_B = B0``, ``c = scale``."""
        key = f"init_lora_weights={self.cfg['init_lora_weights']!r}"
        if a.dim() != 2:
            raise af.UnsupportedError(f"{key} on the convolution {module!r}: PEFT cannot load it either",
                                      path=self.path)
        w = self.base_weight(module, key, "rewrites the base weights when PEFT loads the adapter (W - scale * "
                                          "B0 A0 computed from the base)")
        r = a.shape[0]
        if init == "pissa":  # the top-r singular triplets of the function-layout weight
            a0, b0 = af.pissa_factors(w.t() if transposed else w, r, scale)
        else:  # OLoRA: QR of the weight as PEFT stores it
            a0, b0 = af.olora_factors(w, r)
            if transposed:
                a0, b0 = b0.t(), a0.t()
        dtype = torch.promote_types(a.dtype, torch.float32)
        return {"init_A": a0.to(dtype).contiguous(), "init_B": b0.to(dtype).contiguous()}

    def kasa(self, module: str, diag: torch.Tensor, a: torch.Tensor, transposed: bool) -> dict[str, torch.Tensor]:
        """KaSA (``kasa_config``): PEFT drops the ``r`` smallest singular triplets of the base weight (float32)
        when it creates or loads the adapter, and adds ``scale * B diag(lora_diag) A``: the middle factor
        ``lora_mid`` and the explicit base part ``init_B = U_d S_d``, ``init_A = Vh_d``, ``c = 1``."""
        if a.dim() != 2 or transposed:
            raise af.UnsupportedError(f"kasa_config on {module!r}: PEFT's KaSA takes nn.Linear weights only "
                                      "(no fan_in_fan_out, no convolution)", path=self.path)
        w = self.base_weight(module, "kasa_config", "drops the base weight's smallest singular triplets")
        r = a.shape[0]
        if r >= min(w.shape):
            raise af.FormatError(f"kasa_config on {module!r}: r = {r} must be below min(out, in) = {min(w.shape)}",
                                 path=self.path)
        a0, b0 = af.svd_bottom_factors(w, r)
        dtype = torch.promote_types(a.dtype, torch.float32)
        return {"lora_mid": diag.reshape(-1), "init_A": a0.to(dtype), "init_B": b0.to(dtype)}

    def base_weight(self, module: str, key: str, what: str) -> torch.Tensor:
        if self.base is None:
            raise af.UnsupportedError(f"{key} {what}; pass the base model (base= / --base BASE) to convert it "
                                      "exactly", path=self.path)
        return af.base_tensor(self.base, f"{module}.weight").to(torch.float32)

    def same_as_base(self, module: str, key: str, stored: torch.Tensor) -> bool:
        """A base weight PEFT saved in the file (``save_embedding_layers``), which PEFT loads over the base's:
        True when it equals the base's (it is then dropped), False when it differs (the caller stores a
        replacement); either is noted in the provenance."""
        if self.base is None:
            raise af.UnsupportedError(f"{key}: PEFT saved the base weight of {module!r} (save_embedding_layers); "
                                      "pass the base model (base= / --base BASE) to compare it with the base's",
                                      path=self.path)
        base = af.base_tensor(self.base, f"{module}.weight")
        if tuple(base.shape) != tuple(stored.shape):
            raise af.BaseMismatchError(f"{key} has shape {list(stored.shape)}, the base's {module}.weight "
                                       f"{list(base.shape)} (a resized embedding: resize the base first)",
                                       path=self.path)
        if torch.equal(stored.to(base.dtype), base):
            self.notes.append(f"{key} equals the base weight: dropped")
            return True
        self.notes.append(f"{key} differs from the base weight: stored as a dense replacement of {module}.weight")
        return False

    def replace_lora(self, module: str, p: Mapping[str, torch.Tensor], stored: torch.Tensor,
                     entry: dict[str, Any]) -> None:
        """A LoRA module whose base weight PEFT replaces by ``stored``: one dense ``replace`` entry with
        ``stored + dW`` (PEFT computes ``f(x; stored) + scale * B A x``)."""
        if {"magnitude", "bias", "E"} & set(p):
            raise af.UnsupportedError(f"{PREFIX}{module}.base_layer.weight replaces the base weight of a module "
                                      "with DoRA or a LoRA bias; this cannot be represented", path=self.path)
        a, b = p.get("eA", p.get("A")), p.get("eB", p.get("B"))
        dw = af.registry.get_kind("lowrank").delta(entry, {"lora_A": a, "lora_B": b})
        dtype = torch.promote_types(stored.dtype, torch.float32)
        roles = {"value": stored.to(dtype) + dw.to(dtype)}
        if "base_bias" in p:
            roles["bias_value"] = p["base_bias"]
        self.add(module, {"kind": "dense", "shape": list(stored.shape), "params": {"mode": "replace"}}, roles)

    def aux(self, extra: dict[str, torch.Tensor]) -> None:
        """modules_to_save, bias="all" biases and trainable tokens: every other tensor, or an error naming it."""
        cfg = self.cfg
        to_save = cfg.get("modules_to_save") or []
        dense: dict[str, dict[str, torch.Tensor]] = {}
        unknown = []
        for key, t in sorted(extra.items()):
            if key.endswith(".token_adapter.trainable_tokens_delta"):
                self.tokens(key.removesuffix(".token_adapter.trainable_tokens_delta"), t)
                continue
            module, _, pname = key.rpartition(".")
            if peft_matches(to_save, module) and pname in ("weight", "bias"):
                dense.setdefault(module, {})[pname] = t
            elif cfg.get("bias") == "all" and pname == "bias":
                self.add(module, {"kind": "dense", "shape": list(t.shape), "parameter": "bias",
                                  "params": {"mode": "replace"}}, {"value": t})
            elif pname == "weight":  # an embedding PEFT saved whole (save_embedding_layers, not targeted)
                if not self.same_as_base(module, PREFIX + key, t):
                    self.add(module, {"kind": "dense", "shape": list(t.shape), "params": {"mode": "replace"}},
                             {"value": t})
            else:
                unknown.append(key)
        if unknown:
            raise af.UnsupportedError(f"PEFT tensors this converter cannot place: {', '.join(unknown)}", path=self.path)
        for module, ts in dense.items():
            if "weight" not in ts:
                raise af.UnsupportedError(f"modules_to_save module {module!r} has no weight", path=self.path)
            roles = {"value": ts["weight"], **({"bias_value": ts["bias"]} if "bias" in ts else {})}
            self.add(module, {"kind": "dense", "shape": list(ts["weight"].shape), "params": {"mode": "replace"}}, roles)

    def tokens(self, module: str, values: torch.Tensor) -> None:
        spec = self.cfg.get("trainable_token_indices")
        indices = spec if isinstance(spec, list) else next(
            (v for k, v in (spec or {}).items() if peft_matches([k], module)), None)
        if indices is None or len(indices) != values.shape[0]:
            raise af.FormatError(f"trainable tokens of {module!r} do not match trainable_token_indices", path=self.path)
        idx = torch.tensor(indices, dtype=torch.int64)
        order = torch.argsort(idx)
        if bool((idx[order][1:] == idx[order][:-1]).any()):
            raise af.UnsupportedError(f"trainable_token_indices of {module!r} repeat a token", path=self.path)
        shape = self.base_shape(module, "trainable tokens")
        entry = {"kind": "rows", "shape": shape, "params": {"peft_order": indices} if order.tolist() != list(
            range(len(indices))) else {}}
        self.add(module, entry, {"indices": idx[order], "values": values[order]})

    # ----- IA3 -----------------------------------------------------------------------------------------------
    def ia3(self) -> dict[str, Any]:
        _check_fields(self.cfg, IA3_FIELDS, self.path)
        ff = self.cfg.get("feedforward_modules")
        extra = {}
        for key, t in sorted(self.raw.items()):
            if not key.endswith(".ia3_l"):
                extra[key] = t
                continue
            module = key.removesuffix(".ia3_l")
            self.targeted(module)
            side = "input" if peft_matches(ff, module) else "output"
            params: dict[str, Any] = {"op": "scale", "side": side}
            shape = self.base_shape(module, "IA3") if self.shapes is not None else _ia3_shape(t, side)
            if self.cfg.get("fan_in_fan_out") and len(shape) == 2:
                params["transposed"] = True
                if self.shapes is None:
                    shape = shape[::-1]
            self.add(module, {"kind": "vector", "shape": shape, "params": params}, {"vector": t.reshape(-1)})
        self.aux(extra)
        return {}

    # ----- LoHa / LoKr / VeRA ---------------------------------------------------------------------------------
    def by_module(self, roles: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
        """Tensors named ``<module>.<role>`` grouped by module; every other tensor goes to :meth:`aux`."""
        parts: dict[str, dict[str, torch.Tensor]] = {}
        extra = {}
        for key, t in self.raw.items():
            module, _, role = key.rpartition(".")
            if role in roles:
                parts.setdefault(module, {})[role] = t
            else:
                extra[key] = t
        for module in parts:  # the base weight PEFT saves beside a targeted embedding or head (save_embedding_layers)
            key = f"{module}.base_layer.weight"
            if key in extra and not self.same_as_base(module, PREFIX + key, extra.pop(key)):
                raise af.UnsupportedError(f"{PREFIX}{key} replaces the base weight of a module the adapter also "
                                          "changes; this cannot be represented", path=self.path)
        self.aux(extra)
        return parts

    def lycoris(self, ptype: str) -> dict[str, Any]:
        cfg = self.cfg
        _check_fields(cfg, LYCORIS_FIELDS, self.path)
        kind, roles = LYCORIS_ROLES[ptype]
        for module, t in sorted(self.by_module(roles).items()):
            self.targeted(module)
            r = af.peft_pattern(cfg.get("rank_pattern"), module, cfg.get("r", 8))
            scale = af.peft_pattern(cfg.get("alpha_pattern"), module, cfg.get("alpha", 8)) / r
            # 2-D factors carry a Linear weight's shape; with the base, its own shape (a conv's included)
            shape = self.base_shape(module, ptype) if self.shapes is not None or any(v.dim() != 2 for v in t.values()) \
                else af.factor_shape(kind, t)
            self.add(module, {"kind": kind, "shape": shape, "params": {"scale": scale}}, t)
        return {"r": cfg.get("r", 8), "alpha": cfg.get("alpha", 8)}

    def vera(self) -> dict[str, Any]:
        cfg = self.cfg
        _check_fields(cfg, VERA_FIELDS, self.path)
        if cfg.get("bias", "none") != "none" or cfg.get("save_projection") is False:
            raise af.UnsupportedError("VeRA with bias != 'none' or save_projection=false cannot be represented "
                                      "(the projections must be in the file)", path=self.path)
        shared = {"vera_A": self.raw.pop("base_model.vera_A", None), "vera_B": self.raw.pop("base_model.vera_B", None)}
        if any(v is None for v in shared.values()):
            raise af.FormatError("VeRA file lacks base_model.vera_A / base_model.vera_B", path=self.path)
        self.raw = _strip(self.raw, self.path)
        for module, t in sorted(self.by_module(("vera_lambda_b", "vera_lambda_d")).items()):
            self.targeted(module)
            renamed = {role.removeprefix("vera_"): v for role, v in t.items()}
            self.add(module, {"kind": "vera", "shape": self.base_shape(module, "VeRA"),
                              "params": {"shared": {"vera_A": "vera_A", "vera_B": "vera_B"}}}, renamed)
        self.tensors.update(shared)
        return {"r": cfg.get("r", 256)}

    # ----- OFT / BOFT / HRA ------------------------------------------------------------------------------------
    def multiplicative(self, ptype: str) -> dict[str, Any]:
        """OFT -> ``cayley`` (``oft_R`` on a Linear's input, ``oft_embedding_R`` on an embedding's output; COFT's
        projection applied as PEFT applies it at every forward; ``use_cayley_neumann`` -> ``params.series``),
        BOFT -> ``butterfly`` (``boft_s`` -> ``output_scale``), HRA -> ``householder`` (``apply_GS`` ->
        ``params.orthogonalize``). On a Conv2d each rotates the flattened ``in * kh * kw`` weight axis, PEFT's
        merged form (a note says where PEFT's unmerged OFT forward differs: kernels larger than 1x1)."""
        cfg = self.cfg
        _check_fields(cfg, MULTIPLICATIVE_FIELDS[ptype], self.path)
        if cfg.get("bias", "none") != "none":
            raise af.UnsupportedError(f"{ptype} with bias={cfg['bias']!r} (trained base biases on rotated modules) "
                                      "cannot be represented", path=self.path)
        parts: dict[str, dict[str, torch.Tensor]] = {}
        extra: dict[str, torch.Tensor] = {}
        for key, t in self.raw.items():
            suffix = next((s for s in MULTIPLICATIVE_KEYS[ptype] if key.endswith(s)), None)
            if suffix is None:
                extra[key] = t
            else:
                parts.setdefault(key[: -len(suffix)], {})[suffix] = t
        for module in parts:  # the base weight PEFT saves beside an adapted embedding (save_embedding_layers)
            key = f"{module}.base_layer.weight"
            if key in extra and not self.same_as_base(module, PREFIX + key, extra.pop(key)):
                raise af.UnsupportedError(f"{PREFIX}{key} replaces the base weight of a module {ptype} also "
                                          "multiplies; this cannot be represented", path=self.path)
        self.aux(extra)
        build = {"OFT": self._oft, "BOFT": self._boft, "HRA": self._hra}[ptype]
        sizes = []
        for module, p in sorted(parts.items()):
            self.targeted(module)
            entry, roles = build(module, p)
            if ptype == "OFT" and len(entry["shape"]) == 4 and entry["shape"][2:] != [1, 1]:
                self.notes.append(f"{module}: OFT on a {entry['shape'][2]}x{entry['shape'][3]} convolution is "
                                  "PEFT's merged function (the flattened weight rotated); PEFT's unmerged forward "
                                  "(patches unfolded, rotated and folded back, overlaps summed) differs from it")
            af.registry.get_kind(entry["kind"]).check(module, entry, {r: tuple(v.shape) for r, v in roles.items()})
            sizes.append(af.registry.get_kind(entry["kind"]).rank(entry, {r: tuple(v.shape) for r, v in roles.items()}))
            self.add(module, entry, roles)
        size = _most_common(sizes, None)
        if ptype == "OFT":
            terms = int(cfg.get("num_cayley_neumann_terms", 5)) if cfg.get("use_cayley_neumann", True) else None
            return {"block_size": size or 2, "block_share": bool(cfg.get("block_share")), "neumann_terms": terms}
        if ptype == "BOFT":
            return {"block_size": size or 2,
                    "butterfly_factor": _most_common([p[".boft_R"].shape[0] for p in parts.values()], 1)}
        return {"r": size or 1, "orthogonalize": bool(cfg.get("apply_GS"))}

    def _oft(self, module: str, p: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        cfg = self.cfg
        embedding = ".oft_embedding_R.weight" in p
        vec = p.get(".oft_embedding_R.weight", p.get(".oft_R.weight"))
        assert vec is not None
        params: dict[str, Any] = {"side": "output", "transposed": True} if embedding else {"side": "input"}
        if cfg.get("use_cayley_neumann", True):
            params["series"] = af.registry.get_kind("cayley").neumann_series(int(cfg.get("num_cayley_neumann_terms", 5)))
        if cfg.get("coft"):  # PEFT projects each skew block into a Frobenius ball of eps / sqrt(k), in place
            b = _triangle(vec, module, self.path)
            rows, cols = torch.triu_indices(b, b, 1)
            q = vec.new_zeros(vec.shape[0], b, b)
            q[:, rows, cols] = vec
            q = q - q.transpose(1, 2)
            eps = float(cfg.get("eps", 6e-5)) / torch.sqrt(torch.tensor(float(vec.shape[0])))
            norm = torch.norm(q, dim=(1, 2), keepdim=True)
            q = torch.where(norm <= eps, q, eps * (q / norm))
            vec = q[:, rows, cols]
        return {"kind": "cayley", "shape": self.base_shape(module, "OFT"), "params": params}, {"skew": vec}

    def _boft(self, module: str, p: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        blocks, scale = p.get(".boft_R"), p.get(".boft_s")
        if blocks is None or scale is None or blocks.dim() != 4:
            raise af.FormatError(f"module {module!r} needs boft_R [N, D, H, H] and boft_s", path=self.path)
        shape = [scale.shape[0], blocks.shape[1] * blocks.shape[2]]  # a Linear's; the base's where it differs
        if self.shapes is not None and f"{module}.weight" in self.shapes:
            shape = self.base_shape(module, "BOFT")
        return ({"kind": "butterfly", "shape": shape, "params": {"side": "input"}},
                {"blocks": blocks, "output_scale": scale.reshape(-1)})

    def _hra(self, module: str, p: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        u = p[".hra_u"]
        if u.dim() != 2 or u.shape[1] != self.cfg.get("r", 8):
            raise af.FormatError(f"module {module!r}: hra_u {list(u.shape)} does not have r={self.cfg.get('r', 8)} "
                                 "columns", path=self.path)
        params = {"side": "input", "orthogonalize": bool(self.cfg.get("apply_GS"))}
        return {"kind": "householder", "shape": self.base_shape(module, "HRA"), "params": params}, {"vectors": u}

    # ----- SHiRA / LN tuning / FourierFT / VB-LoRA / RandLoRA / C3A / MiSS (Bone) --------------------------------
    def no_bias(self) -> None:
        if self.cfg.get("bias", "none") != "none":
            raise af.UnsupportedError(f"{self.cfg['peft_type']} with bias={self.cfg['bias']!r} (trained base biases) "
                                      "cannot be represented", path=self.path)

    def roles_of(self, module: str, t: Mapping[str, torch.Tensor], roles: tuple[str, ...]) -> list[torch.Tensor]:
        missing = [r for r in roles if r not in t]
        if missing:
            raise af.FormatError(f"module {module!r} lacks {', '.join(missing)}", path=self.path)
        return [t[r] for r in roles]

    def checked_shape(self, module: str, shape: list[int], what: str) -> list[int]:
        """A shape the tensors give, checked against the base's when the base is known."""
        if self.shapes is not None and self.base_shape(module, what) != shape:
            raise af.BaseMismatchError(f"{what} tensors of {module!r} fit a weight of shape {shape}, the base's is "
                                       f"{self.base_shape(module, what)}", path=self.path)
        return shape

    def shira(self) -> dict[str, Any]:
        """SHiRA -> ``sparse``: (row, column) pairs of an ``nn.Linear`` weight (the only type PEFT adapts)
        sorted into flat row-major indices; PEFT's scaling is 1 (it is not saved)."""
        cfg = self.cfg
        _check_fields(cfg, SHIRA_FIELDS, self.path)
        r = int(cfg.get("r", 32))
        for module, t in sorted(self.by_module(("shira_weight", "shira_indices")).items()):
            self.targeted(module)
            values, pairs = self.roles_of(module, t, ("shira_weight", "shira_indices"))
            out, n_in = shape = self.base_shape(module, "SHiRA")
            if pairs.dim() != 2 or pairs.shape[0] != 2 or tuple(values.shape) != (pairs.shape[1],):
                raise af.FormatError(f"module {module!r}: shira_indices {list(pairs.shape)} and shira_weight "
                                     f"{list(values.shape)} must be [2, k] and [k]", path=self.path)
            if values.numel() != r * (out + n_in):
                raise af.FormatError(f"module {module!r}: {values.numel()} SHiRA values, r={r} gives "
                                     f"{r * (out + n_in)}", path=self.path)
            rows, cols = pairs.to(torch.int64)
            if bool(((rows < 0) | (rows >= out) | (cols < 0) | (cols >= n_in)).any()):
                raise af.FormatError(f"module {module!r}: shira_indices outside [{out}, {n_in}]", path=self.path)
            flat, order = (rows * n_in + cols).sort()
            if bool((flat[1:] == flat[:-1]).any()):
                raise af.UnsupportedError(f"module {module!r}: shira_indices repeat a position", path=self.path)
            self.add(module, {"kind": "sparse", "shape": shape, "params": {"scale": 1.0}},
                     {"indices": flat, "values": values[order]})
        return {"r": r, **({"random_seed": cfg["random_seed"]} if cfg.get("random_seed") is not None else {})}

    def ln_tuning(self) -> dict[str, Any]:
        """LN tuning -> ``dense`` replace: PEFT saves the trained copy of each targeted layer whole."""
        _check_fields(self.cfg, frozenset({"modules_to_save"}), self.path)
        parts: dict[str, dict[str, torch.Tensor]] = {}
        extra = {}
        for key, t in self.raw.items():
            module, sep, pname = key.partition(".ln_tuning_layers.")
            if sep:
                parts.setdefault(module, {})[pname] = t
            else:
                extra[key] = t
        self.aux(extra)
        for module, ps in sorted(parts.items()):
            self.targeted(module)
            if "weight" not in ps or set(ps) - {"weight", "bias"}:
                raise af.UnsupportedError(f"LN tuning of {module!r} stores {sorted(ps)}: only a layer's weight and bias "
                                          "can be represented", path=self.path)
            roles = {"value": ps["weight"], **({"bias_value": ps["bias"]} if "bias" in ps else {})}
            shape = self.checked_shape(module, list(ps["weight"].shape), "LN tuning")
            self.add(module, {"kind": "dense", "shape": shape, "params": {"mode": "replace"}}, roles)
        return {}

    def fourierft(self) -> dict[str, Any]:
        """FourierFT -> ``fourier``: the frequencies PEFT draws from ``random_loc_seed`` are stored with the
        spectrum; ``scale`` = ``scaling``; ``fan_in_fan_out`` (GPT-2 ``Conv1D``) -> ``transposed``."""
        cfg = self.cfg
        _check_fields(cfg, FOURIERFT_FIELDS, self.path)
        self.no_bias()
        seed, n0, scaling = int(cfg.get("random_loc_seed", 777)), int(cfg.get("n_frequency", 1000)), \
            float(cfg.get("scaling", 150.0))
        method = af.registry.get_method("fourierft")
        for module, t in sorted(self.by_module(("fourierft_spectrum",)).items()):
            self.targeted(module)
            spectrum = t["fourierft_spectrum"]
            n = int(dotted_pattern_value(cfg.get("n_frequency_pattern"), module, n0))
            if tuple(spectrum.shape) != (n,):
                raise af.FormatError(f"module {module!r}: fourierft_spectrum {list(spectrum.shape)}, the config says "
                                     f"n_frequency {n}", path=self.path)
            shape = self.base_shape(module, "FourierFT")
            transposed = bool(cfg.get("fan_in_fan_out")) and len(shape) == 2
            out, n_in = shape[::-1] if transposed else shape
            params = {"scale": scaling, **({"transposed": True} if transposed else {})}
            self.add(module, {"kind": "fourier", "shape": shape, "params": params},
                     {"spectrum": spectrum, "indices": method.frequencies(out, n_in, n, seed)})
        return {"n_frequency": n0, "scaling": scaling, "random_loc_seed": seed}

    def vblora(self) -> dict[str, Any]:
        """VB-LoRA -> ``vector_bank`` with the bank stored once; shapes from the logits. A
        ``save_only_topk_weights`` file (``_topk_indices`` and the first k-1 ``_topk_weights``) keeps that form:
        ``topk_indices_*`` (int64) and ``topk_weights_*`` with the k-th weight, ``1 - sum``, appended as PEFT
        does when it loads the file."""
        cfg = self.cfg
        _check_fields(cfg, VBLORA_FIELDS, self.path)
        self.no_bias()
        bank = self.raw.pop("base_model.vblora_vector_bank", None)
        if bank is None:
            raise af.FormatError("VB-LoRA file lacks base_model.vblora_vector_bank", path=self.path)
        self.raw = _strip(self.raw, self.path)
        r, topk, length = int(cfg.get("r", 4)), int(cfg.get("topk", 2)), bank.shape[-1]
        top = bool(cfg.get("save_only_topk_weights"))
        names = tuple(f"vblora_logits_{s}{p}" for s in "AB" for p in (("_topk_indices", "_topk_weights") if top else ("",)))
        for module, t in sorted(self.by_module(names).items()):
            self.targeted(module)
            found = self.roles_of(module, t, names)
            la, lb = found[0], found[len(found) // 2]
            if la.dim() != 3 or lb.dim() != 3 or la.shape[0] != r:
                raise af.FormatError(f"module {module!r}: {names[0]} {list(la.shape)} / {names[len(names) // 2]} "
                                     f"{list(lb.shape)} are not [r={r}, in/L, .] / [out/L, r, .]", path=self.path)
            shape = [lb.shape[0] * length, la.shape[1] * length]
            params: dict[str, Any] = {"topk": topk, "shared": {"vector_bank": "vector_bank"}}
            if cfg.get("fan_in_fan_out"):
                shape, params["transposed"] = shape[::-1], True
            if top:
                idx_a, w_a, idx_b, w_b = found
                roles = {"topk_indices_A": idx_a.to(torch.int64), "topk_indices_B": idx_b.to(torch.int64),
                         **{f"topk_weights_{s}": torch.cat([w, 1 - w.sum(-1, keepdim=True)], -1)
                            for s, w in (("A", w_a), ("B", w_b))}}
            else:
                roles = {"logits_A": la, "logits_B": lb}
            self.add(module, {"kind": "vector_bank", "shape": self.checked_shape(module, shape, "VB-LoRA"),
                              "params": params}, roles)
        self.tensors["vector_bank"] = bank
        return {"r": r, "num_vectors": bank.shape[0], "vector_length": length, "topk": topk}

    def randlora(self) -> dict[str, Any]:
        """RandLoRA -> ``randlora`` with the bases stored once (PEFT also saves a copy under every module,
        which must equal them); ``scale`` = ``randlora_alpha / r``. Files saved with ``save_projection=false``
        hold no bases: they are drawn again as PEFT draws them (from ``projection_prng_key``, at the size of
        the largest targeted layer, so the base's shapes are needed) and stored."""
        cfg = self.cfg
        _check_fields(cfg, RANDLORA_FIELDS, self.path)
        self.no_bias()
        saved = cfg.get("save_projection", True) is not False
        shared = {"basis_A": self.raw.pop("base_model.randlora_A", None),
                  "basis_B": self.raw.pop("base_model.randlora_B", None)}
        if saved and any(v is None for v in shared.values()):
            raise af.FormatError("RandLoRA file lacks base_model.randlora_A / base_model.randlora_B", path=self.path)
        self.raw = _strip(self.raw, self.path)
        r, alpha = int(cfg.get("r", 32)), cfg.get("randlora_alpha", 640)
        seed = int(cfg.get("projection_prng_key", 0))
        roles = ("randlora_lambda", "randlora_gamma") + (("randlora_A", "randlora_B") if saved else ())
        why = "RandLoRA" if saved else ("RandLoRA with save_projection=false (its bases are drawn again from "
                                        "projection_prng_key at the size of the largest targeted layer)")
        fshapes = []
        for module, t in sorted(self.by_module(roles).items()):
            self.targeted(module)
            for role, name in (("randlora_A", "basis_A"), ("randlora_B", "basis_B")):
                if role in t and not torch.equal(t[role], shared[name]):
                    raise af.UnsupportedError(f"{PREFIX}{module}.{role} differs from base_model.{role} (PEFT shares "
                                              "one pair of bases)", path=self.path)
            lam, gam = self.roles_of(module, t, roles[:2])
            if lam.dim() != 2 or lam.shape[0] != r:
                raise af.FormatError(f"module {module!r}: randlora_lambda {list(lam.shape)} is not [r={r}, nb]",
                                     path=self.path)
            shape = self.base_shape(module, why)
            params: dict[str, Any] = {"scale": alpha / r, "shared": {"basis_A": "basis_A", "basis_B": "basis_B"}}
            if cfg.get("fan_in_fan_out") and len(shape) == 2:
                params["transposed"] = True
            fshapes.append(shape[::-1] if params.get("transposed") else shape)
            self.add(module, {"kind": "randlora", "shape": shape, "params": params}, {"lambda": lam, "gamma": gam})
        if not saved and fshapes:
            a, b = af.registry.get_method("randlora").bases(
                r, max(s[0] for s in fshapes), max(s[1] for s in fshapes), seed,
                sparse=bool(cfg.get("sparse")), very_sparse=bool(cfg.get("very_sparse")))
            shared = {"basis_A": a, "basis_B": b}
            self.notes.append(f"save_projection=false: the bases were drawn again from projection_prng_key={seed} "
                              "and stored")
        self.tensors.update(shared)
        return {"r": r, "randlora_alpha": alpha, "projection_prng_key": seed}

    def c3a(self) -> dict[str, Any]:
        """C3A -> ``circulant``, ``scale = 1 / in_features`` (PEFT's normalisation); shapes from the kernels."""
        cfg = self.cfg
        _check_fields(cfg, C3A_FIELDS, self.path)
        self.no_bias()
        b0 = int(cfg.get("block_size", 256))
        for module, t in sorted(self.by_module(("c3a_kernel",)).items()):
            self.targeted(module)
            k = t["c3a_kernel"]
            b = int(dotted_pattern_value(cfg.get("block_size_pattern"), module, b0))
            if k.dim() != 3 or k.shape[2] != b:
                raise af.FormatError(f"module {module!r}: c3a_kernel {list(k.shape)} is not [out/b, in/b, b={b}]",
                                     path=self.path)
            shape = self.checked_shape(module, [k.shape[0] * b, k.shape[1] * b], "C3A")
            self.add(module, {"kind": "circulant", "shape": shape, "params": {"scale": 1 / shape[1]}}, {"kernel": k})
        return {"block_size": b0}

    def miss(self, ptype: str) -> dict[str, Any]:
        """MiSS (and Bone, its former name, read the same way) -> ``block_share``: ``init_weights`` "bat" ->
        mode ``bat``, else mode ``tile`` (block ``[r, out]``, or ``[r, mini_r]`` for "mini")."""
        cfg = self.cfg
        _check_fields(cfg, MISS_FIELDS[ptype], self.path)
        self.no_bias()
        init = cfg.get("init_weights", True)
        variant = "bat" if init == "bat" else "mini" if init == "mini" and ptype == "MISS" else "miss"
        r, mini_r = int(cfg.get("r", 64)), int(cfg.get("mini_r", 1))
        role = "bone_block" if ptype == "BONE" else "miss_block"
        for module, t in sorted(self.by_module((role,)).items()):
            self.targeted(module)
            block = t[role]
            out, _ = shape = self.base_shape(module, ptype)
            want = {"miss": (r, out), "mini": (r, mini_r), "bat": (out // r, r, r)}[variant]
            if tuple(block.shape) != want:
                raise af.FormatError(f"module {module!r}: {role} {list(block.shape)} is not {list(want)} "
                                     f"(init_weights={init!r})", path=self.path)
            mode = "bat" if variant == "bat" else "tile"
            self.add(module, {"kind": "block_share", "shape": shape, "params": {"mode": mode}}, {"block": block})
        return {"r": r, "variant": variant, **({"mini_r": mini_r} if variant == "mini" else {})}

    # ----- prompt tuning -------------------------------------------------------------------------------------
    def prompt(self, fields: frozenset[str] = PROMPT_FIELDS) -> dict[str, Any]:
        """Prompt tuning, and p-tuning: PEFT saves the prompt encoder's output (the virtual tokens' embeddings,
        all that acts at inference) as ``prompt_embeddings``; the encoder only reparameterises training and is
        not in the file, so p-tuning is stored as a ``prompt`` (written back as PEFT prompt tuning)."""
        emb, module, shape = self.prompt_embeddings(fields, ("prompt_embeddings",), "prompt tuning")
        self.add(module, {"kind": "prompt", "shape": shape, "params": {"position": "prefix"}}, {"embeddings": emb})
        return {}

    def prompt_embeddings(self, fields: frozenset[str], names: tuple[str, ...],
                          what: str) -> tuple[torch.Tensor, str, list[int]]:
        """The checks every prompt type shares; ``(prompt_embeddings, input embedding path, its shape)``."""
        _check_fields(self.cfg, fields, self.path)
        if self.cfg.get("num_transformer_submodules", 1) != 1:
            raise af.UnsupportedError(f"{what} with num_transformer_submodules != 1 (encoder-decoder) "
                                      "cannot be represented", path=self.path)
        if set(self.raw) != set(names):
            raise af.UnsupportedError(f"unexpected {what} tensors: {sorted(self.raw)} (expected "
                                      f"{', '.join(names)})", path=self.path)
        emb = self.raw["prompt_embeddings"]
        module = self.input_embedding(emb.shape[1])
        return emb, module, self.base_shape(module, what)

    def multitask(self) -> dict[str, Any]:
        """Multitask prompt tuning: ``prompt_embeddings [n, dim]``, ``prefix_task_cols [tasks, n, r]``,
        ``prefix_task_rows [tasks, r, dim]`` as kind ``multitask_prompt`` with every task; ``task_id``, when
        given, becomes ``params.task`` (the task an attach applies; PEFT takes ``task_ids`` at each call).
        ``prompt_tuning_init_state_dict_path`` / ``_task`` only chose the initial values."""
        emb, module, shape = self.prompt_embeddings(MULTITASK_FIELDS, MULTITASK_TENSORS, "multitask prompt tuning")
        cols, rows = self.raw["prefix_task_cols"], self.raw["prefix_task_rows"]
        tasks, n, r = cols.shape if cols.dim() == 3 else (None, None, None)
        if (tasks, n, r) != (self.cfg.get("num_tasks", tasks), emb.shape[0], self.cfg.get("num_ranks", r)) \
                or list(rows.shape) != [tasks, r, emb.shape[1]]:
            raise af.FormatError(f"prefix_task_cols {list(cols.shape)} / prefix_task_rows {list(rows.shape)} do not "
                                 f"fit prompt_embeddings {list(emb.shape)}, num_tasks={self.cfg.get('num_tasks')}, "
                                 f"num_ranks={self.cfg.get('num_ranks')}", path=self.path)
        if self.task_id is not None and self.task_id >= tasks:
            raise af.UnsupportedError(f"multitask prompt tuning has {tasks} tasks; task {self.task_id} given "
                                      f"(task_id= / --task-id: 0..{tasks - 1})", path=self.path)
        task = {} if self.task_id is None else {"task": self.task_id}
        self.add(module, {"kind": "multitask_prompt", "shape": shape, "params": {"position": "prefix", **task}},
                 {"embeddings": emb, "task_cols": cols, "task_rows": rows})
        return {"num_virtual_tokens": n, "num_tasks": tasks, "num_ranks": r}

    def decoder_stack(self) -> str:
        """The base's decoder stack: a live model's ``base_model_prefix``, or in a checkpoint the one module
        holding ``layers.0.`` / ``h.0.``."""
        if isinstance(self.base, nn.Module) and getattr(self.base, "base_model_prefix", None):
            return self.base.base_model_prefix
        found = sorted({m[1] for k in self.shapes or {} if (m := re.match(r"^(.+?)\.(?:layers|h)\.0\.", k))})
        if len(found) != 1:
            raise af.UnsupportedError("prefix tuning: the PEFT file does not name the decoder stack the prefix "
                                      f"enters and the base does not tell it (found {found or 'none'}); pass the "
                                      "base (base= / --base)", path=self.path)
        return found[0]

    def prefix(self) -> dict[str, Any]:
        """Prefix tuning: ``prompt_embeddings [n, layers * 2 * kv_heads * head_dim]``, viewed as PEFT's
        ``get_prompt`` does (``[n, layers * 2, heads, head_dim]``, even slots keys, odd values), as kind
        ``prefix`` on the base's decoder stack (``base_model_prefix``)."""
        _check_fields(self.cfg, PREFIX_FIELDS, self.path)
        if self.cfg.get("num_transformer_submodules", 1) != 1:
            raise af.UnsupportedError("prefix tuning with num_transformer_submodules != 1 (encoder-decoder) "
                                      "cannot be represented", path=self.path)
        if set(self.raw) != {"prompt_embeddings"}:
            raise af.UnsupportedError(f"unexpected prefix-tuning tensors: {sorted(self.raw)}", path=self.path)
        n, layers, heads = (self.cfg.get(k) for k in ("num_virtual_tokens", "num_layers", "num_attention_heads"))
        dim, emb = self.cfg.get("token_dim"), self.raw["prompt_embeddings"]
        if not all(isinstance(v, int) and v > 0 for v in (n, layers, heads, dim)) or dim % heads \
                or list(emb.shape) != [n, layers * 2 * dim]:
            raise af.FormatError(f"prompt_embeddings {list(emb.shape)} does not fit num_virtual_tokens={n}, "
                                 f"num_layers={layers}, token_dim={dim}, num_attention_heads={heads}", path=self.path)
        kv = emb.view(n, layers, 2, heads, dim // heads).permute(2, 1, 0, 3, 4)
        module = self.decoder_stack()
        self.add(module, {"kind": "prefix", "shape": [layers, heads, dim // heads], "params": {}},
                 {"keys": kv[0].contiguous(), "values": kv[1].contiguous()})
        return {"num_virtual_tokens": n}


READERS = {"LORA": ("lora", lambda r: r.lora(False)), "ADALORA": ("lora", lambda r: r.lora(True)),
           "IA3": ("ia3", _Reader.ia3), "PROMPT_TUNING": ("prompt_tuning", _Reader.prompt),
           "P_TUNING": ("prompt_tuning", lambda r: r.prompt(P_TUNING_FIELDS)),
           "LOHA": ("loha", lambda r: r.lycoris("LOHA")), "LOKR": ("lokr", lambda r: r.lycoris("LOKR")),
           "VERA": ("vera", _Reader.vera), "OFT": ("oft", lambda r: r.multiplicative("OFT")),
           "BOFT": ("boft", lambda r: r.multiplicative("BOFT")), "HRA": ("hra", lambda r: r.multiplicative("HRA"))}

READERS.update({"SHIRA": ("shira", _Reader.shira), "LN_TUNING": ("ln_tuning", _Reader.ln_tuning),
                "FOURIERFT": ("fourierft", _Reader.fourierft), "VBLORA": ("vblora", _Reader.vblora),
                "RANDLORA": ("randlora", _Reader.randlora), "C3A": ("c3a", _Reader.c3a),
                "MISS": ("miss", lambda r: r.miss("MISS")), "BONE": ("miss", lambda r: r.miss("BONE")),
                "PREFIX_TUNING": ("prefix_tuning", _Reader.prefix),
                "MULTITASK_PROMPT_TUNING": ("multitask_prompt_tuning", _Reader.multitask)})


POLY_FIELDS = frozenset({"r", "n_tasks", "n_skills", "n_splits", "poly_type", "modules_to_save"})
POLY_ROLES = {".poly_lora_A": "A", ".poly_lora_B": "B", ".poly_router.module_logits": "logits"}


def _read_poly(r: _Reader) -> dict[str, Any]:
    """Poly / MHR: per module, skills' factors ``A [splits, skills, in/splits, rank]``, ``B [splits, skills, rank,
    out/splits]`` and the router's ``module_logits [tasks, splits*skills]``. For task t (PEFT in eval mode) the
    module adds ``x A_t B_t / rank``, ``A_t`` the concatenation over splits of ``sum_s w[q,s] A[q,s]``, ``B_t``
    likewise along the output, ``w = sigmoid(logits[t])`` normalised over skills (+1e-12): one LoRA per task, as
    PEFT computes it. The file mixes factors, not outputs, so no fixed-gate mixture holds it whole: one task
    is read (``task_id``), as a ``lowrank`` adapter."""
    cfg = r.cfg
    _check_fields(cfg, POLY_FIELDS, r.path)
    if cfg.get("poly_type", "poly") != "poly":
        raise af.UnsupportedError(f"Poly poly_type={cfg['poly_type']!r} is not PEFT's 'poly'", path=r.path)
    tasks = int(cfg.get("n_tasks", 1))
    if r.task_id is None or not 0 <= r.task_id < tasks:
        got = "no task" if r.task_id is None else f"task {r.task_id}"
        raise af.UnsupportedError(f"Poly mixes its skills' LoRA factors per task, so one task is read as a LoRA: "
                                  f"{got} given; choose one of 0..{tasks - 1} (task_id= / --task-id)", path=r.path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in r.raw.items():
        suffix = next((s for s in POLY_ROLES if key.endswith(s)), None)
        if suffix is None:
            raise af.UnsupportedError(f"tensor {PREFIX + key!r} is not a Poly factor or router", path=r.path)
        parts.setdefault(key[: -len(suffix)], {})[POLY_ROLES[suffix]] = t
    splits, skills, rank = int(cfg.get("n_splits", 1)), int(cfg.get("n_skills", 4)), int(cfg.get("r", 8))
    for module, p in sorted(parts.items()):
        if len(p) != 3:
            raise af.FormatError(f"module {module!r} lacks one of poly_lora_A, poly_lora_B, module_logits",
                                 path=r.path)
        a, b, logits = p["A"], p["B"], p["logits"]
        if a.dim() != 4 or b.dim() != 4 or list(a.shape[:2]) != [splits, skills] or a.shape[3] != rank \
                or list(b.shape[:3]) != [splits, skills, rank] or list(logits.shape) != [tasks, splits * skills]:
            raise af.FormatError(f"module {module!r}: poly_lora_A {list(a.shape)}, poly_lora_B {list(b.shape)}, "
                                 f"module_logits {list(logits.shape)} do not fit n_splits={splits}, "
                                 f"n_skills={skills}, r={rank}, n_tasks={tasks}", path=r.path)
        r.targeted(module)
        w = torch.sigmoid(logits[r.task_id]).view(splits, skills)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-12)
        a_t = torch.einsum("qs,qsdr->qdr", w, a).reshape(splits * a.shape[2], rank)
        b_t = torch.einsum("qs,qsrd->qrd", w, b).transpose(0, 1).reshape(rank, splits * b.shape[3])
        r.add(module, af.lowrank_entry([b_t.shape[1], a_t.shape[0]], 1.0 / rank),
              {"lora_A": a_t.T.contiguous(), "lora_B": b_t.T.contiguous()})
    r.notes.append(f"Poly: task {r.task_id} of {tasks} read as a LoRA (its skills mixed by that task's router)")
    return {}


READERS["POLY"] = ("lora", _read_poly)


def _modules_digest(modules: Mapping[str, Mapping[str, Any]]) -> str:
    """Digest of the module set and kinds: writing back reuses the source's target rules only if it is unchanged."""
    text = json.dumps(sorted((m, e["kind"]) for m, e in modules.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def read_peft(path: str | Path, *, base: Any = None, allow_pickle: bool = False,
              task_id: int | None = None) -> af.Adapter:
    """Read a PEFT adapter folder (see the module docstring for the mapping); ``task_id`` picks the task of a
    Poly adapter."""
    path = Path(path)
    cfg = af.read_json_object(path / CONFIG_FILE)
    _check_types(cfg, path / CONFIG_FILE)
    ptype = cfg.get("peft_type")
    if ptype == "LORA" and cfg.get("arrow_config") not in NEUTRAL:
        return _read_arrow(path, cfg, base, allow_pickle)
    if ptype == "XLORA":
        raise af.UnsupportedError("X-LoRA gates every layer's LoRAs per token from a first forward pass of the whole "
                                  "model (a classifier on its hidden states); a mixture routes each layer from that "
                                  "layer's own input, so it cannot hold X-LoRA", path=path)
    if ptype not in READERS:
        raise af.UnsupportedError(f"PEFT type {ptype!r} is not supported (supported: {', '.join(READERS)})", path=path)
    raw = _load_tensors(path, allow_pickle)
    reader = _Reader(path, cfg, raw if ptype in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "VERA", "VBLORA", "RANDLORA") else _strip(raw, path), base, task_id)
    method, fn = READERS[ptype]
    method_cfg = fn(reader)
    fingerprint = af.base_fingerprint(base)
    prov = {"tool": "peft", "format": "peft", "peft_type": ptype, "peft_version": cfg.get("peft_version"),
            "source": str(path), "config": cfg, "modules_sha256": _modules_digest(reader.modules)}
    if reader.notes:
        prov["notes"] = reader.notes
    manifest = af.new_manifest(method, reader.modules, config=method_cfg, provenance=[prov],
                               base=_base_record(cfg, fingerprint))
    return af.Adapter(manifest, reader.tensors)


def _base_record(cfg: Mapping[str, Any], fingerprint: Any) -> dict[str, Any]:
    """The manifest's ``base``: the PEFT config's base name and revision, and the fingerprint taken of ``--base``."""
    return {"name": cfg.get("base_model_name_or_path"), "revision": cfg.get("revision"), "fingerprint": fingerprint}


ARROW_FIELDS = frozenset({"top_k", "router_temperature", "use_gks", "task_adapter_names", "gks_adapter_names",
                          "rng_seed"})


def _read_arrow(path: Path, cfg: Mapping[str, Any], base: Any, allow_pickle: bool) -> af.Adapter:
    """PEFT's Arrow router (``create_arrow_model`` then ``save_pretrained``): the folder of the ``arrow_router``
    adapter, its ``arrow_config`` naming the task (and GenKnowSub) LoRAs saved in the sibling folders. Read as a
    ``mixture`` with ``|x . prototype|`` logits (the mixture plugin's ``arrow``); the router adapter's own LoRA
    tensors play no part in PEFT's forward and are dropped. With GenKnowSub, PEFT subtracts the general LoRAs'
    mean from the task LoRAs in place at the first forward pass: a model saved after one holds subtracted task
    LoRAs, which this reader (like PEFT's ``create_arrow_model`` on the saved folders) subtracts again."""
    arrow = cfg["arrow_config"]
    if not isinstance(arrow, dict) or set(arrow) - ARROW_FIELDS:
        odd = sorted(set(arrow) - ARROW_FIELDS) if isinstance(arrow, dict) else [repr(arrow)]
        raise af.UnsupportedError(f"arrow_config fields cannot be represented: {', '.join(odd)}", path=path)
    names = list(arrow.get("task_adapter_names") or [])
    if not names:
        raise af.UnsupportedError("arrow_config.task_adapter_names is empty (PEFT's create_arrow_model fills it); read "
                             "the arrow_router folder of a saved Arrow model, beside its task adapters", path=path)
    general = list(arrow.get("gks_adapter_names") or []) if arrow.get("use_gks") else []

    def sibling(name: str) -> af.Adapter:
        folder = path.parent / name
        if not (folder / CONFIG_FILE).is_file():
            raise af.MissingFileError(f"Arrow names adapter {name!r}, but {folder} is not a PEFT folder", path=path)
        adapter = read_peft(folder, base=base, allow_pickle=allow_pickle)
        if adapter.method != "lora" or any(e["kind"] != "lowrank" for e in adapter.modules.values()):
            raise af.UnsupportedError(f"Arrow adapter {name!r} is not a plain LoRA", path=folder)
        return adapter

    seed = arrow.get("rng_seed")
    mix = af.registry.get_method("mixture").arrow(
        {n: sibling(n) for n in names}, top_k=int(arrow.get("top_k", 3)),
        temperature=float(arrow.get("router_temperature", 1.0)), general=[sibling(n) for n in general], seed=seed)
    notes = [] if seed is not None else [
        "Arrow without rng_seed: PEFT's prototypes come from 15 power iterations from a random start; the exact top "
        "singular vectors (their limit) are stored"]
    prov = {"tool": "peft", "format": "peft", "peft_type": "LORA", "arrow": True, "peft_version": cfg.get("peft_version"),
            "source": str(path), "config": dict(cfg), **({"notes": notes} if notes else {})}
    # the experts' reads fingerprinted the base already (mixture_adapter keeps the first one's record)
    manifest = af.new_manifest("mixture", mix.modules, config=mix.config, provenance=[prov],
                               base=_base_record(cfg, mix.base.get("fingerprint")))
    return af.Adapter(manifest, mix.tensors())


def _triangle(vec: torch.Tensor, module: str, path: Path) -> int:
    b = af.registry.get_kind("cayley").triangle_side(vec.shape[-1]) if vec.dim() == 2 else None
    if b is None:
        raise af.FormatError(f"module {module!r}: oft_R {list(vec.shape)} is not [k, b(b-1)/2]", path=path)
    return b


# ----- writing ---------------------------------------------------------------------------------------------
def _source_config(adapter: af.Adapter, peft_type: str) -> tuple[dict[str, Any], bool]:
    """The PEFT config of type ``peft_type`` the adapter was read from (if any), and whether its module set
    is unchanged."""
    for p in reversed(adapter.manifest.get("provenance", [])):
        if p.get("format") == "peft" and isinstance(p.get("config"), dict) and p["config"].get("peft_type") == peft_type:
            return dict(p["config"]), p.get("modules_sha256") == _modules_digest(adapter.modules)
    return {}, False


def _is_embedding(module: str, entry: Mapping[str, Any], base: Any) -> bool:
    if not entry.get("params", {}).get("transposed") or len(entry["shape"]) != 2:
        return False
    if isinstance(base, nn.Module):
        return isinstance(base.get_submodule(module), nn.Embedding)
    return module.rsplit(".", 1)[-1] in EMBEDDING_NAMES


class _Writer:
    def __init__(self, adapter: af.Adapter, base: Any) -> None:
        self.adapter, self.base = adapter, base
        self.src: dict[str, Any] = {}
        self.same_modules = False
        self.tensors: dict[str, torch.Tensor] = {}
        self.cfg: dict[str, Any] = {}
        self.by_kind: dict[str, list[str]] = {}
        for m, e in sorted(adapter.modules.items()):
            key = e["kind"]
            if key == "dense" and e.get("params", {}).get("mode") == "replace":
                key = "bias" if e.get("parameter") == "bias" else "to_save"
            self.by_kind.setdefault(key, []).append(m)

    def refuse(self, allowed: set[str], method: str) -> None:
        bad = sorted(set(self.by_kind) - allowed)
        if bad:
            mods = [m for k in bad for m in self.by_kind[k]]
            raise af.UnsupportedError(f"a PEFT {method} adapter cannot hold module entries of kind "
                                      f"{', '.join(bad)} ({', '.join(mods[:5])}{' ...' if len(mods) > 5 else ''})")

    def common(self, peft_type: str) -> None:
        self.src, self.same_modules = _source_config(self.adapter, peft_type)
        base = self.adapter.base
        self.cfg.update({"peft_type": peft_type, "base_model_name_or_path": base.get("name"),
                         "revision": base.get("revision"), "inference_mode": True,
                         "task_type": self.src.get("task_type")})

    def targets(self, modules: list[str]) -> Any:
        if self.same_modules and self.src.get("target_modules") is not None:
            for key in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"):
                if key in self.src:
                    self.cfg[key] = self.src[key]
            return self.cfg["target_modules"]
        return sorted(modules)

    def aux(self) -> None:
        mods = self.adapter.modules
        to_save = self.by_kind.get("to_save", [])
        for m in to_save:
            t = self.adapter.module_tensors(m)
            self.tensors[f"{PREFIX}{m}.weight"] = t["value"]
            if "bias_value" in t:
                self.tensors[f"{PREFIX}{m}.bias"] = t["bias_value"]
        src_save = self.src.get("modules_to_save") if self.same_modules else None
        self.cfg["modules_to_save"] = src_save if src_save is not None or not to_save else to_save
        for m in self.by_kind.get("bias", []):
            self.tensors[f"{PREFIX}{m}.bias"] = self.adapter.module_tensors(m)["value"]
        tokens: dict[str, list[int]] = {}
        for m in self.by_kind.get("rows", []):
            t = self.adapter.module_tensors(m)
            order = mods[m].get("params", {}).get("peft_order")
            idx, values = t["indices"], t["values"]
            if order is not None:
                pos = torch.argsort(torch.argsort(torch.tensor(order)))
                idx, values = idx[pos], values[pos]
            tokens[m] = idx.tolist()
            self.tensors[f"{PREFIX}{m}.token_adapter.trainable_tokens_delta"] = values
        if tokens:
            src_tok = self.src.get("trainable_token_indices") if self.same_modules else None
            self.cfg["trainable_token_indices"] = src_tok if src_tok is not None else tokens

    # ----- LoRA ------------------------------------------------------------------------------------------------
    def lora(self) -> None:
        self.refuse({"lowrank", "to_save", "bias", "rows"}, "LoRA")
        self.common("LORA")
        mods = self.adapter.modules
        low = self.by_kind.get("lowrank", [])
        rslora = bool(self.src.get("use_rslora", self.adapter.config.get("use_rslora", False)))
        ranks, alphas = {}, {}
        dora = bias = base_bias = conv1d = False
        for m in low:
            e, t = mods[m], self.adapter.module_tensors(m)
            a, b, scale = lora_factors(e, t)
            r = ranks[m] = a.shape[0]
            alphas[m] = af.alpha_for(scale, r, rslora)
            if _is_embedding(m, e, self.base):
                self.tensors[f"{PREFIX}{m}.lora_embedding_A"] = a
                self.tensors[f"{PREFIX}{m}.lora_embedding_B"] = b
            else:
                conv1d |= bool(e.get("params", {}).get("transposed"))
                self.tensors[f"{PREFIX}{m}.lora_A.weight"] = a
                self.tensors[f"{PREFIX}{m}.lora_B.weight"] = b.reshape(b.shape[0], r, *([1] * (a.dim() - 2)))
            if "magnitude" in t:
                dora = True
                nd = len(e["shape"])
                mag = t["magnitude"].reshape(-1)
                self.tensors[f"{PREFIX}{m}.lora_magnitude_vector"] = mag.reshape(1, -1, *([1] * (nd - 2))) if nd > 2 \
                    else mag
            if "bias" in t:
                bias = True
                self.tensors[f"{PREFIX}{m}.lora_B.bias"] = t["bias"]
            if "bias_value" in t:
                base_bias = True
                self.tensors[f"{PREFIX}{m}.base_layer.bias"] = t["bias_value"]
        if dora and len({"magnitude" in self.adapter.roles(m) for m in low}) > 1:
            raise af.UnsupportedError("PEFT needs DoRA on all LoRA modules or none; this adapter mixes them")
        if bias and len({"bias" in self.adapter.roles(m) for m in low}) > 1:
            raise af.UnsupportedError("PEFT needs lora_bias on all LoRA modules or none; this adapter mixes them")
        r0 = self.src.get("r") if self.src.get("r") in ranks.values() else _most_common(ranks.values(), 8)
        a0 = self.src.get("lora_alpha") if self.src.get("lora_alpha") in alphas.values() else \
            _most_common(alphas.values(), r0)
        rank_pattern = self._patterns("rank_pattern", ranks, r0, "r")
        alpha_pattern = self._patterns("alpha_pattern", alphas, a0, "lora_alpha")
        self.cfg.update({"r": r0, "lora_alpha": a0, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
                         "use_rslora": rslora, "use_dora": dora, "lora_bias": bias, "fan_in_fan_out": conv1d,
                         "bias": self._bias_mode(base_bias), "lora_dropout": 0.0,
                         "init_lora_weights": True})
        self.cfg["target_modules"] = self.targets(low)
        self.aux()

    def _bias_mode(self, base_bias: bool) -> str:
        """PEFT ``bias``: "all" when untargeted biases are stored, "lora_only" when only targeted modules'
        biases are (or the source's "all", which then saved the same tensors), else "none"."""
        if self.by_kind.get("bias"):
            return "all"
        if not base_bias:
            return "none"
        return "all" if self.same_modules and self.src.get("bias") == "all" else "lora_only"

    def _patterns(self, field: str, values: Mapping[str, Any], default: Any, default_field: str) -> dict[str, Any]:
        """The source's pattern if it gives every module its value, else one exact key per differing module."""
        src = self.src.get(field)
        if src is not None and self.src.get(default_field) == default and all(
                af.peft_pattern(src, m, default) == v for m, v in values.items()):
            return src
        return {re.escape(m): v for m, v in sorted(values.items()) if v != default}

    # ----- IA3 -------------------------------------------------------------------------------------------------
    def ia3(self) -> None:
        self.refuse({"vector", "to_save"}, "IA3")
        self.common("IA3")
        mods = self.adapter.modules
        vec = self.by_kind.get("vector", [])
        ff, transposed = [], False
        for m in vec:
            e, v = mods[m], self.adapter.module_tensors(m)["vector"]
            p = e.get("params", {})
            if p.get("op", "scale") != "scale":
                raise af.UnsupportedError(f"module {m!r}: a vector offset (op={p.get('op')!r}) is not IA3")
            side = p.get("side", "output")
            transposed |= bool(p.get("transposed"))
            nd = len(e["shape"])
            if side == "input":
                ff.append(m)
            if nd > 2:
                shape = (1, -1, *([1] * (nd - 2)))
            else:
                shape = (1, -1) if side == "input" else (-1, 1)
            self.tensors[f"{PREFIX}{m}.ia3_l"] = v.reshape(shape)
        self.cfg.update({"fan_in_fan_out": transposed, "init_ia3_weights": True})
        self.cfg["target_modules"] = self.targets(vec)
        same = self.same_modules and "feedforward_modules" in self.src
        self.cfg["feedforward_modules"] = self.src["feedforward_modules"] if same else ff
        self.aux()

    # ----- LoHa / LoKr / VeRA -----------------------------------------------------------------------------------
    def lycoris(self, ptype: str) -> None:
        kind, _ = LYCORIS_ROLES[ptype]
        self.refuse({kind, "to_save"}, ptype)
        self.common(ptype)
        mods = self.by_kind.get(kind, [])
        ranks, alphas = {}, {}
        for m in mods:
            t = self.adapter.module_tensors(m)
            self.tensors.update({f"{PREFIX}{m}.{role}": v for role, v in t.items()})
            r = ranks[m] = int(af.peft_pattern(self.src.get("rank_pattern"), m, self.src.get("r", 8))) if \
                self.same_modules else (t["hada_w1_a"].shape[1] if kind == "hadamard" else 8)
            alphas[m] = af.alpha_for(float(self.adapter.modules[m].get("params", {}).get("scale", 1.0)), r, False)
        r0 = self.src.get("r") if self.src.get("r") in ranks.values() else _most_common(ranks.values(), 8)
        a0 = self.src.get("alpha") if self.src.get("alpha") in alphas.values() else _most_common(alphas.values(), r0)
        self.cfg.update({"r": r0, "alpha": a0, "rank_pattern": self._patterns("rank_pattern", ranks, r0, "r"),
                         "alpha_pattern": self._patterns("alpha_pattern", alphas, a0, "alpha")})
        for key in ("decompose_both", "decompose_factor", "use_effective_conv2d"):
            if key in self.src:
                self.cfg[key] = self.src[key]
        self.cfg["target_modules"] = self.targets(mods)
        self.aux()

    def vera(self) -> None:
        self.refuse({"vera", "to_save"}, "VeRA")
        self.common("VERA")
        mods = self.by_kind.get("vera", [])
        names = {tuple(sorted(self.adapter.modules[m]["params"]["shared"].items())) for m in mods}
        if len(names) != 1:
            raise af.UnsupportedError("PEFT VeRA has one pair of shared projections; this adapter has several")
        for m in mods:
            t = self.adapter.module_tensors(m)
            self.tensors[f"{PREFIX}{m}.vera_lambda_b"] = t["lambda_b"]
            self.tensors[f"{PREFIX}{m}.vera_lambda_d"] = t["lambda_d"]
            self.tensors["base_model.vera_A"], self.tensors["base_model.vera_B"] = t["vera_A"], t["vera_B"]
        self.cfg.update({"r": int(self.tensors["base_model.vera_A"].shape[0]), "save_projection": True,
                         "bias": "none", "projection_prng_key": self.src.get("projection_prng_key", 0)})
        self.cfg["target_modules"] = self.targets(mods)
        self.aux()

    # ----- OFT / BOFT / HRA ------------------------------------------------------------------------------------
    def multiplicative(self, ptype: str) -> None:
        """The reverse of :meth:`_Reader.multiplicative`; PEFT's config is global, so every module must share
        the block size / rank and the series, and PEFT applies these types to Linear and Conv2d inputs (and, for OFT,
        embedding outputs) only."""
        kind = MULTIPLICATIVE_KINDS[ptype]
        self.refuse({kind, "to_save"}, ptype)
        self.common(ptype)
        mods = self.by_kind.get(kind, [])
        shared: dict[str, set[Any]] = {}
        for m in mods:
            e, t = self.adapter.modules[m], self.adapter.module_tensors(m)
            p = e.get("params", {})
            embedding = _is_embedding(m, e, self.base)
            side = p.get("side", "input")
            if (side, bool(p.get("transposed"))) != (("output", True) if embedding else ("input", False)) or (
                    embedding and ptype != "OFT"):
                raise af.UnsupportedError(f"module {m!r}: PEFT {ptype} multiplies the inputs of nn.Linear / "
                                          "nn.Conv2d modules" + (" and the outputs of embeddings" if ptype == "OFT" else "")
                                          + f" only, not side={side!r} with transposed={bool(p.get('transposed'))}")
            conv = len(e["shape"]) == 4
            if conv and e["shape"][2] != e["shape"][3]:
                raise af.UnsupportedError(f"module {m!r}: PEFT {ptype} sizes a convolution's rotation by kernel_size[0]"
                                          f"^2; the kernel {e['shape'][2]}x{e['shape'][3]} is not square")
            if ptype == "OFT":
                if conv and e["shape"][2] > 1:  # as the reader notes it (_Reader.multiplicative)
                    warnings.warn(af.AdapterNote(
                        f"{m}: OFT on a {e['shape'][2]}x{e['shape'][3]} convolution is PEFT's merged function; "
                        "PEFT 0.21's unmerged forward of it computes another one: merge it (merge_and_unload) "
                        "after loading"), stacklevel=2)
                vec = t["skew"]
                b = af.registry.get_kind("cayley").triangle_side(vec.shape[1])
                d = math.prod(e["shape"][1:])
                shared.setdefault("oft_block_size", set()).add(b)
                if d // b > 1:  # one block: shared or not is the same
                    shared.setdefault("block_share", set()).add(vec.shape[0] == 1)
                shared.setdefault("series", set()).add(json.dumps(p.get("series")))
                suffix = "oft_embedding_R.weight" if embedding else "oft_R.weight"
                self.tensors[f"{PREFIX}{m}.{suffix}"] = vec
            elif ptype == "BOFT":
                blocks = t["blocks"]
                shared.setdefault("boft_block_size", set()).add(blocks.shape[2])
                shared.setdefault("boft_n_butterfly_factor", set()).add(blocks.shape[0])
                self.tensors[f"{PREFIX}{m}.boft_R"] = blocks
                scale = t.get("output_scale", torch.ones(e["shape"][0], dtype=blocks.dtype))
                self.tensors[f"{PREFIX}{m}.boft_s"] = scale.reshape(1, -1) if conv else scale.reshape(-1, 1)
            else:
                shared.setdefault("r", set()).add(t["vectors"].shape[1])
                shared.setdefault("apply_GS", set()).add(bool(p.get("orthogonalize", False)))
                self.tensors[f"{PREFIX}{m}.hra_u"] = t["vectors"]
        mixed = sorted(k for k, v in shared.items() if len(v) > 1)
        if mixed:
            raise af.UnsupportedError(f"PEFT {ptype} has one {mixed[0]} for every module; this adapter's modules "
                                      "differ in it")
        one = {k: next(iter(v)) for k, v in shared.items()}
        if ptype == "OFT":
            series = json.loads(one.pop("series", "null"))
            terms = af.registry.get_kind("cayley").series_terms(series)
            one.setdefault("block_share", False)
            one.update({"r": 0, "use_cayley_neumann": terms is not None, "num_cayley_neumann_terms": terms or 5,
                        "coft": False, "eps": 6e-5, "module_dropout": 0.0})
        elif ptype == "BOFT":
            one.update({"boft_block_num": 0, "boft_dropout": 0.0})
        self.cfg.update({**one, **({} if ptype == "HRA" else {"fan_in_fan_out": False}), "bias": "none",
                         "init_weights": True})  # HRAConfig has no fan_in_fan_out (PEFT warns at load)
        self.cfg["target_modules"] = self.targets(mods)
        self.aux()

    # ----- SHiRA / LN tuning / FourierFT / VB-LoRA / RandLoRA / C3A / MiSS ----------------------------------------
    def structured(self, ptype: str, kind: str) -> list[tuple[str, dict[str, Any], dict[str, torch.Tensor]]]:
        """The common part: refuse other kinds, the config's common fields, targets, ``modules_to_save``;
        returns ``(module, entry, tensors)`` of the ``kind`` modules."""
        self.refuse({kind, "to_save"}, ptype)
        self.common(ptype)
        mods = self.by_kind.get(kind, [])
        self.cfg["target_modules"] = self.targets(mods)
        self.aux()
        return [(m, self.adapter.modules[m], self.adapter.module_tensors(m)) for m in mods]

    def one(self, ptype: str, what: str, values: Any) -> Any:
        """The single value PEFT's config holds for all modules, or an error naming the field."""
        found = sorted(set(values), key=repr)
        if len(found) > 1:
            raise af.UnsupportedError(f"PEFT {ptype} has one {what} for all modules; this adapter has {found[:5]}")
        return found[0] if found else None

    def linear_only(self, ptype: str, items: list[tuple[str, dict[str, Any], Any]]) -> None:
        bad = [m for m, e, _ in items if e.get("params", {}).get("transposed") or len(e["shape"]) != 2]
        if bad:
            raise af.UnsupportedError(f"PEFT {ptype} adapts nn.Linear weights only, not {', '.join(bad[:5])}")

    def shira(self) -> None:
        items = self.structured("SHIRA", "sparse")
        self.linear_only("SHiRA", items)
        ranks = {}
        for m, e, t in items:
            (out, n_in), flat = e["shape"], t["indices"]
            ranks[m] = flat.numel() / (out + n_in)
            self.tensors[f"{PREFIX}{m}.shira_indices"] = torch.stack([flat // n_in, flat % n_in]).to(torch.int32)
            scale = float(e.get("params", {}).get("scale", 1.0))
            self.tensors[f"{PREFIX}{m}.shira_weight"] = t["values"] if scale == 1 else t["values"] * scale
        r = self.one("SHiRA", "r (each module holds r * (out + in) values)", ranks.values())
        if r is not None and r != int(r):
            raise af.UnsupportedError(f"PEFT SHiRA holds r * (out + in) values per module; {next(iter(ranks))!r} "
                                      f"holds {r:g} times (out + in)")
        self.cfg.update({"r": int(r or 32), "mask_type": "random", "random_seed": self.src.get("random_seed"),
                         "fan_in_fan_out": False, "init_weights": self.src.get("init_weights", True)})

    def ln_tuning(self) -> None:
        self.refuse({"to_save"}, "LN tuning")
        self.common("LN_TUNING")
        src_save = self.src.get("modules_to_save") if self.same_modules else None
        ln = [m for m in self.by_kind.get("to_save", []) if not peft_matches(src_save, m)]
        for m in ln:
            t = self.adapter.module_tensors(m)
            self.tensors[f"{PREFIX}{m}.ln_tuning_layers.weight"] = t["value"]
            if "bias_value" in t:
                self.tensors[f"{PREFIX}{m}.ln_tuning_layers.bias"] = t["bias_value"]
        self.by_kind["to_save"] = [m for m in self.by_kind.get("to_save", []) if m not in ln]
        self.cfg["target_modules"] = self.targets(ln)
        self.aux()

    def fourierft(self) -> None:
        items = self.structured("FOURIERFT", "fourier")
        seed = int(self.src.get("random_loc_seed", self.adapter.config.get("random_loc_seed", 777)))
        method = af.registry.get_method("fourierft")
        counts = {}
        for m, e, t in items:
            out, n_in = af.function_shape(e)
            n = counts[m] = t["spectrum"].numel()
            if not torch.equal(t["indices"], method.frequencies(out, n_in, n, seed)):
                raise af.UnsupportedError(f"module {m!r}: its frequencies are not the ones PEFT's FourierFT draws "
                                          f"with random_loc_seed={seed}, so PEFT cannot load them")
            self.tensors[f"{PREFIX}{m}.fourierft_spectrum"] = t["spectrum"]
        scaling = self.one("FourierFT", "scaling", (float(e.get("params", {}).get("scale", 1.0)) for _, e, _ in items))
        n0 = self.src.get("n_frequency") if self.src.get("n_frequency") in counts.values() else \
            _most_common(counts.values(), 1000)
        src = self.src.get("n_frequency_pattern")
        pattern = src if src is not None and self.src.get("n_frequency") == n0 and all(
            dotted_pattern_value(src, m, n0) == n for m, n in counts.items()) else \
            {m: n for m, n in sorted(counts.items()) if n != n0}
        self.cfg.update({"n_frequency": n0, "n_frequency_pattern": pattern, "scaling": scaling or 150.0,
                         "random_loc_seed": seed, "bias": "none", "init_weights": self.src.get("init_weights", False),
                         "fan_in_fan_out": bool(self.one("FourierFT", "fan_in_fan_out", (
                             bool(e.get("params", {}).get("transposed")) for _, e, _ in items)))})

    def vblora(self) -> None:
        items = self.structured("VBLORA", "vector_bank")
        bank = self.one("VB-LoRA", "vector bank", (e["params"]["shared"]["vector_bank"] for _, e, _ in items))
        n, length = self.adapter.tensor(bank).shape if bank is not None else (256, 256)
        top = self.one("VB-LoRA", "save_only_topk_weights", ("logits_A" not in t for _, _, t in items))
        index_dtype = torch.uint8 if n < 2**8 else torch.int16 if n < 2**15 else torch.int32 if n < 2**31 else torch.int64
        for m, _, t in items:
            for s in "AB":
                if top:  # PEFT's own form: indices in the smallest dtype for N, the first k-1 weights
                    self.tensors[f"{PREFIX}{m}.vblora_logits_{s}_topk_indices"] = t[f"topk_indices_{s}"].to(index_dtype)
                    self.tensors[f"{PREFIX}{m}.vblora_logits_{s}_topk_weights"] = \
                        t[f"topk_weights_{s}"][..., :-1].contiguous()
                else:
                    self.tensors[f"{PREFIX}{m}.vblora_logits_{s}"] = t[f"logits_{s}"]
        if bank is not None:
            self.tensors["base_model.vblora_vector_bank"] = self.adapter.tensor(bank)
        rank = (t.get("logits_A", t.get("topk_indices_A")).shape[0] for _, _, t in items)
        self.cfg.update({"r": self.one("VB-LoRA", "r", rank) or 4,
                         "topk": self.one("VB-LoRA", "topk", (e["params"]["topk"] for _, e, _ in items)) or 2,
                         "num_vectors": n, "vector_length": length, "save_only_topk_weights": bool(top),
                         "bias": "none", "fan_in_fan_out": bool(self.one("VB-LoRA", "fan_in_fan_out", (
                             bool(e["params"].get("transposed")) for _, e, _ in items)))})

    def randlora(self) -> None:
        items = self.structured("RANDLORA", "randlora")
        names = self.one("RandLoRA", "pair of bases", (tuple(sorted(e["params"]["shared"].items())) for _, e, _ in items))
        r = self.one("RandLoRA", "r", (t["lambda"].shape[0] for _, _, t in items)) or 32
        scale = self.one("RandLoRA", "scale", (float(e["params"].get("scale", 1.0)) for _, e, _ in items))
        shapes = [af.function_shape(e) for _, e, _ in items]
        for m, e, t in items:
            nb = -(-min(af.function_shape(e)) // r)
            if t["lambda"].shape[1] != nb:
                raise af.UnsupportedError(f"module {m!r}: {t['lambda'].shape[1]} bases, PEFT's RandLoRA uses "
                                          f"ceil(min(out, in) / r) = {nb}")
            self.tensors[f"{PREFIX}{m}.randlora_lambda"] = t["lambda"]
            self.tensors[f"{PREFIX}{m}.randlora_gamma"] = t["gamma"]
            self.tensors[f"{PREFIX}{m}.randlora_A"], self.tensors[f"{PREFIX}{m}.randlora_B"] = t["basis_A"], t["basis_B"]
        if names is not None:
            a, b = (self.adapter.tensor(n) for _, n in names)
            out_max, in_max = max(s[0] for s in shapes), max(s[1] for s in shapes)
            lo, hi = min(out_max, in_max), max(out_max, in_max)
            want = ((r, 1, lo), (hi, -(-lo // r), r))
            if (tuple(a.shape), tuple(b.shape)) != want:
                raise af.UnsupportedError(f"PEFT's RandLoRA bases for these modules are {list(map(list, want))}; this "
                                          f"adapter's are {[list(a.shape), list(b.shape)]}")
            self.tensors["base_model.randlora_A"], self.tensors["base_model.randlora_B"] = a, b
        self.cfg.update({"r": r, "randlora_alpha": (scale or 20.0) * r, "save_projection": True, "bias": "none",
                         "projection_prng_key": self.src.get("projection_prng_key", 0),
                         "init_weights": self.src.get("init_weights", True),
                         "sparse": self.src.get("sparse", False), "very_sparse": self.src.get("very_sparse", False),
                         "fan_in_fan_out": bool(self.one("RandLoRA", "fan_in_fan_out", (
                             bool(e["params"].get("transposed")) for _, e, _ in items)))})

    def c3a(self) -> None:
        items = self.structured("C3A", "circulant")
        self.linear_only("C3A", items)
        sizes = {}
        for m, e, t in items:
            k, n_in = t["kernel"], e["shape"][1]
            sizes[m] = k.shape[2]
            scale = float(e.get("params", {}).get("scale", 1.0))  # PEFT divides by in_features: fold the rest in
            self.tensors[f"{PREFIX}{m}.c3a_kernel"] = k if scale * n_in == 1 else k * (scale * n_in)
        b0 = self.src.get("block_size") if self.src.get("block_size") in sizes.values() else \
            _most_common(sizes.values(), 256)
        src = self.src.get("block_size_pattern")
        pattern = src if src is not None and self.src.get("block_size") == b0 and all(
            dotted_pattern_value(src, m, b0) == b for m, b in sizes.items()) else \
            {m: b for m, b in sorted(sizes.items()) if b != b0}
        self.cfg.update({"block_size": b0, "block_size_pattern": pattern, "bias": "none",
                         "init_weights": self.src.get("init_weights", True)})

    def miss(self) -> None:
        items = self.structured("MISS", "block_share")
        self.linear_only("MiSS", items)
        forms = {}
        for m, e, t in items:
            block, (out, n_in) = t["block"], e["shape"]
            bat = e["params"].get("mode") == "bat"
            forms[m] = ("bat", block.shape[-1], 1) if bat else \
                ("miss", block.shape[0], 1) if block.shape[1] == out else ("mini", block.shape[0], block.shape[1])
            if not bat and block.shape[0] > n_in:
                raise af.UnsupportedError(f"module {m!r}: PEFT's MiSS needs r <= in_features ({block.shape[0]} > {n_in})")
            self.tensors[f"{PREFIX}{m}.miss_block"] = block
        variant, r, mini_r = self.one("MiSS", "init_weights / r / mini_r", forms.values()) or ("miss", 64, 1)
        init = self.src.get("init_weights") if variant == "miss" and self.src.get("init_weights") in (True, False) \
            else True if variant == "miss" else variant  # True / False only set the initial values
        self.cfg.update({"r": r, "mini_r": mini_r, "init_weights": init,
                         "bias": "none", "miss_dropout": 0.0})

    # ----- prompt tuning ---------------------------------------------------------------------------------------
    def prompt(self, kind: str = "prompt") -> None:
        """Kind ``prompt`` as PEFT prompt tuning; kind ``multitask_prompt`` as PEFT multitask prompt tuning
        (every task; ``params.task``, the task an attach applies, has no place in PEFT, which takes
        ``task_ids`` at each call)."""
        what = "prompt tuning" if kind == "prompt" else "multitask prompt tuning"
        self.refuse({kind}, what)
        mods = self.by_kind.get(kind, [])
        if len(mods) != 1:
            raise af.UnsupportedError(f"a PEFT {what} adapter holds exactly one prompt")
        self.common("PROMPT_TUNING" if kind == "prompt" else "MULTITASK_PROMPT_TUNING")
        t = self.adapter.module_tensors(mods[0])
        emb = t["embeddings"]
        self.tensors["prompt_embeddings"] = emb
        self.cfg.update({"num_virtual_tokens": emb.shape[0], "token_dim": emb.shape[1],
                         "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM",
                         "task_type": self.src.get("task_type", "CAUSAL_LM")})
        if kind == "multitask_prompt":
            self.tensors.update({"prefix_task_cols": t["task_cols"], "prefix_task_rows": t["task_rows"]})
            self.cfg.update({"num_tasks": t["task_cols"].shape[0], "num_ranks": t["task_cols"].shape[2]})
        for key in ("num_attention_heads", "num_layers"):
            if key in self.src:
                self.cfg[key] = self.src[key]

    def prefix(self) -> None:
        """Kind ``prefix`` as PEFT prefix tuning without projection (the layout :meth:`_Reader.prefix` reads)."""
        self.refuse({"prefix"}, "prefix tuning")
        mods = self.by_kind.get("prefix", [])
        if len(mods) != 1:
            raise af.UnsupportedError("a PEFT prefix-tuning adapter holds exactly one prefix")
        self.common("PREFIX_TUNING")
        t = self.adapter.module_tensors(mods[0])
        layers, n, heads, head_dim = t["keys"].shape
        emb = torch.stack([t["keys"], t["values"]], dim=2).permute(1, 0, 2, 3, 4)  # [n, layers, 2, heads, head_dim]
        self.tensors["prompt_embeddings"] = emb.reshape(n, layers * 2 * heads * head_dim).contiguous()
        self.cfg.update({"num_virtual_tokens": n, "num_layers": layers, "token_dim": heads * head_dim,
                         "num_attention_heads": heads, "encoder_hidden_size": heads * head_dim,
                         "prefix_projection": False, "num_transformer_submodules": 1,
                         "task_type": self.src.get("task_type") or "CAUSAL_LM"})


def _most_common(values: Any, default: Any) -> Any:
    counts = Counter(values)
    return counts.most_common(1)[0][0] if counts else default


WRITERS = {"lora": _Writer.lora, "ia3": _Writer.ia3, "prompt_tuning": _Writer.prompt,
           "trainable_tokens": _Writer.lora, "adalora": _Writer.lora, "loha": lambda w: w.lycoris("LOHA"),
           "lokr": lambda w: w.lycoris("LOKR"), "vera": _Writer.vera, "oft": lambda w: w.multiplicative("OFT"),
           "boft": lambda w: w.multiplicative("BOFT"), "hra": lambda w: w.multiplicative("HRA")}

WRITERS.update({"shira": _Writer.shira, "ln_tuning": _Writer.ln_tuning, "fourierft": _Writer.fourierft,
                "vblora": _Writer.vblora, "randlora": _Writer.randlora, "c3a": _Writer.c3a, "miss": _Writer.miss,
                "prefix_tuning": _Writer.prefix,
                "multitask_prompt_tuning": lambda w: w.prompt("multitask_prompt")})


def lora_factors(entry: dict[str, Any], t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(lora_A, lora_B, scale)`` PEFT stores for a lowrank entry: its own factors, or for one with a middle
    factor or an explicit base part (spec 6.2.1) the plain factors of rank ``r + r0`` with ``dW = B' @ A'``
    exactly (scale 1)."""
    if "lora_mid" not in t and "base_part" not in entry.get("params", {}):
        return t["lora_A"], t["lora_B"], float(entry.get("params", {}).get("scale", 1.0))
    b, a = af.registry.get_kind("lowrank").factors(entry, t)
    k, dtype = a.shape[0], torch.promote_types(t["lora_A"].dtype, torch.float32)
    return a.reshape(k, *t["lora_A"].shape[1:]).to(dtype), b.reshape(b.shape[0], k, *t["lora_B"].shape[2:]).to(dtype), 1.0


def write_peft(adapter: af.Adapter, path: str | Path, *, base: Any = None) -> Path:
    """Write ``adapter`` as a PEFT folder at ``path`` (which must not exist; :func:`adapterfmt.write_foreign`
    makes this atomic). Methods: lora (and lowrank-only adapters of other methods), ia3, prompt_tuning.
    A lowrank middle factor or base part is written as the plain LoRA of rank ``r + r0`` (exact); a derived
    base part is made explicit with ``base`` first (refused without it)."""
    path = Path(path)
    adapter = af.require_explicit(adapter, base, "PEFT export")
    writer = _Writer(adapter, base)
    method = adapter.method
    if method not in WRITERS:
        kinds = set(writer.by_kind)
        method = "lora" if kinds <= {"lowrank", "to_save", "bias", "rows"} else method
    if method not in WRITERS:
        raise af.UnsupportedError(f"method {adapter.method!r} has no PEFT equivalent (PEFT export supports "
                                  f"{', '.join(sorted(WRITERS))} and any adapter of lowrank modules)")
    WRITERS[method](writer)
    return af.write_folder(path, WEIGHTS_FILE, writer.tensors, CONFIG_FILE, writer.cfg, {"format": "pt"})


class PeftFormat:
    """The ``peft`` codec (:class:`adapterfmt.ForeignFormat`)."""

    name = "peft"
    summary = "Hugging Face PEFT folder: adapter_config.json + adapter_model.safetensors"

    def detect(self, path: Path) -> bool:
        return path.is_dir() and (path / CONFIG_FILE).is_file()

    def read(self, path: Path, **options: Any) -> af.Adapter:
        return read_peft(path, base=options.get("base"), allow_pickle=options.get("allow_pickle", False),
                         task_id=options.get("task_id"))

    def write(self, adapter: af.Adapter, path: Path, **options: Any) -> None:
        write_peft(adapter, path, base=options.get("base"))


@af.hookimpl
def adapterfmt_formats() -> list[Any]:
    return [PeftFormat()]
