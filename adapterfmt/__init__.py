"""adapterfmt: a versioned on-disk format for parameter-efficient adapters, and the toolkit around it.

The public API is what this module exports; plugins (built-in ones included) use nothing else.
"""

from pathlib import Path

from ._version import __version__
from .deltas import DeltaKind, function_shape, lowrank_entry
from .deltas.modules import is_transposed, weight_function
from .errors import (
    AdapterError,
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
from .format.adapter import Adapter, load, register_resolver, save
from .format.codecs import BUILTIN_CODECS
from .format.fingerprint import fingerprint_checkpoint, fingerprint_module
from .format.jsontext import read_json_object
from .format.manifest import SPEC_VERSION, new_manifest
from .format.validate import validate
from .plugin import registry
from .plugin.hookspecs import hookimpl
from .plugin.protocols import ApplyBackend, ForeignFormat, TensorCodec
from .verbs.apply import activate, adapter_ids, attach, attached, detach, merge_into, unmerge
from .verbs.compress import compress_adapter
from .verbs.conversion import (
    alpha_for,
    attention_heads,
    base_config,
    base_fingerprint,
    base_shapes,
    base_tensor,
    convert,
    factor_shape,
    lora_scale,
    lowrank_adapter,
    lowrank_factors,
    one_value,
    read_foreign,
    read_pickle_tensors,
    read_tensor_file,
    rope_permute,
    tensor_names,
    to_peft,
    write_folder,
    write_foreign,
    write_tensor_file,
)
from .verbs.extract import extract_adapter
from .verbs.merge import merge_adapters
from .verbs.method import Method
from .verbs.port import port_adapter
from .verbs.targets import TARGETS_SCHEMA, matches_targets, pattern_value, select_modules, select_targets
from .verbs.train import TrainableDelta, TrainSession, adapter_dtype, inject, module_entry


def _resolve_hub_path(uri: str) -> Path:
    from .hub.client import resolve_adapter_path

    return resolve_adapter_path(uri)


register_resolver("hf://", _resolve_hub_path)  # the composition root wires the Hub into the format layer

__all__ = [
    "__version__", "registry",
    # adapters on disk
    "Adapter", "load", "save", "validate", "new_manifest", "SPEC_VERSION",
    # applying to a live model
    "attach", "attached", "detach", "activate", "merge_into", "unmerge", "adapter_ids",
    # the verbs
    "convert", "read_foreign", "write_foreign", "to_peft",
    "merge_adapters", "compress_adapter", "extract_adapter", "port_adapter",
    "fingerprint_module", "fingerprint_checkpoint",
    # writing plugins: methods, delta kinds, codecs, backends
    "Method", "hookimpl", "DeltaKind", "function_shape", "lowrank_entry", "weight_function", "is_transposed",
    "ForeignFormat", "TensorCodec", "ApplyBackend", "BUILTIN_CODECS",
    # writing a method's train verb
    "TrainSession", "TrainableDelta", "inject", "module_entry", "adapter_dtype",
    "select_modules", "select_targets", "matches_targets", "pattern_value", "TARGETS_SCHEMA",
    # writing a foreign-format codec
    "read_tensor_file", "read_pickle_tensors", "write_tensor_file", "read_json_object", "write_folder", "tensor_names",
    "base_shapes", "base_fingerprint", "one_value", "lora_scale", "alpha_for", "lowrank_factors", "lowrank_adapter",
    "base_config", "base_tensor", "factor_shape", "attention_heads", "rope_permute",
    # errors (adapterfmt.errors)
    "AdapterError", "FormatError", "SpecVersionError", "ChecksumError", "UnsafePathError", "UnknownExtensionError",
    "LimitError", "MissingFileError", "BaseMismatchError", "PluginError", "UnsupportedError", "OutputExistsError",
    "HubError", "RepoNotFoundError", "RevisionNotFoundError", "NotAnAdapterRepoError", "HubAuthError",
    "HubTransferError", "PushConflictError",
]
