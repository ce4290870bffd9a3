"""The :class:`Adapter` object and reading / writing it in both file forms.

Folder form: ``<dir>/adapter.json`` (the manifest) + ``<dir>/adapter.safetensors`` (the tensors).
Single-file form: one ``.safetensors`` file whose ``__metadata__["adapterfmt"]`` holds the manifest JSON.
Tensors are read lazily, one at a time, from the header this package parsed and checked itself.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ..errors import ChecksumError, FormatError, MissingFileError, UnsafePathError
from . import manifest as mf
from .atomic import atomic_dir, atomic_file, check_output
from .jsontext import read_json_bytes
from .safetensors_io import (
    ITEMSIZE,
    Header,
    data_sha256,
    dtype_name,
    encode_header,
    header_table,
    layout,
    read_header,
    read_tensor,
    table_sha256,
    tensor_bytes,
)
from .structure import check_structure

if TYPE_CHECKING:
    import torch  # imported where tensors are read (safetensors_io): reading a header needs no torch

MANIFEST_FILE = "adapter.json"
TENSOR_FILE = "adapter.safetensors"


class Adapter:
    """An adapter: a manifest (JSON-shaped dict) plus named tensors.

    Build one in memory with ``Adapter(manifest, tensors)``; read one with :func:`load`. Tensors of a
    loaded adapter stay on disk until asked for.
    """

    def __init__(self, manifest: mf.Manifest, tensors: Mapping[str, torch.Tensor] | None = None, *,
                 source: Path | None = None, headers: list[Header] | None = None) -> None:
        self.manifest = manifest
        self.source = source
        self._memory: dict[str, torch.Tensor] = dict(tensors or {})
        self._where: dict[str, Header] = {}
        for header in headers or ():
            for name in header.tensors:
                if name in self._where or name in self._memory:
                    raise FormatError(f"tensor {name!r} is stored twice", path=header.path)
                self._where[name] = header
        self._all_names = frozenset(self._memory) | frozenset(self._where)
        self.converted_from: str | None = None
        """The foreign format :func:`load` converted this adapter from in memory (None: read as adapterfmt)."""
        if headers is None:
            self._list_features()

    def _list_features(self) -> None:
        """Spec 9: an adapter built in memory lists in ``must_understand`` the 1.2 features its lowrank entries
        use (``lora_mid``, ``params.base_part``) and ``base.quantization``, so every writer of it follows the rule."""
        modules = self.manifest.get("modules")
        if not isinstance(modules, dict):
            return
        lowrank = {m: e for m, e in modules.items() if isinstance(e, dict) and e.get("kind") == "lowrank"}
        roles = {m: ["lora_mid"] for m in lowrank
                 if f"{m}.lora_mid" in self._all_names or any(n.startswith(f"{m}.lora_mid.") for n in self._all_names)}
        listed = self.manifest.get("must_understand", [])
        missing = [f for f in [*mf.required_features(lowrank, roles), *mf.manifest_features(self.manifest)]
                   if f not in listed]
        if missing:
            self.manifest["must_understand"] = [*listed, *missing]

    # ----- manifest views -------------------------------------------------------------------------
    @property
    def method(self) -> str:
        return self.manifest["method"]["name"]

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["method"].setdefault("config", {})

    @property
    def modules(self) -> dict[str, dict[str, Any]]:
        return self.manifest["modules"]

    @property
    def base(self) -> dict[str, Any]:
        return self.manifest.setdefault("base", {})

    # ----- tensors --------------------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        return sorted(self._all_names)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._memory:
            return tuple(self._memory[name].shape)
        return self._where[name].tensors[name].shape

    def stored_dtype(self, name: str) -> str:
        if name in self._memory:
            return dtype_name(self._memory[name].dtype)
        return self._where[name].tensors[name].dtype

    def tensor(self, name: str) -> torch.Tensor:
        """One stored tensor, read from disk on first use."""
        if name not in self._memory:
            header = self._where.get(name)
            if header is None:
                raise FormatError(f"adapter has no tensor {name!r}", path=self.source)
            self._memory[name] = read_tensor(header, name)
        return self._memory[name]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor, by name (reads all of them)."""
        return {name: self.tensor(name) for name in self.tensor_names()}

    def roles(self, module: str) -> list[str]:
        """Roles of the module's kind that are stored for it (an encoded role counts once, by its role name)."""
        from ..plugin.registry import get_kind

        entry = self.modules[module]
        required, optional = get_kind(entry["kind"], path=self.source).roles(entry)
        enc = entry.get("encoding", {})
        names = self._all_names
        return [r for r in (*required, *optional)
                if f"{module}.{r}" in names or (r in enc and any(n.startswith(f"{module}.{r}.") for n in names))]

    def module_tensors(self, module: str) -> dict[str, torch.Tensor]:
        """Tensors of one module by role, decoded if stored with a compression codec.

        Raises :class:`FormatError` (naming the file) when a required role is missing or the values break the
        kind's rules (unsorted sparse indices ...), so no verb ever sees an incomplete or invalid module.
        """
        from ..plugin.registry import get_kind

        entry = self.modules[module]
        enc = entry.get("encoding", {})
        out: dict[str, torch.Tensor] = {}
        for role in self.roles(module):
            if role in enc:
                from .codecs import decode

                out[role] = decode(self, module, role, enc[role])
            else:
                out[role] = self.tensor(f"{module}.{role}")
        out.update({role: self.tensor(name) for role, name in mf.shared_tensors(entry).items()})
        kind = get_kind(entry["kind"], path=self.source)
        missing = [r for r in kind.roles(entry)[0] if r not in out]
        if missing:
            raise FormatError(f"module {module!r} ({entry['kind']}): tensor {module}.{missing[0]} is missing",
                              path=self.source)
        try:
            kind.check_data(module, entry, out)
        except FormatError as e:
            raise FormatError(e.message, path=self.source) from None
        return out

    def nbytes(self) -> int:
        """Bytes of tensor data (what the tensors occupy on disk, headers excluded)."""
        return sum(math.prod(self.shape(n)) * ITEMSIZE[self.stored_dtype(n)] for n in self.tensor_names())

    def __repr__(self) -> str:
        return f"Adapter(method={self.method!r}, modules={len(self.modules)}, source={self.source})"


# ----- reading ----------------------------------------------------------------------------------------
def safe_member(root: Path, rel: str) -> Path:
    """Resolve a manifest-relative file path, refusing anything that escapes ``root``."""
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or "\\" in rel or rel in ("", ".") or ":" in rel:
        raise UnsafePathError(f"file path {rel!r} in the manifest escapes the adapter folder", path=root)
    full = root / Path(*p.parts)
    if not full.resolve().is_relative_to(root.resolve()):
        raise UnsafePathError(f"file path {rel!r} in the manifest resolves outside the adapter folder", path=root)
    return full


def load(path: str | os.PathLike[str], *, verify: bool = True, understood: tuple[str, ...] | None = None) -> Adapter:
    """Read an adapter in either file form (or ``hf://owner/name@rev``); checks the format and, if ``verify``,
    every checksum and the structure (tensors present, none extra, shapes fit each kind). A path in a
    foreign format a registered reader recognises (a PEFT folder ...) is converted in memory."""
    adapter = _read(path, verify=verify, understood=understood)
    if verify:
        check_structure(adapter)
    return adapter


Resolver = Callable[[str], Path]
_RESOLVERS: dict[str, Resolver] = {}


def register_resolver(scheme: str, resolver: Resolver) -> None:
    """Let :func:`load` (and every verb that reads adapters) accept paths that start with ``scheme``
    (``"hf://"``): ``resolver`` turns one into a local path. The package root registers the Hub's."""
    _RESOLVERS[scheme] = resolver


ForeignReader = Callable[[Path], Adapter | None]
_FOREIGN_READERS: list[ForeignReader] = []


def register_foreign_reader(reader: ForeignReader) -> None:
    """Let :func:`load` read a folder or file that is not adapterfmt: ``reader`` returns the adapter there,
    converted in memory (``converted_from`` set), or None when it does not recognise the path. The package
    root registers the foreign-format codecs' (:func:`adapterfmt.verbs.conversion.read_converted`)."""
    if reader not in _FOREIGN_READERS:
        _FOREIGN_READERS.append(reader)


def _read_converted(path: Path) -> Adapter | None:
    for reader in _FOREIGN_READERS:
        adapter = reader(path)
        if adapter is not None:
            return adapter
    return None


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """A local path for ``path``, through the resolver registered for its scheme if it has one."""
    if isinstance(path, str):
        for scheme, resolver in _RESOLVERS.items():
            if path.startswith(scheme):
                return resolver(path)
    return Path(path)


def _understood(raw: object, understood: tuple[str, ...] | None) -> tuple[str, ...]:
    """``understood``, else the plugins' extensions, loaded only when the manifest's ``must_understand`` names
    more than the core (so reading a core adapter imports no plugin)."""
    if understood is not None:
        return understood
    listed = raw.get("must_understand") if isinstance(raw, dict) else None
    if not isinstance(listed, list) or all(isinstance(x, str) and x in mf.CORE_FIELDS | mf.FEATURES for x in listed):
        return ()
    from ..plugin.registry import understood_extensions

    return understood_extensions()


def _read(path: str | os.PathLike[str], *, verify: bool, understood: tuple[str, ...] | None) -> Adapter:
    path = resolve_path(path)
    if path.is_dir():
        mpath = path / MANIFEST_FILE
        if not mpath.is_file():
            if (converted := _read_converted(path)) is not None:
                return converted
            raise MissingFileError(f"not an adapter folder: {MANIFEST_FILE} is missing", path=path)
        safe_member(path, MANIFEST_FILE)  # a link out of the folder is refused, as for the tensor files
        raw = mf.loads(read_json_bytes(mpath), path=mpath)
        manifest = mf.check_manifest(raw, path=mpath, understood=_understood(raw, understood))
        if mf.SINGLE_FILE_KEY in manifest["files"]:
            raise FormatError(f"files key {mf.SINGLE_FILE_KEY!r} is only allowed in the single-file form", path=mpath)
        headers = []
        for rel, info in sorted(manifest["files"].items()):
            fpath = safe_member(path, rel)
            if not fpath.is_file():
                raise MissingFileError(f"tensor file {rel!r} named in {MANIFEST_FILE} is missing", path=path)
            header = read_header(fpath)
            if verify:
                _verify(fpath, header, info, manifest["spec_version"])
            headers.append(header)
        return Adapter(manifest, source=path, headers=headers)
    if not path.exists():
        raise MissingFileError("no such adapter file or folder", path=path)
    try:
        header = read_header(path)
    except FormatError:
        if (converted := _read_converted(path)) is not None:
            return converted
        raise
    text = header.metadata.get(mf.METADATA_KEY)
    if text is None:
        if (converted := _read_converted(path)) is not None:
            return converted
        raise FormatError(f"not an adapterfmt file: __metadata__ has no {mf.METADATA_KEY!r} manifest "
                          "(a foreign adapter? try `adapter convert`)", path=path)
    raw = mf.loads(text, path=path)
    manifest = mf.check_manifest(raw, path=path, understood=_understood(raw, understood))
    if set(manifest["files"]) != {mf.SINGLE_FILE_KEY}:
        raise FormatError(f"a single-file adapter's files must be exactly {{{mf.SINGLE_FILE_KEY!r}: ...}}", path=path)
    if verify:
        _verify(path, header, manifest["files"][mf.SINGLE_FILE_KEY], manifest["spec_version"])
    return Adapter(manifest, source=path, headers=[header])


def _verify(path: Path, header: Header, info: Mapping[str, Any], version: str) -> None:
    """Check a tensor file against its ``files`` entry: the tensor table (spec >= 1.1), then the data."""
    table = info.get("table_sha256")
    if table is None and mf.parse_version(version, path=path) >= (1, 1):
        raise ChecksumError(f"spec_version {version} requires table_sha256 in the files entry; it is missing",
                            path=path)
    if table is not None and (got := table_sha256(header_table(header))) != table:
        raise ChecksumError(f"checksum mismatch: tensor table (names, dtypes, shapes, offsets) has sha256 "
                            f"{got[:12]}..., manifest says {table[:12]}...; the header was modified", path=path)
    got = data_sha256(path, header)
    if got != info["sha256"]:
        raise ChecksumError(f"checksum mismatch: tensor data has sha256 {got[:12]}..., manifest says "
                            f"{info['sha256'][:12]}...; the file is corrupt or was modified", path=path)


# ----- writing ----------------------------------------------------------------------------------------
def save(adapter: Adapter, path: str | os.PathLike[str], *, single_file: bool | None = None,
         overwrite: bool = False) -> Path:
    """Write an adapter atomically. ``single_file`` defaults to True when ``path`` ends in ``.safetensors``.

    The output is byte-for-byte determined by the manifest and tensors. An existing ``path`` is only
    replaced with ``overwrite=True``. An adapter that :func:`~adapterfmt.format.validate` would refuse is not
    written (:class:`FormatError` naming ``path``), so no command can hand back a file that does not load.
    """
    path = Path(path)
    if single_file is None:
        single_file = path.suffix == ".safetensors"
    check_output(path, overwrite)
    tensors = adapter.tensors()
    manifest = mf.copy_manifest(adapter.manifest)
    sums = {"sha256": _sha_of(tensors),
            "table_sha256": table_sha256(layout({n: (dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()}))}
    if mf.parse_version(manifest["spec_version"]) < (mf.SPEC_MAJOR, mf.SPEC_MINOR):
        manifest["spec_version"] = mf.SPEC_VERSION  # the checksums below follow this version's rules
    _check_output_adapter(adapter, {**manifest, "files": {TENSOR_FILE: sums}}, path)
    if single_file:
        manifest["files"] = {mf.SINGLE_FILE_KEY: sums}
        head, order = encode_header(tensors, {mf.METADATA_KEY: mf.dumps(manifest)})
        if path.is_dir():
            raise FormatError("cannot write a single-file adapter over a folder", path=path)
        with atomic_file(path, overwrite=overwrite) as f:
            f.write(head)
            for name in order:
                f.write(tensor_bytes(tensors[name]))
    else:
        manifest["files"] = {TENSOR_FILE: sums}
        with atomic_dir(path, overwrite=overwrite) as tmp:
            with open(tmp / TENSOR_FILE, "wb") as f:
                head, order = encode_header(tensors, None)
                f.write(head)
                for name in order:
                    f.write(tensor_bytes(tensors[name]))
            (tmp / MANIFEST_FILE).write_text(mf.dumps_pretty(manifest), encoding="utf-8")
    adapter.manifest["files"] = manifest["files"]
    return path


def _check_output_adapter(adapter: Adapter, manifest: dict[str, Any], path: Path) -> None:
    from ..plugin.registry import understood_extensions
    try:
        mf.check_manifest(manifest, path=path, understood=understood_extensions())
        check_structure(adapter, deep=True)
    except FormatError as e:
        raise type(e)(f"not written, the adapter is invalid: {e.message}", path=path) from None


def _sha_of(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(tensor_bytes(tensors[name]))
    return h.hexdigest()


def iter_modules(adapter: Adapter) -> Iterator[tuple[str, dict[str, Any]]]:
    yield from sorted(adapter.modules.items())
