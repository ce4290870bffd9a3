"""The public surface: every name of ``af.__all__`` stays importable from the package root, so moving a
module between sub-packages can never drop one silently (issue 13). Adding a name means adding it here."""

from __future__ import annotations

import importlib

import adapterfmt as af

PUBLIC = {
    "Adapter", "AdapterError", "AdapterNote", "ApplyBackend", "BUILTIN_CODECS", "BaseMismatchError", "ChecksumError", "DeltaKind",
    "ForeignFormat", "FormatError", "HubAuthError", "HubError", "HubTransferError", "LimitError", "Method",
    "MissingFileError", "NotAnAdapterRepoError", "OutputExistsError", "PluginError", "PushConflictError",
    "RepoNotFoundError", "RevisionNotFoundError", "SPEC_VERSION", "SpecVersionError", "TARGETS_SCHEMA",
    "TensorCodec", "TrainSession", "TrainableDelta", "UnknownExtensionError", "UnsafePathError", "UnsupportedError",
    "__version__", "activate", "adapter_dtype", "adapter_ids", "alpha_for", "attach", "attached", "attention_heads",
    "base_config", "base_fingerprint", "base_shapes", "base_tensor", "compress_adapter", "convert", "detach",
    "extract_adapter", "factor_shape", "fingerprint_checkpoint", "fingerprint_module", "function_shape", "hookimpl",
    "inject", "is_transposed", "load", "lora_scale", "lowrank_adapter", "lowrank_entry", "lowrank_factors",
    "matches_targets", "merge_adapters", "merge_into", "module_entry", "new_manifest", "one_value", "orthonormality",
    "pattern_value",
    "peft_pattern", "WeightDeltaKind", "promoted",
    "port_adapter", "read_foreign", "read_json_object", "read_pickle_tensors", "read_tensor_file", "record_base",
    "registry", "rope_permute", "save", "select_modules", "select_targets", "tensor_names", "to_peft", "unmerge",
    "validate", "weight_function", "write_folder", "write_foreign", "write_tensor_file",
    "make_explicit", "recipe_factors", "derived_tensors", "ldu_rows", "pissa_factors", "olora_factors",
    "svd_bottom_factors", "recipe_writable", "require_explicit",
    "multi_lora_rows", "block_apply", "compose", "Composition", "CompositionProcessor", "Sampling", "Term", "eft_terms",
    "train_adapter", "TrainOptions", "port_live", "layer_index",
    "QuantSpec", "Quantized", "quantize", "dequantize", "requantize", "fake_quantize", "fits_grid",
    "function_weight", "held_quantized", "PrefixedCall",
    "acquire", "Acquisition", "answer_uncertainty", "star_scores",
}
"""``af.__all__`` as of the layered tree (0.1.x); a name may be added, never dropped within a major version."""


def test_every_public_name_is_exported_and_resolves():
    assert PUBLIC <= set(af.__all__), sorted(PUBLIC - set(af.__all__))
    missing = [n for n in af.__all__ if not hasattr(af, n)]
    assert not missing, missing


def test_old_module_paths_that_plugins_use_still_import():
    conformance = importlib.import_module("adapterfmt.conformance")  # scaffolded plugins' tests import this path
    assert conformance.conformance_cases is importlib.import_module("adapterfmt.authoring.conformance").conformance_cases
    assert importlib.import_module("adapterfmt.tiny").build_tiny
