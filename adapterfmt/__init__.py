"""adapterfmt: a versioned on-disk format for parameter-efficient adapters, and the toolkit around it.

The public API is what this module exports; plugins (built-in ones included) use nothing else. Reading
adapters (the format layer, the errors, the plugin registry) is imported with the package; names that need
torch (kinds, verbs, kernels) are imported on first use (PEP 562), so ``import adapterfmt`` and ``adapter
--help`` stay fast.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from ._version import __version__
from .errors import (
    AdapterError,
    AdapterNote,
    BaseMismatchError,
    ChecksumError,
    FormatError,
    HubAuthError,
    HubError,
    HubTransferError,
    LimitError,
    MissingFileError,
    NotAnAdapterRepoError,
    OutputExistsError,
    PluginError,
    PushConflictError,
    RepoNotFoundError,
    RevisionNotFoundError,
    SpecVersionError,
    UnknownExtensionError,
    UnsafePathError,
    UnsupportedError,
)
from .format.adapter import Adapter, load, register_foreign_reader, register_resolver, save
from .format.jsontext import read_json_object
from .format.manifest import SPEC_VERSION, new_manifest
from .format.validate import validate
from .plugin import registry
from .plugin.hookspecs import hookimpl
from .plugin.protocols import ApplyBackend, ForeignFormat, TensorCodec

_LAZY: dict[str, tuple[str, ...]] = {
    ".deltas": ("DeltaKind", "function_shape", "lowrank_entry"),
    ".deltas.base_part": ("derived_tensors", "ldu_rows", "olora_factors", "pissa_factors", "recipe_factors",
                          "recipe_writable", "svd_bottom_factors"),
    ".deltas.modules": ("function_weight", "held_quantized", "is_transposed", "weight_function"),
    ".deltas.prefixed": ("PrefixedCall",),
    ".deltas.weight": ("WeightDeltaKind", "promoted"),
    ".format.codecs": ("BUILTIN_CODECS",),
    ".kernels": ("block_apply", "multi_lora_rows"),
    ".format.fingerprint": ("fingerprint_checkpoint", "fingerprint_module"),
    ".format.quant": ("QuantSpec", "Quantized", "dequantize", "fake_quantize", "fits_grid", "quantize", "requantize"),
    ".verbs.acquire": ("Acquisition", "acquire", "answer_uncertainty", "star_scores"),
    ".verbs.apply": ("activate", "adapter_ids", "attach", "attached", "detach", "merge_into", "unmerge"),
    ".verbs.compress": ("compress_adapter",),
    ".verbs.compose": ("Composition", "CompositionProcessor", "Sampling", "Term", "compose", "eft_terms"),
    ".verbs.conversion": (
        "alpha_for", "attention_heads", "base_config", "base_fingerprint", "base_shapes", "base_tensor", "convert",
        "factor_shape", "lora_scale", "lowrank_adapter", "lowrank_factors", "one_value", "peft_pattern", "read_foreign",
        "read_pickle_tensors", "read_tensor_file", "rope_permute", "tensor_names", "to_peft", "write_folder",
        "write_foreign", "write_tensor_file",
    ),
    ".verbs.explicit": ("make_explicit", "require_explicit"),
    ".verbs.extract": ("extract_adapter",),
    ".verbs.merge": ("merge_adapters",),
    ".verbs.method": ("Method",),
    ".verbs.port": ("port_adapter", "port_live", "record_base"),
    ".verbs.targets": ("TARGETS_SCHEMA", "layer_index", "matches_targets", "pattern_value", "select_modules",
                       "select_targets"),
    ".verbs.train": ("TrainableDelta", "TrainSession", "adapter_dtype", "inject", "module_entry", "orthonormality"),
    ".verbs.trainer": ("TrainOptions", "train_adapter"),
}
"""Module -> the public names it defines that are imported on first use (they import torch)."""
_WHERE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    """A public name of :data:`_LAZY`, imported on first use and then kept in the package's namespace."""
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


def _resolve_hub_path(uri: str) -> Path:
    from .hub.client import resolve_adapter_path

    return resolve_adapter_path(uri)


def _read_converted(path: Path) -> Adapter | None:
    from .verbs.conversion import read_converted

    return read_converted(path)


register_resolver("hf://", _resolve_hub_path)  # the composition root wires the Hub into the format layer
register_foreign_reader(_read_converted)  # ... and the format codecs, so load() reads every format

__all__ = [
    "__version__", "registry",
    # adapters on disk
    "Adapter", "load", "save", "validate", "new_manifest", "SPEC_VERSION",
    # applying to a live model
    "attach", "attached", "detach", "activate", "merge_into", "unmerge", "adapter_ids",
    # the verbs
    "convert", "read_foreign", "write_foreign", "to_peft",
    "train_adapter", "TrainOptions", "acquire", "Acquisition", "answer_uncertainty", "star_scores",
    "merge_adapters", "compress_adapter", "extract_adapter", "port_adapter", "record_base", "make_explicit",
    "require_explicit", "port_live",
    "fingerprint_module", "fingerprint_checkpoint",
    # the reference quantiser (spec 6.12)
    "QuantSpec", "Quantized", "quantize", "dequantize", "requantize", "fake_quantize", "fits_grid",
    # decoding-time composition of models (EFT, proxy-tuning)
    "compose", "Composition", "CompositionProcessor", "Sampling", "Term", "eft_terms",
    # writing plugins: methods, delta kinds, codecs, backends
    "Method", "hookimpl", "DeltaKind", "WeightDeltaKind", "promoted", "function_shape", "lowrank_entry",
    "weight_function", "is_transposed", "function_weight", "held_quantized", "PrefixedCall",
    "multi_lora_rows", "block_apply",
    "ForeignFormat", "TensorCodec", "ApplyBackend", "BUILTIN_CODECS",
    # writing a method's train verb
    "TrainSession", "TrainableDelta", "inject", "module_entry", "adapter_dtype", "orthonormality",
    "recipe_factors", "recipe_writable", "derived_tensors", "ldu_rows", "pissa_factors", "olora_factors",
    "svd_bottom_factors",
    "select_modules", "select_targets", "matches_targets", "pattern_value", "TARGETS_SCHEMA", "layer_index",
    # writing a foreign-format codec
    "read_tensor_file", "read_pickle_tensors", "write_tensor_file", "read_json_object", "write_folder", "tensor_names",
    "base_shapes", "base_fingerprint", "one_value", "lora_scale", "alpha_for", "lowrank_factors", "lowrank_adapter",
    "base_config", "base_tensor", "factor_shape", "attention_heads", "rope_permute", "peft_pattern",
    # errors (adapterfmt.errors)
    "AdapterError", "AdapterNote", "FormatError", "SpecVersionError", "ChecksumError", "UnsafePathError", "UnknownExtensionError",
    "LimitError", "MissingFileError", "BaseMismatchError", "PluginError", "UnsupportedError", "OutputExistsError",
    "HubError", "RepoNotFoundError", "RevisionNotFoundError", "NotAnAdapterRepoError", "HubAuthError",
    "HubTransferError", "PushConflictError",
]
