"""Publishing adapters to and fetching them from the Hugging Face Hub (or any Hub-compatible endpoint).

- :func:`push` uploads an adapter (either file form) with a generated model card in one commit, guarded
  by ``parent_commit`` so that two concurrent pushes cannot silently overwrite each other.
- :func:`pull` downloads only the adapter's files at a branch, tag or commit into the local HF cache,
  verifies every checksum of the manifest, and optionally writes a copy elsewhere with the resolved commit
  recorded in its provenance (the cache itself is never rewritten).
- :func:`resolve_adapter_path` turns ``hf://owner/name[@revision][/subfolder]`` into a local path through
  the cache; once pulled it works offline (``HF_HUB_OFFLINE=1``).

Token, endpoint, cache and offline mode come from the usual ``huggingface_hub`` settings (``HF_TOKEN`` or
``hf auth login``, ``HF_ENDPOINT``, ``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``), read when each
call is made. Every failure is raised as a :class:`HubError` subclass with a one-line message.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from . import manifest as mf
from .adapter import MANIFEST_FILE, TENSOR_FILE, Adapter, load, safe_member, save
from .atomic import atomic_dir, check_output
from .errors import (
    AdapterError,
    FormatError,
    HubAuthError,
    HubError,
    HubTransferError,
    MissingFileError,
    NotAnAdapterRepoError,
    PushConflictError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UnsupportedError,
)
from .validate import validate

SCHEME = "hf://"
CARD_FILE = "README.md"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
DEFAULT_BRANCH = "main"
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


# ----- settings, read at call time --------------------------------------------------------------------
def _hf():
    import huggingface_hub

    return huggingface_hub


def hub_endpoint() -> str:
    """``HF_ENDPOINT`` (read now, so that it can change after import), else huggingface_hub's default."""
    env = os.environ.get("HF_ENDPOINT")
    if env:
        return env.rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def hub_cache_dir() -> Path:
    """``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.upper() in constants.ENV_VARS_TRUE_VALUES
    return constants.HF_HUB_OFFLINE


def hub_token(explicit: str | None = None) -> str | None:
    """The token to use: ``explicit``, ``HF_TOKEN``, the token file under the current ``HF_HOME``, the login."""
    if explicit:
        return explicit
    env = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if env and env.strip():
        return env.strip()
    from huggingface_hub import constants

    path = os.environ.get("HF_TOKEN_PATH") or (
        os.path.join(os.environ["HF_HOME"], "token") if os.environ.get("HF_HOME") else None)
    if path and os.path.abspath(os.path.expanduser(path)) != os.path.abspath(constants.HF_TOKEN_PATH):
        p = Path(path).expanduser()
        text = p.read_text().strip() if p.is_file() else ""
        return text or None
    return _hf().get_token()


# ----- references -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None = None
    path: str = ""

    def __str__(self) -> str:
        return SCHEME + self.repo_id + (f"@{self.revision}" if self.revision else "") + (f"/{self.path}" if self.path else "")


def parse_ref(text: str, revision: str | None = None) -> HubRef:
    """Parse ``hf://owner/name[@rev][/path]`` or ``owner/name[@rev][/path]``; ``revision`` overrides ``@rev``."""
    body = text[len(SCHEME):] if text.startswith(SCHEME) else text
    if body.startswith("models/"):
        body = body[len("models/"):]
    if body.startswith(("datasets/", "spaces/", "buckets/", "kernels/")):
        raise HubError(f"{text!r}: only model repositories hold adapters")
    hf = _hf()
    try:
        uri = hf.parse_hf_uri(SCHEME + body)
        repo_id, rev, path = uri.id, uri.revision, uri.path_in_repo
    except AttributeError:  # older huggingface_hub without parse_hf_uri
        head, _, rest = body.partition("@")
        parts = head.split("/")
        repo_id, path = "/".join(parts[:2]), "/".join(parts[2:])
        rev = rest or None
        if rest and rev is not None and not rest.startswith("refs/") and "/" in rest:
            rev, path = rest.split("/", 1)
    except ValueError as e:
        raise HubError(f"{text!r} is not a valid Hub reference (owner/name[@revision]): {str(e).splitlines()[0]}") from None
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubError(f"{text!r} is not a valid Hub reference: expected owner/name[@revision]")
    return HubRef(repo_id, revision or rev or None, (path or "").strip("/"))


# ----- error translation ----------------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__


@contextlib.contextmanager
def _translated(ref: HubRef, action: str, *, file: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub / transport errors into one-line :class:`HubError` subclasses."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import errors as hfe

    where = f"{ref.repo_id}" + (f"@{ref.revision}" if ref.revision else "")
    what = f"{action} {where}" + (f" ({file})" if file else "")
    try:
        yield
    except AdapterError:
        raise
    except hfe.RevisionNotFoundError:
        raise RevisionNotFoundError(f"{what}: revision {ref.revision or DEFAULT_BRANCH!r} not found in {ref.repo_id}") from None
    except hfe.GatedRepoError:
        raise HubAuthError(f"{what}: {ref.repo_id} is gated; request access on the Hub and use a token that has it") from None
    except hfe.RepositoryNotFoundError:
        raise RepoNotFoundError(f"{what}: repository {ref.repo_id} not found at {hub_endpoint()} "
                                "(if it is private, use a token that can read it)") from None
    except hfe.RemoteEntryNotFoundError:
        raise NotAnAdapterRepoError(f"{what}: file {file or '?'} not found in {where}") from None
    except (hfe.OfflineModeIsEnabled, hfe.LocalEntryNotFoundError, hfe.RevisionResolutionError) as e:
        cause = e.__cause__
        if cause is not None and not isinstance(cause, hfe.OfflineModeIsEnabled):
            raise HubTransferError(f"{what}: the Hub could not be reached and the files are not in the local cache "
                                   f"({_first_line(cause)})") from None
        raise HubError(f"{what}: not in the local cache and offline (HF_HUB_OFFLINE=1); pull it once while online") from None
    except hfe.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise HubAuthError(f"{what}: the Hub refused (HTTP {status}): {e.server_message or 'permission denied'}; "
                               "check your token (HF_TOKEN or `hf auth login`)".replace("\n", " ")) from None
        if status == 412:
            raise PushConflictError(f"{what}: the branch moved while pushing (another push landed first); "
                                    "nothing was committed, push again") from None
        raise HubTransferError(f"{what}: the server answered HTTP {status}"
                               + (f": {_first_line(Exception(e.server_message))}" if e.server_message else "")) from None
    except httpx2.HTTPError as e:
        raise HubTransferError(f"{what}: connection failed: {_first_line(e)} ({type(e).__name__})") from None
    except OSError as e:
        if "Consistency check failed" in str(e):
            raise HubTransferError(f"{what}: download cut short: {_first_line(e)}") from None
        raise


# ----- push -------------------------------------------------------------------------------------------
@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit: str
    commit_url: str
    url: str
    files: list[str]
    created_repo: bool
    changed: bool
    private: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _peft_files(adapter: Adapter, folder: Path) -> list[Path]:
    """Write the adapter in PEFT's format into ``folder`` through the ``peft`` format plugin."""
    from . import registry

    fmt = registry.formats().get("peft")
    if fmt is None:
        raise UnsupportedError("--also-peft needs the 'peft' format plugin, which is not loaded "
                               f"(blocked by {registry.BLOCK_ENV}?)")
    writer = fmt.write
    folder = folder / "peft"  # a fresh path: converters refuse to write over an existing one
    writer(adapter, folder)
    missing = [n for n in PEFT_FILES if not (folder / n).is_file()]
    if missing:
        raise UnsupportedError(f"the PEFT converter did not write {', '.join(missing)}")
    return [folder / n for n in PEFT_FILES]


def _adapter_upload_files(adapter: Adapter) -> dict[str, Path]:
    """Repo path -> local file, for the adapter's own files (as they are on disk, byte for byte)."""
    src = adapter.source
    assert src is not None
    if src.is_dir():
        files = {MANIFEST_FILE: src / MANIFEST_FILE}
        for rel in adapter.manifest["files"]:
            files[rel] = safe_member(src, rel)
        return files
    return {TENSOR_FILE: src}


def push(path: str | os.PathLike[str], repo_id: str, *, revision: str | None = None, private: bool = False,
         message: str | None = None, also_peft: bool = False, token: str | None = None) -> PushResult:
    """Upload the adapter at ``path`` to ``repo_id`` (created if missing) on branch ``revision`` (default main).

    The adapter is fully validated first. One commit holds the adapter's files as they are on disk
    (folder form: ``adapter.json`` + its tensor files; single-file form: the file as
    ``adapter.safetensors``), a generated ``README.md`` and, with ``also_peft``, PEFT's
    ``adapter_config.json`` + ``adapter_model.safetensors``; adapter files left from an earlier push that
    this one does not have are deleted in the same commit. A missing branch is created from main.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub import errors as hfe

    from .hub_card import render_card

    ref = parse_ref(repo_id, revision)
    if ref.path:
        raise HubError(f"{repo_id!r}: pushing into a subfolder is not supported; give owner/name")
    branch = ref.revision or DEFAULT_BRANCH
    ref = HubRef(ref.repo_id, branch)
    if _COMMIT_RE.match(branch) or branch.startswith("refs/"):
        raise HubError(f"can only push to a branch name, not {branch!r}")
    adapter = validate(path)
    tok = hub_token(token)
    if tok is None:
        raise HubAuthError(f"push {ref.repo_id}: no Hugging Face token; set HF_TOKEN or run `hf auth login`"
                           + (" (a private repo needs one to be created)" if private else ""))
    ep = hub_endpoint()
    api = HfApi(endpoint=ep, token=tok)
    created = False
    with _translated(ref, "push"):
        try:
            api.create_repo(ref.repo_id, private=private, exist_ok=False)
            created = True
        except hfe.HfHubHTTPError as e:
            if e.response is None or e.response.status_code != 409:
                raise
        if branch != DEFAULT_BRANCH:
            refs = api.list_repo_refs(ref.repo_id)
            if branch in {t.name for t in refs.tags}:
                raise HubError(f"push {ref.repo_id}: {branch!r} is a tag; push to a branch")
            if branch not in {b.name for b in refs.branches}:
                api.create_branch(ref.repo_id, branch=branch, revision=DEFAULT_BRANCH, exist_ok=True)
        info = api.repo_info(ref.repo_id, revision=branch)
        parent = info.sha
        existing = {f.path for f in api.list_repo_tree(ref.repo_id, revision=parent, recursive=True)
                    if type(f).__name__ == "RepoFile"}

    with tempfile.TemporaryDirectory(prefix="adapterfmt-push-") as tmp:
        files = _adapter_upload_files(adapter)
        if also_peft:
            for p in _peft_files(adapter, Path(tmp)):
                files[p.name] = p
        card = render_card(adapter, repo_id=ref.repo_id, peft=also_peft).encode("utf-8")
        ops: list[Any] = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(local))
                          for rel, local in sorted(files.items())]
        ops.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card))
        ours = {MANIFEST_FILE, TENSOR_FILE, *PEFT_FILES}
        old_manifest_files: set[str] = set()
        if MANIFEST_FILE in existing:  # tensor files named by the manifest already there are ours too
            with _translated(ref, "push", file=MANIFEST_FILE), contextlib.suppress(ValueError, AttributeError):
                old = _hf().hf_hub_download(ref.repo_id, MANIFEST_FILE, revision=parent, endpoint=ep, token=tok,
                                            cache_dir=str(hub_cache_dir()))
                old_manifest_files = set(json.loads(Path(old).read_text("utf-8")).get("files", {}))
        stale = sorted((ours | old_manifest_files) & existing - set(files) - {CARD_FILE})
        ops += [CommitOperationDelete(path_in_repo=p) for p in stale]
        what = f"{adapter.method} adapter"
        with _translated(ref, "push"):
            commit = api.create_commit(ref.repo_id, ops, revision=branch, parent_commit=parent,
                                       commit_message=message or f"Upload {what} with adapterfmt",
                                       commit_description=f"Pushed with `adapter push` ({len(files)} adapter files).")
    return PushResult(repo_id=ref.repo_id, revision=branch, commit=commit.oid, commit_url=commit.commit_url,
                      url=f"{ep}/{ref.repo_id}" + (f"/tree/{branch}" if branch != DEFAULT_BRANCH else ""),
                      files=sorted([*files, CARD_FILE]), created_repo=created, changed=commit.oid != parent,
                      private=private if created else None)


# ----- pull -------------------------------------------------------------------------------------------
@dataclass
class PullResult:
    repo_id: str
    revision: str | None
    commit: str
    path: Path
    """The adapter (folder or file): the written copy with ``out``, else the verified copy in the HF cache."""
    cache_path: Path
    files: list[str] = field(default_factory=list)
    form: str = "folder"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"], d["cache_path"] = str(self.path), str(self.cache_path)
        return d


def _storage_folder(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def _detect(listing: set[str], sub: str, what: str) -> tuple[str, str]:
    """(form, repo path of the manifest or single file) from the repo's file list."""
    if sub.endswith(".safetensors"):
        if sub not in listing:
            raise NotAnAdapterRepoError(f"{what}: no file {sub}")
        return "single-file", sub
    prefix = f"{sub}/" if sub else ""
    if prefix + MANIFEST_FILE in listing:
        return "folder", prefix + MANIFEST_FILE
    if prefix + TENSOR_FILE in listing:
        return "single-file", prefix + TENSOR_FILE
    hint = " (it holds a PEFT adapter: convert it with `adapter convert`)" if prefix + PEFT_FILES[0] in listing else ""
    raise NotAnAdapterRepoError(f"{what}: no adapterfmt adapter here: expected {prefix}{MANIFEST_FILE} "
                                f"or {prefix}{TENSOR_FILE}{hint}")


def _cached_listing(snapshot: Path, sub: str) -> set[str] | None:
    """The cached files of a snapshot, when they hold an adapter that can be recognised without the Hub."""
    if not snapshot.is_dir():
        return None
    listing = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}
    try:
        form, first = _detect(listing, sub, "")
    except NotAnAdapterRepoError:
        return None
    if form == "single-file":  # a folder adapter's tensor file alone must not pass for a single-file adapter
        from .safetensors_io import read_header

        try:
            if mf.METADATA_KEY not in read_header(snapshot / first).metadata:
                return None
        except (AdapterError, OSError):
            return None
    else:  # every tensor file the cached manifest names must be cached too
        try:
            rels = json.loads((snapshot / first).read_text("utf-8"))["files"]
            base = str(PurePosixPath(first).parent)
            if not all((r if base == "." else f"{base}/{r}") in listing for r in rels):
                return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return listing


def _evict(paths: list[Path]) -> None:
    """Drop downloaded files (snapshot entry and blob) from the cache, so a later pull fetches them again."""
    for p in paths:
        with contextlib.suppress(OSError):
            blob = p.resolve() if p.is_symlink() else None
            p.unlink()
            if blob is not None:
                blob.unlink()


def views_dir() -> Path:
    """Where verified folder-form adapters from the HF cache are laid out as plain files.

    The HF cache stores a snapshot's files as symlinks into ``blobs/``, which the adapter reader refuses
    inside an adapter folder (a link could point anywhere). So a folder-form adapter is exposed as a
    *view*: hard links to the same blobs (a copy where linking fails) in
    ``<ADAPTERFMT_HUB_VIEWS or $HF_HUB_CACHE/../adapterfmt-hub>/models--owner--name/<commit>/...``, made
    once per commit after every checksum verified. The HF cache itself is never modified.
    """
    env = os.environ.get("ADAPTERFMT_HUB_VIEWS")
    return Path(env).expanduser() if env else hub_cache_dir().parent / "adapterfmt-hub"


def _view_path(ref: HubRef, sha: str) -> Path:
    base = views_dir() / ("models--" + ref.repo_id.replace("/", "--")) / sha
    return base / "root" if not ref.path else base / "sub" / ref.path


def _check_rel(rel: str, root: Path) -> None:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or "\\" in rel or rel in ("", ".") or ":" in rel:
        raise FormatError(f"file path {rel!r} in the manifest escapes the adapter folder", path=root)


def _relabel(fn: Any, ref: HubRef, sha: str) -> Any:
    """Run ``fn``; a format error about a local temp/cache file is re-raised naming the Hub location."""
    try:
        return fn()
    except FormatError as e:
        name = Path(e.path).name if e.path else ""
        where = f"{SCHEME}{ref.repo_id}@{sha}" + (f"/{ref.path}" if ref.path and not ref.path.endswith(name) else "")
        if name and not Path(e.path).is_dir():
            where += f"/{name}" if not where.endswith(name) else ""
        raise type(e)(e.message, path=where) from None


def _folder_view(ref: HubRef, sha: str, members: dict[str, Path]) -> Path:
    """Lay the downloaded files out as a plain adapter folder, verify it, move it into place."""
    target = _view_path(ref, sha)
    if target.is_dir():
        validate(target)
        return target
    with atomic_dir(target, overwrite=False) as tmp:
        for rel, local in members.items():
            dst = tmp / Path(*PurePosixPath(rel).parts)
            dst.parent.mkdir(parents=True, exist_ok=True)
            blob = local.resolve()
            try:
                os.link(blob, dst)
            except OSError:
                shutil.copyfile(blob, dst)
        validate(tmp)
    return target


def fetch(ref: HubRef, *, token: str | None = None) -> PullResult:
    """Download the adapter at ``ref`` into the HF cache (only its files) and verify it; no copy is written."""
    import httpx2
    from huggingface_hub import HfApi, hf_hub_download

    tok = hub_token(token)
    ep, cache, offline = hub_endpoint(), hub_cache_dir(), hub_offline()
    api = HfApi(endpoint=ep, token=tok or False)
    what = f"pull {ref.repo_id}" + (f"@{ref.revision}" if ref.revision else "")
    with _translated(ref, "pull"):
        resolved = api.resolve_revision(ref.repo_id, revision=ref.revision, cache_dir=str(cache),
                                        local_files_only=offline, token=tok or False)
        sha = resolved.resolved
        snapshot = _storage_folder(cache, ref.repo_id) / "snapshots" / sha
        # A commit never changes: when the cache already holds this commit's adapter, do not ask the Hub.
        listing = _cached_listing(snapshot, ref.path)
        if listing is None and not offline:
            try:
                listing = {f.path for f in api.list_repo_tree(ref.repo_id, revision=sha, recursive=True,
                                                              token=tok or False)
                           if type(f).__name__ == "RepoFile"}
            except httpx2.TransportError:
                if not snapshot.is_dir():
                    raise
        if listing is None:
            if not snapshot.is_dir():
                raise HubError(f"{what}: commit {sha[:12]} is not in the local cache and HF_HUB_OFFLINE=1")
            listing = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}
    form, first = _detect(listing, ref.path, what)

    downloaded: list[Path] = []

    def get(repo_path: str) -> Path:
        with _translated(ref, "pull", file=repo_path):
            local = Path(hf_hub_download(ref.repo_id, repo_path, revision=sha, cache_dir=str(cache), endpoint=ep,
                                         token=tok or False, local_files_only=offline))
        downloaded.append(local)
        return local

    try:
        first_local = get(first)
        files = [first]
        if form == "folder":
            folder = first_local.parent
            manifest = mf.loads(first_local.read_bytes(), path=first_local)
            rels = manifest.get("files") if isinstance(manifest, dict) else None
            if not isinstance(rels, dict):
                raise FormatError(f"{MANIFEST_FILE} has no files table", path=first_local)
            base = str(PurePosixPath(first).parent)
            members = {MANIFEST_FILE: first_local}
            for rel in sorted(rels):
                _check_rel(rel, folder)  # refuse ../ before downloading anything
                repo_path = rel if base == "." else f"{base}/{rel}"
                if repo_path not in listing:
                    raise MissingFileError(f"{MANIFEST_FILE} names {rel!r}, which is not in the repository",
                                           path=str(ref))
                members[rel] = get(repo_path)
                files.append(repo_path)
            adapter_path = _relabel(lambda: _folder_view(ref, sha, members), ref, sha)
        else:
            adapter_path = first_local
            _relabel(lambda: validate(adapter_path), ref, sha)
    except AdapterError:
        _evict(downloaded)
        raise
    return PullResult(repo_id=ref.repo_id, revision=ref.revision, commit=sha, path=adapter_path,
                      cache_path=adapter_path, files=files, form=form)


def pull(repo: str, *, revision: str | None = None, out: str | os.PathLike[str] | None = None,
         overwrite: bool = False, token: str | None = None) -> PullResult:
    """Download and verify the adapter in ``repo`` (``owner/name[@rev]`` or ``hf://...``).

    Without ``out`` the verified adapter stays in the HF cache (``result.path``). With ``out`` a copy is
    written there atomically (folder form: ``out`` is the folder; single-file form: ``out`` is the file, or
    ``out/adapter.safetensors`` when ``out`` is an existing empty folder), with a provenance entry naming the
    repository and the resolved commit. Nothing is written to ``out`` unless everything was verified.
    """
    ref = parse_ref(repo, revision)
    target = Path(out) if out is not None else None
    empty_dir = target is not None and target.is_dir() and not any(target.iterdir())
    if target is not None and not empty_dir:
        check_output(target, overwrite)  # before downloading anything
    result = fetch(ref, token=token)
    if target is None:
        return result
    entry = {"tool": "adapterfmt", "action": "pull", "source": f"{SCHEME}{ref.repo_id}" + (f"/{ref.path}" if ref.path else ""),
             "revision": ref.revision or DEFAULT_BRANCH, "commit": result.commit, "endpoint": hub_endpoint()}
    src = result.cache_path
    if result.form == "folder":
        manifest = mf.loads((src / MANIFEST_FILE).read_bytes(), path=src / MANIFEST_FILE)
        manifest.setdefault("provenance", []).append(entry)
        if empty_dir:
            target.rmdir()  # an empty folder given as --out is taken as the place to write
        with atomic_dir(target, overwrite=overwrite) as tmp:
            for rel in manifest["files"]:
                dst = safe_member(tmp, rel)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(safe_member(src, rel), dst)
            (tmp / MANIFEST_FILE).write_text(mf.dumps_pretty(manifest), encoding="utf-8")
        written = target
    else:
        written = target / TENSOR_FILE if empty_dir else target
        adapter = load(src)
        adapter.manifest.setdefault("provenance", []).append(entry)
        save(adapter, written, single_file=True, overwrite=overwrite)
    result.path = written
    return result


# ----- hf:// paths ------------------------------------------------------------------------------------
def is_hub_path(text: object) -> bool:
    return isinstance(text, str) and text.startswith(SCHEME)


def resolve_adapter_path(uri: str, *, token: str | None = None) -> Path:
    """Local path of the adapter named by ``hf://owner/name[@revision][/subfolder]``, through the HF cache.

    Downloads (only the adapter's files) when the commit is not cached yet; with ``HF_HUB_OFFLINE=1``
    resolves branches and tags through the cache's refs and never touches the network.
    """
    if not is_hub_path(uri):
        raise HubError(f"{uri!r} is not an hf:// path")
    return fetch(parse_ref(uri), token=token).path
