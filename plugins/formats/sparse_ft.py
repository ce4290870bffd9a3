"""The sparse fine-tuning layouts in the wild, for ``adapter convert``: composable-sft (LT-SFT) and SpIEL.

``composable_sft`` (cambridgeltl/composable-sft, ``SFT.save``): a folder holding ``pytorch_diff.bin``, a
``torch.save`` pickle ``{"diffs": {param: {"size", "index_steps", "values"}}, "abs": {param: tensor}}``.
A diff's flat positions are **column-major** (first dimension fastest), sorted, stored as the first position and
then the gaps; ``values`` follow them. Read: ``X.weight`` / ``X.bias`` diffs become ``sparse`` entries of module
``X`` (``parameter`` ``bias`` for a bias), positions turned into sorted row-major int64 indices; ``abs`` (fully
trained parameters, heads) become ``dense`` ``replace`` entries (``value``, and ``bias_value`` when the bias is
absolute too). Refused, one line naming the parameter: a module with both a weight and a bias diff, or an
absolute part beside a diff (1.0 holds one entry per module); tensors of more than 2 dimensions or of 2**31
elements or more (composable-sft's own decoder reads those wrongly); positions that are not increasing or out
of range; a gap list not as long as the values. The pickle is read only with ``allow_pickle`` and only through
``torch.load(weights_only=True)`` (numpy's scalar type allowed: the authors' first position is a numpy int).
Written: ``sparse`` entries (scale folded into the values) and ``dense`` replace entries.

``spiel`` (AlanAnsell/peft, the SpIEL fork of PEFT; ``adapter_config.json`` with ``peft_type: "SFT"``):
``adapter_model.safetensors`` (or the pickle ``adapter_model.bin``, with ``allow_pickle``) with
``base_model.model.<module>.sft_delta.indices`` (int32 or int64, flat row-major, unsorted after reselection)
and ``...sft_delta.values``. The file has no weight shapes: reading needs ``base`` (``--base``). Read: indices
sorted (values permuted), widened to int64; repeats and out-of-range positions refused. Written: sorted
indices, int32 when the weight has fewer than 2**31 elements, and the config's ``peft_type``, ``target_modules``,
``num_deltas`` (per module) and ``dtype``; only ``sparse`` entries on ``weight`` (others refused, named).
"""

from __future__ import annotations

import math
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

import adapterfmt as af

DIFF_FILE = "pytorch_diff.bin"
SPIEL_CONFIG, SPIEL_WEIGHTS, SPIEL_PICKLE = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PREFIX, SUFFIX = "base_model.model.", ".sft_delta."


def colmajor_to_rowmajor(pos: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Flat column-major positions (first dimension fastest) of a tensor of ``size`` as row-major ones."""
    coords, rest = [], pos.clone()
    for s in size:
        coords.append(rest % s)
        rest = torch.div(rest, s, rounding_mode="floor")
    flat = torch.zeros_like(pos)
    for c, s in zip(coords, size, strict=True):
        flat = flat * s + c
    return flat


def rowmajor_to_colmajor(pos: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    return colmajor_to_rowmajor(pos, tuple(reversed(size)))


def _split(param: str) -> tuple[str, str]:
    module, _, leaf = param.rpartition(".")
    return module, leaf


def decode_diff(name: str, enc: Any, path: Path) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor]:
    """(shape, sorted row-major int64 indices, values) of one composable-sft diff, or one refusal."""
    where = f"diffs[{name!r}]"
    if not isinstance(enc, Mapping) or set(enc) != {"size", "index_steps", "values"}:
        raise af.FormatError(f"{where}: expected keys size, index_steps, values", path=path)
    size = tuple(int(s) for s in enc["size"])
    if len(size) > 2 or math.prod(size) >= 2**31:
        raise af.FormatError(f"{where}.size {list(size)}: composable-sft decodes tensors of more than 2 dimensions "
                             "or 2**31 elements wrongly; refusing rather than guessing", path=path)
    values = enc["values"]
    steps = torch.tensor([int(s) for s in enc["index_steps"]], dtype=torch.int64)
    if not isinstance(values, torch.Tensor) or values.dim() != 1 or steps.numel() != values.numel():
        raise af.FormatError(f"{where}: {steps.numel()} index_steps for values of shape "
                             f"{list(getattr(values, 'shape', []))}", path=path)
    pos = torch.cumsum(steps, 0)
    if pos.numel() and (int(pos[0]) < 0 or bool((steps[1:] <= 0).any()) or int(pos[-1]) >= math.prod(size)):
        raise af.FormatError(f"{where}.index_steps: positions must increase and stay below {math.prod(size)}",
                             path=path)
    flat = colmajor_to_rowmajor(pos, size)
    order = torch.argsort(flat)
    return size, flat[order], values[order]


def load_diff_file(path: Path, allow_pickle: bool) -> dict[str, Any]:
    if not allow_pickle:
        raise af.UnsupportedError(f"{DIFF_FILE} is a pickle; pass --allow-pickle (allow_pickle=True in Python) to "
                                  "read it with torch.load(weights_only=True)", path=path)
    scalar = np._core.multiarray.scalar
    allowed = [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, type(np.dtype(np.int64))]
    try:
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:  # refused or corrupt: one line
        raise af.FormatError(f"not a readable composable-sft pickle: {str(e).splitlines()[0][:200]}", path=path) from None
    if not isinstance(data, dict) or not set(data) <= {"diffs", "abs"}:
        raise af.FormatError("expected a dict with keys 'diffs' and 'abs'", path=path)
    return data


class ComposableSFT:
    name = "composable_sft"
    summary = "composable-sft / LT-SFT (pytorch_diff.bin: column-major sparse diffs + absolute heads)"

    def detect(self, path: Path) -> bool:
        return (path.is_dir() and (path / DIFF_FILE).is_file()) or (path.is_file() and path.name == DIFF_FILE)

    def read(self, path: Path, **options: Any) -> af.Adapter:
        file = path / DIFF_FILE if path.is_dir() else path
        data = load_diff_file(file, bool(options.get("allow_pickle", False)))
        modules: dict[str, dict[str, Any]] = {}
        tensors: dict[str, torch.Tensor] = {}
        for param, enc in data.get("diffs", {}).items():
            module, leaf = _split(param)
            if module in modules:
                raise af.FormatError(f"diffs[{param!r}]: module {module!r} has a diff on another parameter too; "
                                     "adapterfmt 1.0 holds one entry per module", path=file)
            shape, idx, values = decode_diff(param, enc, file)
            modules[module] = {"kind": "sparse", "shape": list(shape), "params": {"scale": 1.0},
                               **({"parameter": leaf} if leaf != "weight" else {})}
            tensors.update({f"{module}.indices": idx, f"{module}.values": values.contiguous()})
        for param, value in data.get("abs", {}).items():
            module, leaf = _split(param)
            entry = modules.get(module)
            if entry is not None and entry["kind"] != "dense":
                raise af.FormatError(f"abs[{param!r}]: module {module!r} has a sparse diff too; adapterfmt 1.0 "
                                     "holds one entry per module", path=file)
            if not isinstance(value, torch.Tensor) or leaf not in ("weight", "bias"):
                raise af.FormatError(f"abs[{param!r}]: expected the tensor of a weight or a bias", path=file)
            entry = modules.setdefault(module, {"kind": "dense", "shape": [], "params": {"mode": "replace"}})
            if leaf == "weight":
                entry["shape"] = list(value.shape)
                tensors[f"{module}.value"] = value.contiguous()
            else:
                tensors[f"{module}.bias_value"] = value.contiguous()
        for module, entry in modules.items():
            if entry["kind"] == "dense" and f"{module}.value" not in tensors:
                raise af.FormatError(f"abs: module {module!r} has an absolute bias without its weight, which a dense "
                                     "replace entry cannot hold", path=file)
        if not modules:
            raise af.FormatError("no diffs and no abs parameters", path=file)
        return af.Adapter(af.new_manifest("lt_sft", modules, provenance=[{"tool": "composable-sft"}]), tensors)

    def write(self, adapter: af.Adapter, path: Path, **options: Any) -> None:
        diffs: dict[str, Any] = {}
        abs_: dict[str, torch.Tensor] = {}
        for module, entry in adapter.modules.items():
            t = adapter.module_tensors(module)
            leaf = entry.get("parameter", "weight")
            if entry["kind"] == "sparse" and len(entry["shape"]) <= 2 and math.prod(entry["shape"]) < 2**31:
                size = tuple(entry["shape"])
                pos = rowmajor_to_colmajor(t["indices"], size)
                order = torch.argsort(pos)
                pos = pos[order]
                scale = float(entry.get("params", {}).get("scale", 1.0))
                diffs[f"{module}.{leaf}"] = {"size": torch.Size(size),
                                             "index_steps": torch.cat([pos[:1], pos[1:] - pos[:-1]]).tolist(),
                                             "values": (scale * t["values"][order]) if scale != 1 else t["values"][order]}
            elif entry["kind"] == "dense" and entry.get("params", {}).get("mode") == "replace" and leaf == "weight":
                abs_[f"{module}.weight"] = t["value"]
                if "bias_value" in t:
                    abs_[f"{module}.bias"] = t["bias_value"]
            else:
                raise af.UnsupportedError(f"module {module!r}: composable-sft holds sparse diffs of tensors up to 2-D "
                                          f"and absolute weights; this entry is {entry['kind']!r}", path=path)
        path.mkdir(parents=True)
        torch.save({"diffs": diffs, "abs": abs_}, path / DIFF_FILE)


class Spiel:
    name = "spiel"
    summary = "SpIEL (the authors' PEFT fork, peft_type SFT): sft_delta indices + values per module"
    detect_priority = 1  # narrower than PEFT's (which takes any folder with adapter_config.json)

    def detect(self, path: Path) -> bool:
        if not (path.is_dir() and (path / SPIEL_CONFIG).is_file()):
            return False
        try:
            return af.read_json_object(path / SPIEL_CONFIG).get("peft_type") == "SFT"
        except af.AdapterError:
            return False

    def read(self, path: Path, **options: Any) -> af.Adapter:
        config = af.read_json_object(path / SPIEL_CONFIG)
        if (path / SPIEL_WEIGHTS).is_file():
            state, _ = af.read_tensor_file(path / SPIEL_WEIGHTS)
        else:
            state = af.read_pickle_tensors(path / SPIEL_PICKLE, allow_pickle=bool(options.get("allow_pickle", False)))
        if options.get("base") is None:
            raise af.UnsupportedError("SpIEL files do not record the weights' shapes; pass --base (base= in Python)",
                                      path=path)
        shapes = af.base_shapes(options["base"])
        modules: dict[str, dict[str, Any]] = {}
        tensors: dict[str, torch.Tensor] = {}
        for key in sorted(state):
            if not (key.startswith(PREFIX) and key.endswith(SUFFIX + "indices")):
                if not (key.startswith(PREFIX) and key.endswith(SUFFIX + "values")):
                    raise af.FormatError(f"tensor {key!r} is not a SpIEL sft_delta tensor", path=path)
                continue
            module = key[len(PREFIX):-len(SUFFIX + "indices")]
            values = state.get(f"{PREFIX}{module}{SUFFIX}values")
            shape = shapes.get(f"{module}.weight")
            if values is None or shape is None:
                raise af.FormatError(f"{key}: no matching values tensor, or no {module}.weight in the base", path=path)
            idx = state[key].to(torch.int64)
            order = torch.argsort(idx)
            idx, values = idx[order], values[order]
            if idx.numel() != values.numel() or (idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all())) or (
                    idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= math.prod(shape))):
                raise af.FormatError(f"{key}: indices must be distinct, one per value, within the {list(shape)} weight",
                                     path=path)
            modules[module] = {"kind": "sparse", "shape": list(shape), "params": {"scale": 1.0}}
            tensors.update({f"{module}.indices": idx, f"{module}.values": values.contiguous()})
        if not modules:
            raise af.FormatError("no sft_delta tensors", path=path)
        known = {k: config[k] for k in ("density", "selection_algorithm", "reselection_steps") if k in config}
        return af.Adapter(af.new_manifest("spiel", modules, config=known, provenance=[{"tool": "spiel (peft fork)"}]),
                          tensors)

    def write(self, adapter: af.Adapter, path: Path, **options: Any) -> None:
        tensors: dict[str, torch.Tensor] = {}
        num_deltas: dict[str, int] = {}
        dtypes = set()
        for module, entry in adapter.modules.items():
            if entry["kind"] != "sparse" or entry.get("parameter", "weight") != "weight":
                raise af.UnsupportedError(f"module {module!r}: SpIEL holds sparse deltas of weights; this entry is "
                                          f"{entry['kind']!r} on {entry.get('parameter', 'weight')!r}", path=path)
            t = adapter.module_tensors(module)
            scale = float(entry.get("params", {}).get("scale", 1.0))
            small = math.prod(entry["shape"]) < 2**31
            tensors[f"{PREFIX}{module}{SUFFIX}indices"] = t["indices"].to(torch.int32 if small else torch.int64)
            tensors[f"{PREFIX}{module}{SUFFIX}values"] = t["values"] * scale if scale != 1 else t["values"]
            num_deltas[module] = int(t["indices"].numel())
            dtypes.add(str(t["values"].dtype).removeprefix("torch."))
        if len(dtypes) > 1:
            raise af.UnsupportedError(f"SpIEL stores one values dtype; this adapter has {sorted(dtypes)}", path=path)
        config = {"peft_type": "SFT", "target_modules": sorted(num_deltas), "num_deltas": num_deltas,
                  "dtype": dtypes.pop()}
        af.write_folder(path, SPIEL_WEIGHTS, tensors, SPIEL_CONFIG, config)


@af.hookimpl
def adapterfmt_formats() -> list[Any]:
    return [ComposableSFT(), Spiel()]
