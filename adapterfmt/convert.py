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

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import manifest as mf
from .adapter import MANIFEST_FILE, Adapter, load, save
from .atomic import atomic_dir, check_output
from .errors import FormatError, UnsupportedError
from .fingerprint import read_checkpoint_headers
from .registry import formats
from .safetensors_io import read_header, read_tensor, write_file

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
        from .errors import MissingFileError

        raise MissingFileError("no such adapter file or folder", path=path)
    if is_adapterfmt(path):
        return ADAPTERFMT
    for name, codec in sorted(formats().items()):
        if codec.detect(path):
            return name
    known = ", ".join([ADAPTERFMT, *sorted(formats())])
    raise FormatError(f"not an adapter in any known format (known: {known})", path=path)


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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], to: str | None = None, *,
            overwrite: bool = False, source_format: str | None = None, single_file: bool | None = None,
            **options: Any) -> ConvertReport:
    """Convert the adapter at ``src`` into format ``to`` at ``dst``.

    The source format is detected. ``to`` defaults to ``"adapterfmt"`` for a foreign source; an
    adapterfmt source needs ``to``. ``options`` go to the codecs (e.g. ``base=`` for shapes the
    foreign file lacks, ``allow_pickle=True`` for PEFT's ``.bin``); ``single_file`` picks adapterfmt's form.
    """
    src, dst = Path(src), Path(dst)
    check_output(dst, overwrite)
    source_format = source_format or detect_format(src)
    if to is None:
        if source_format == ADAPTERFMT:
            known = ", ".join(sorted(formats())) or "none installed"
            raise UnsupportedError(f"the source is already adapterfmt; name the target format with to= / --to "
                                   f"({known})", path=src)
        to = ADAPTERFMT
    if to != ADAPTERFMT:
        get_format(to)
    read_opts = {k: v for k, v in options.items() if k in ("base", "allow_pickle")}
    write_opts = {k: v for k, v in options.items() if k not in read_opts}
    adapter = read_foreign(src, source_format, **read_opts)
    if to == ADAPTERFMT:
        save(adapter, dst, overwrite=overwrite, single_file=single_file)
    else:
        write_foreign(adapter, dst, to, overwrite=overwrite, **write_opts)
    return ConvertReport(str(src), str(dst), source_format, to, adapter.method, len(adapter.modules),
                         len(adapter.tensor_names()))


def to_peft(adapter: Adapter, folder: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``adapter`` as a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    return write_foreign(adapter, folder, "peft", overwrite=overwrite)


# ----- helpers for codecs (public API) --------------------------------------------------------------
def read_tensor_file(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file, and its ``__metadata__``, through the checked reader."""
    header = read_header(path)
    return {name: read_tensor(header, name) for name in header.tensors}, dict(header.metadata)


def write_tensor_file(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file with deterministic bytes (sorted names, canonical header)."""
    write_file(path, {k: v.contiguous() for k, v in tensors.items()}, metadata)


def base_shapes(base: BaseLike) -> dict[str, tuple[int, ...]]:
    """``{parameter name: shape}`` of a base model: a safetensors checkpoint (file or folder), a live
    module (parameters and buffers), or such a mapping already."""
    if isinstance(base, nn.Module):
        return {n: tuple(t.shape) for n, t in (*base.named_parameters(), *base.named_buffers())}
    if isinstance(base, Mapping):
        return {n: tuple(s) for n, s in base.items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for header in read_checkpoint_headers(base):
        shapes.update({n: tuple(info.shape) for n, info in header.tensors.items()})
    return shapes


__all__ = ["ADAPTERFMT", "ConvertReport", "convert", "detect_format", "read_foreign", "write_foreign", "to_peft",
           "read_tensor_file", "write_tensor_file", "base_shapes", "is_adapterfmt"]
