"""adapterfmt: a versioned on-disk format for parameter-efficient adapters, and the toolkit around it.

The public API is what this module exports; plugins (built-in ones included) use nothing else.
"""

__version__ = "0.1.0"

from . import registry
from .adapter import Adapter, load, save
from .apply import activate, adapter_ids, attach, attached, detach, merge_into, unmerge
from .codecs import BUILTIN_CODECS
from .compress import compress_adapter
from .conversion import (
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
from .deltas import DeltaKind, function_shape, lowrank_entry
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
from .extract import extract_adapter
from .fingerprint import fingerprint_checkpoint, fingerprint_module
from .hookspecs import hookimpl
from .jsontext import read_json_object
from .manifest import SPEC_VERSION, new_manifest
from .merge import merge_adapters
from .method import Method
from .modules import is_transposed, weight_function
from .port import port_adapter
from .protocols import ApplyBackend, ForeignFormat, TensorCodec
from .targets import TARGETS_SCHEMA, matches_targets, pattern_value, select_modules, select_targets
from .train import TrainableDelta, TrainSession, adapter_dtype, inject, module_entry
from .validate import validate

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
