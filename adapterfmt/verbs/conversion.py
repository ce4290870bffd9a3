"""``adapter convert``: between adapterfmt and foreign formats (PEFT, and whatever plugins add).

A foreign format is a codec object (:class:`adapterfmt.ForeignFormat`) from the ``adapterfmt_formats``
hook. :func:`detect_format` finds which one holds a path; :func:`read_foreign` turns a foreign adapter
into an :class:`Adapter`; :func:`write_foreign` writes one out, atomically. :func:`convert` chains them.
Codecs never drop what they cannot represent: they raise, naming every field or tensor in the way.

Also here, for codecs (public API): reading and writing plain safetensors files with the checked reader
and deterministic writer, and the parameter shapes of a base model (a checkpoint path or a live module),
which some foreign formats need to fill in ``shape`` (PEFT's IA3 vectors do not say the other dimension).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import warnings
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..deltas import LowRank, lowrank_entry
from ..deltas.base_part import is_derived
from ..errors import AdapterNote, BaseMismatchError, FormatError, UnsupportedError, first_few
from ..format import manifest as mf
from ..format.adapter import MANIFEST_FILE, Adapter, load, resolve_path, save
from ..format.atomic import atomic_dir, check_output
from ..format.fingerprint import fingerprint_checkpoint, fingerprint_module, read_checkpoint_headers
from ..format.jsontext import read_json_object
from ..format.safetensors_io import read_header, read_tensor, write_file
from ..plugin.registry import formats

ADAPTERFMT = "adapterfmt"
"""The name ``convert`` uses for this package's own format."""

BaseLike = str | os.PathLike[str] | nn.Module | Mapping[str, tuple[int, ...]]
"""A base model for shape look-ups: checkpoint path, live module, or ``{parameter name: shape}``."""


def is_adapterfmt(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is an adapterfmt folder or single file (by its manifest, not its checksums)."""
    path = Path(path)
    if path.is_dir():
        return (path / MANIFEST_FILE).is_file()
    if path.is_file() and path.suffix == ".safetensors":
        try:
            return mf.METADATA_KEY in read_header(path).metadata
        except FormatError:
            return False
    return False


def detect_format(path: str | os.PathLike[str]) -> str:
    """The name of the format at ``path``: ``"adapterfmt"`` or a foreign codec's name."""
    path = Path(path)
    if not path.exists():
        from ..errors import MissingFileError

        raise MissingFileError("no such adapter file or folder", path=path)
    if is_adapterfmt(path):
        return ADAPTERFMT
    if (name := _foreign_format(path)) is not None:
        return name
    if path.is_file() and path.suffix == ".safetensors":
        read_header(path)  # a broken safetensors file: its own error (truncated, bad header ...) naming it
    known = ", ".join([ADAPTERFMT, *sorted(formats())])
    raise FormatError(f"not an adapter in any known format (known: {known})", path=path)


def _foreign_format(path: Path) -> str | None:
    """The name of the first foreign codec whose ``detect`` accepts ``path``, or None."""
    # a codec whose detect() is narrower than another's (it looks at tensor names, say) sets a higher
    # ``detect_priority`` so that it is asked first; ties go by name
    for _, name, codec in sorted((-getattr(c, "detect_priority", 0), n, c) for n, c in formats().items()):
        if codec.detect(path):
            return name
    return None


def read_converted(path: Path) -> Adapter | None:
    """The adapter at ``path`` in a foreign format, converted in memory by its codec (``converted_from`` and
    ``source`` set; an :class:`AdapterNote` says so), or None when no codec recognises ``path``. Registered
    by the package root as :func:`~adapterfmt.load`'s foreign reader, so every verb reads every format."""
    fmt = _foreign_format(path)
    if fmt is None:
        return None
    adapter = get_format(fmt).read(path)
    adapter.source, adapter.converted_from = path, fmt
    form = "folder" if path.is_dir() else "file"
    warnings.warn(AdapterNote(f"read {fmt} {form} {path} (converted in memory; `adapter convert` keeps a copy)"),
                  stacklevel=2)
    return adapter


def get_format(name: str) -> Any:
    try:
        return formats()[name]
    except KeyError:
        known = ", ".join([ADAPTERFMT, *sorted(formats())])
        raise UnsupportedError(f"unknown adapter format {name!r} (known: {known})") from None


def read_foreign(path: str | os.PathLike[str], fmt: str | None = None, **options: Any) -> Adapter:
    """Read the adapter at ``path`` (format detected unless ``fmt`` names it) into an :class:`Adapter`."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt == ADAPTERFMT:
        return load(path)
    return get_format(fmt).read(path, **options)


def write_foreign(adapter: Adapter, path: str | os.PathLike[str], fmt: str, *, overwrite: bool = False,
                  **options: Any) -> Path:
    """Write ``adapter`` to ``path`` in format ``fmt``, atomically (the codec writes into a staging path
    beside ``path``, which then replaces it); an existing ``path`` is replaced only with ``overwrite``."""
    path = Path(path)
    if fmt == ADAPTERFMT:
        return save(adapter, path, overwrite=overwrite, single_file=options.get("single_file"))
    codec = get_format(fmt)
    check_output(path, overwrite)
    with atomic_dir(path, overwrite=overwrite) as stage:
        stage.rmdir()  # the codec creates the folder or file itself
        try:
            codec.write(adapter, stage, **options)
        except BaseException:
            if stage.is_file():
                stage.unlink()
            raise
        if not stage.exists():
            raise FormatError(f"format {fmt!r} wrote nothing", path=path)
    return path


READ_OPTIONS = ("allow_pickle", "task_id")
"""Options only the reading codec takes: reading pickles, and the task of a per-task adapter (PEFT Poly)."""
SHARED_OPTIONS = ("base", "n_heads", "n_kv_heads")
"""Options :func:`convert` hands to both the reading and the writing codec (a codec ignores those it does
not use): the base model, and attention head counts for formats that reorder q/k rows (GGUF, torchtune)."""


@dataclass
class ConvertReport:
    """What :func:`convert` did."""

    src: str
    dst: str
    source_format: str
    target_format: str
    method: str
    modules: int
    tensors: int
    notes: list[str] = field(default_factory=list)
    """What the reading codec noted (e.g. a stored base weight dropped as equal to the base's)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], to: str | None = None, *,
            overwrite: bool = False, source_format: str | None = None, single_file: bool | None = None,
            **options: Any) -> ConvertReport:
    """Convert the adapter at ``src`` into format ``to`` at ``dst``.

    The source format is detected. ``to`` defaults to ``"adapterfmt"`` for a foreign source; an
    adapterfmt source needs ``to``. ``options`` go to the codecs (e.g. ``base=`` for shapes the
    foreign file lacks, ``allow_pickle=True`` for PEFT's ``.bin``; :data:`SHARED_OPTIONS` go to both
    sides); ``single_file`` picks adapterfmt's form. ``src`` may be ``hf://owner/name[@rev][/subfolder]``
    (an adapterfmt adapter, fetched and verified through the HF cache).
    """
    shown, dst = str(src), Path(dst)
    check_output(dst, overwrite)
    src = resolve_path(src)
    source_format = source_format or detect_format(src)
    if to is None:
        if source_format == ADAPTERFMT:
            known = ", ".join(sorted(formats())) or "none installed"
            raise UnsupportedError(f"the source is already adapterfmt; name the target format with to= / --to "
                                   f"({known})", path=src)
        to = ADAPTERFMT
    if to != ADAPTERFMT:
        get_format(to)
    read_opts = {k: v for k, v in options.items() if k in (*READ_OPTIONS, *SHARED_OPTIONS)}
    write_opts = {k: v for k, v in options.items() if k not in read_opts or k in SHARED_OPTIONS}
    adapter = read_foreign(src, source_format, **read_opts)
    if to == ADAPTERFMT:
        save(adapter, dst, overwrite=overwrite, single_file=single_file)
    else:
        write_foreign(adapter, dst, to, overwrite=overwrite, **write_opts)
    notes = ([] if source_format == ADAPTERFMT else
             list((adapter.manifest.get("provenance") or [{}])[-1].get("notes", [])))
    if to == ADAPTERFMT and not (adapter.base or {}).get("fingerprint"):
        notes.append(f"no base fingerprint recorded (no --base), so merge, bake and port cannot check the base; "
                     f"add it with `adapter fingerprint {dst} --base BASE`")
    return ConvertReport(shown, str(dst), source_format, to, adapter.method, len(adapter.modules),
                         len(adapter.tensor_names()), notes)


def to_peft(adapter: Adapter, folder: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``adapter`` as a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    return write_foreign(adapter, folder, "peft", overwrite=overwrite)


# ----- helpers for codecs (public API) --------------------------------------------------------------
def read_tensor_file(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file, and its ``__metadata__``, through the checked reader."""
    header = read_header(path)
    return {name: read_tensor(header, name) for name in header.tensors}, dict(header.metadata)


_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def read_pickle_tensors(path: str | os.PathLike[str], *, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` dict of a PyTorch pickle (PEFT's ``adapter_model.bin``, torchtune's
    ``adapter_model.pt``), read only when ``allow_pickle`` and only with ``torch.load(weights_only=True)``.
    A pickle that asks for anything but tensors (code to run, say), a corrupt file, or other contents
    are one :class:`FormatError` naming the file; nothing in it is executed."""
    path = Path(path)
    if not allow_pickle:
        raise UnsupportedError(f"only {path.name} (a pickle) is present; pass --allow-pickle (allow_pickle=True in "
                               "Python) to read it with torch.load(weights_only=True)", path=path.parent)
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: the outcome is reported below
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if not ln.startswith(_TORCH_BOILERPLATE)), lines[0] if lines else "")
        raise FormatError(f"refused to unpickle {path.name}: {reason}", path=path) from None
    except Exception as e:  # torch.load's many ways to fail on a file that is not a readable checkpoint
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        raise FormatError(f"cannot read {path.name} as a PyTorch checkpoint: {type(e).__name__}: {first}",
                          path=path) from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in data.items()):
        raise FormatError(f"{path.name} does not hold a {{name: tensor}} dict", path=path)
    return data


def write_tensor_file(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file with deterministic bytes (sorted names, canonical header)."""
    write_file(path, {k: v.contiguous() for k, v in tensors.items()}, metadata)


def base_shapes(base: BaseLike) -> dict[str, tuple[int, ...]]:
    """``{parameter name: shape}`` of a base model: a safetensors checkpoint (file or folder), a live
    module (parameters and buffers), or such a mapping already."""
    if isinstance(base, nn.Module):
        return {n: tuple(t.shape) for n, t in (*base.named_parameters(remove_duplicate=False),
                                                *base.named_buffers(remove_duplicate=False))}
    if isinstance(base, Mapping):
        return {n: tuple(s) for n, s in base.items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for header in read_checkpoint_headers(base):
        shapes.update({n: tuple(info.shape) for n, info in header.tensors.items()})
    return shapes


def base_tensor(base: BaseLike, name: str) -> torch.Tensor:
    """The value of tensor ``name`` of a base model (a safetensors checkpoint or a live module), for
    foreign formats whose meaning depends on the base weights (PEFT's PiSSA / OLoRA, stored embeddings)."""
    if isinstance(base, nn.Module):
        found = dict((*base.named_parameters(remove_duplicate=False),  # tied weights under every name
                      *base.named_buffers(remove_duplicate=False))).get(name)
        if found is None:
            raise BaseMismatchError(f"the base model has no tensor {name!r}")
        return found.detach()
    if isinstance(base, Mapping):
        raise UnsupportedError(f"the values of {name!r} are needed, and the base is given by shapes only")
    for header in read_checkpoint_headers(base):
        if name in header.tensors:
            return read_tensor(header, name)
    raise BaseMismatchError(f"the base checkpoint has no tensor {name!r}", path=base)


def factor_shape(kind: str, roles: Mapping[str, torch.Tensor]) -> list[int]:
    """The function-layout weight shape that LoHa (``hadamard``) or LoKr (``kronecker``) factors imply:
    a Linear weight's for 2-D factors (a conv's flattened ``[out, n_in]``), a conv's for LoKr's 4-D ``lokr_w2``."""
    if kind == "hadamard":
        return [roles["hada_w1_a"].shape[0], roles["hada_w1_b"].shape[1]]
    w1 = list(roles["lokr_w1"].shape) if "lokr_w1" in roles else [roles["lokr_w1_a"].shape[0],
                                                                    roles["lokr_w1_b"].shape[1]]
    w2 = list(roles["lokr_w2"].shape) if "lokr_w2" in roles else [roles["lokr_w2_a"].shape[0],
                                                                    *roles["lokr_w2_b"].shape[1:]]
    return [w1[0] * w2[0], *(a * b for a, b in zip(w1[1:] + [1] * (len(w2) - len(w1)), w2[1:]))]


def tensor_names(path: str | os.PathLike[str]) -> list[str]:
    """The tensor names of a ``.safetensors`` file, from its header (cheap, for ``detect``); empty when
    ``path`` is not a readable ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        return []
    try:
        return list(read_header(path).tensors)
    except FormatError:
        return []


def write_folder(path: str | os.PathLike[str], weights_file: str, tensors: Mapping[str, torch.Tensor],
                 config_file: str, config: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> Path:
    """Create the folder ``path`` holding a safetensors file and a JSON config (sorted keys, indented): the
    shape of PEFT, mlx-lm and torchtune adapters."""
    path = Path(path)
    path.mkdir(parents=True)
    write_tensor_file(path / weights_file, tensors, metadata)
    (path / config_file).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def one_value(values: Mapping[str, Any], fmt: str, what: str) -> Any:
    """The value all modules share (``{module: value}``), or an :class:`UnsupportedError` listing them all."""
    if len(set(values.values())) > 1:
        raise UnsupportedError(f"{fmt} has one {what} per adapter; modules differ: "
                               + ", ".join(f"{m}={v}" for m, v in sorted(values.items())))
    return next(iter(values.values()))


def base_fingerprint(base: BaseLike | None) -> dict[str, Any] | None:
    """The fingerprint of a base given as a live module or a checkpoint path (None otherwise)."""
    if isinstance(base, nn.Module):
        return fingerprint_module(base)
    if isinstance(base, str | os.PathLike):
        return fingerprint_checkpoint(base)
    return None


def lora_scale(alpha: float, r: int, rslora: bool = False) -> float:
    """The LoRA scale ``alpha / r`` (``alpha / sqrt(r)`` for rsLoRA)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def alpha_for(scale: float, r: int, rslora: bool = False) -> float:
    """An alpha for which :func:`lora_scale` gives exactly ``scale`` (an int when one does)."""
    alpha = scale * (math.sqrt(r) if rslora else r)
    if alpha == round(alpha) and lora_scale(round(alpha), r, rslora) == scale:
        return int(round(alpha))
    for cand in (alpha, math.nextafter(alpha, math.inf), math.nextafter(alpha, -math.inf)):
        if lora_scale(cand, r, rslora) == scale:
            return cand
    return alpha


Factors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]
"""``{module: (A [r, *in], B [out, r(, 1, 1)], scale)}``, dW = scale * B @ A in function layout."""


def lowrank_factors(adapter: Adapter, fmt: str, *, conv: bool = True) -> Factors:
    """The LoRA factors of an adapter made only of plain ``lowrank`` entries, for codecs of LoRA-only
    formats; every module the format ``fmt`` cannot hold (other kinds, DoRA magnitude, LoRA bias, a derived
    base part, a conv weight when ``conv`` is false) is named in one :class:`UnsupportedError`. An entry with
    a middle factor or an explicit base part (spec 6.2.1) gives the plain factors of rank ``r + r0`` (exact)."""
    out: Factors = {}
    bad = []
    factored = {"lora_A", "lora_B", "lora_mid", "init_A", "init_B", "init_mid"}
    for module, entry in sorted(adapter.modules.items()):
        roles = set(adapter.roles(module))
        why = (f"kind {entry['kind']}" if entry["kind"] != "lowrank" else
               f"role(s) {', '.join(sorted(roles - factored))}" if not roles <= factored else
               "a derived params.base_part (make it explicit with the base first)" if is_derived(entry) else
               f"a {len(entry['shape'])}-D weight" if not conv and len(entry["shape"]) != 2 else None)
        if why:
            bad.append(f"{module} ({why})")
            continue
        t = adapter.module_tensors(module)
        if roles == {"lora_A", "lora_B"} and "base_part" not in entry.get("params", {}):
            out[module] = (t["lora_A"], t["lora_B"], float(entry.get("params", {}).get("scale", 1.0)))
            continue
        b, a = LowRank().factors(entry, t)  # middle factor / explicit base part: plain factors of rank r + r0
        k = a.shape[0]
        out[module] = (a.reshape(k, *t["lora_A"].shape[1:]), b.reshape(b.shape[0], k, *t["lora_B"].shape[2:]), 1.0)
    if bad:
        raise UnsupportedError(f"the {fmt} format holds plain LoRA factors only; cannot represent: " + "; ".join(bad))
    return out


def lowrank_adapter(factors: Factors, *, method: str = "lora", config: Mapping[str, Any] | None = None,
                    provenance: Mapping[str, Any], base: BaseLike | None = None, base_name: str | None = None,
                    embeddings: Collection[str] = (), path: object = None) -> Adapter:
    """An adapter of ``lowrank`` entries from LoRA factors read from a foreign file. The stored shape is
    the function shape ``[out, *in]``, or its reverse (``transposed``) for the modules in ``embeddings``
    (known to be embeddings, ``[num, dim]``, whatever the shapes) and where ``base`` stores the weight
    that way (GPT-2 Conv1D); with a ``base``, a module it lacks is an error naming them all."""
    shapes = base_shapes(base) if base is not None else None
    modules, tensors, missing = {}, {}, []
    for module, (a, b, scale) in sorted(factors.items()):
        fshape = [b.shape[0], *a.shape[1:]]
        transposed = module in embeddings
        if shapes is not None:
            stored = shapes.get(f"{module}.weight")
            if stored is None:
                missing.append(module)
                continue
            transposed = transposed or len(fshape) == 2 and list(stored) == fshape[::-1] != fshape
        modules[module] = lowrank_entry(fshape[::-1] if transposed else fshape, scale, transposed=transposed)
        tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"] = a, b
    if missing:
        raise BaseMismatchError(f"the base model has no weight for {len(missing)} module(s): {first_few(missing)}",
                                path=path)
    manifest = mf.new_manifest(method, modules, config=config, provenance=[provenance],
                               base={"name": base_name, "revision": None, "fingerprint": base_fingerprint(base)})
    return Adapter(manifest, tensors)


def base_config(base: BaseLike | None) -> dict[str, Any]:
    """The base model's config: a live transformers model's ``.config``, or ``config.json`` beside a
    checkpoint; empty when there is none."""
    if isinstance(base, nn.Module):
        cfg = getattr(base, "config", None)
        return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg)) if cfg is not None else {}
    if isinstance(base, str | os.PathLike):
        p = Path(base)
        p = p if p.is_dir() else p.parent
        if (p / "config.json").is_file():
            return read_json_object(p / "config.json")
    return {}


def attention_heads(base: BaseLike | None, n_heads: int | None = None, n_kv_heads: int | None = None,
                    *, why: str = "", path: str | os.PathLike[str] | None = None) -> tuple[int, int]:
    """``(num_attention_heads, num_key_value_heads)``: given, or from the base's config (a live
    transformers model's ``.config``, or ``config.json`` beside a checkpoint); the error names ``path``."""
    if n_heads is None:
        cfg = base_config(base)
        if cfg.get("num_attention_heads"):
            n_heads = int(cfg["num_attention_heads"])
            n_kv_heads = n_kv_heads or cfg.get("num_key_value_heads")
    if n_heads is None:
        raise UnsupportedError(f"{why}: the number of attention heads is needed; pass --n-heads/--n-kv-heads "
                               "(n_heads= / n_kv_heads= in Python) or a --base whose config.json gives "
                               "num_attention_heads", path=path)
    return n_heads, int(n_kv_heads or n_heads)


def rope_permute(t: torch.Tensor, n_heads: int, *, inverse: bool = False) -> torch.Tensor:
    """Reorder the output rows of a q/k projection (or its LoRA B) between Hugging Face's rotate-half
    RoPE layout and the interleaved layout of Meta's Llama code (used by llama.cpp and torchtune):
    within each head, row ``j`` of the first half and row ``j`` of the second half become rows
    ``2j`` and ``2j + 1``. ``inverse`` goes back."""
    rows = t.shape[0]
    if rows % (2 * n_heads):
        raise UnsupportedError(f"{rows} rows do not split into {n_heads} heads of even size")
    half = rows // n_heads // 2
    split = (n_heads, half, 2) if inverse else (n_heads, 2, half)
    return t.reshape(*split, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()


__all__ = ["tensor_names", "base_tensor", "factor_shape", "write_folder", "one_value", "base_fingerprint", "lora_scale", "alpha_for", "Factors", "lowrank_factors",
           "lowrank_adapter", "base_config", "attention_heads", "rope_permute",
           "ADAPTERFMT", "ConvertReport", "convert", "detect_format", "read_foreign", "write_foreign", "to_peft",
           "read_tensor_file", "read_pickle_tensors", "write_tensor_file", "base_shapes", "is_adapterfmt",
           "read_converted"]


def peft_pattern(patterns: Mapping[str, Any] | None, path: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` rule (diffusers' metadata uses it too): the value of the first
    key, a regex, that matches a dotted suffix of ``path``; else ``default``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default
