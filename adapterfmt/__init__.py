"""adapterfmt: a versioned on-disk format for parameter-efficient adapters, and the toolkit around it.

The public API is what this module exports; plugins (built-in ones included) use nothing else.
"""

__version__ = "0.1.0"

from . import registry
from .adapter import Adapter, load, save
from .apply import activate, adapter_ids, attach, attached, detach, merge_into, unmerge
from .codecs import BUILTIN_CODECS
from .compress import compress_adapter
from .deltas import DeltaKind, function_shape, lowrank_entry
from .errors import (
    AdapterError,
    BaseMismatchError,
    ChecksumError,
    FormatError,
    MissingFileError,
    OutputExistsError,
    PluginError,
    SpecVersionError,
    UnsafePathError,
    UnsupportedError,
)
from .fingerprint import fingerprint_checkpoint, fingerprint_module
from .hookspecs import hookimpl
from .manifest import SPEC_VERSION, new_manifest
from .method import Method
from .protocols import ApplyBackend, ForeignFormat, TensorCodec
from .targets import pattern_value, select_modules
from .train import TrainableDelta, TrainSession, adapter_dtype, inject, module_entry
from .validate import validate

__all__ = [
    "__version__", "registry",
    "Adapter", "load", "save", "validate", "new_manifest", "SPEC_VERSION",
    "attach", "attached", "detach", "activate", "merge_into", "unmerge", "adapter_ids",
    "DeltaKind", "function_shape", "lowrank_entry", "Method", "hookimpl",
    "ForeignFormat", "TensorCodec", "ApplyBackend", "BUILTIN_CODECS", "compress_adapter",
    "fingerprint_module", "fingerprint_checkpoint",
    "TrainSession", "TrainableDelta", "inject", "module_entry", "adapter_dtype", "select_modules", "pattern_value",
    "AdapterError", "FormatError", "SpecVersionError", "ChecksumError", "UnsafePathError", "MissingFileError",
    "BaseMismatchError", "PluginError", "UnsupportedError", "OutputExistsError",
]
