"""Publishing adapters to and fetching them from the Hugging Face Hub (or any Hub-compatible endpoint).

- :func:`push` uploads an adapter (either file form) with a generated model card in one commit, guarded
  by ``parent_commit`` so that two concurrent pushes cannot silently overwrite each other.
- :func:`pull` downloads only the adapter's files at a branch, tag or commit into adapterfmt's store
  (:func:`store_dir`), verifies every checksum of the manifest, and optionally writes a copy elsewhere with
  the resolved commit recorded in its provenance (the store itself is never rewritten).
- :func:`resolve_adapter_path` turns ``hf://owner/name[@revision][/subfolder]`` into a local path through
  the store; once pulled it works offline (``HF_HUB_OFFLINE=1``).

**The server is not trusted.** ``huggingface_hub``'s ``hf_hub_download`` builds cache paths from what the
server says: the ``ETag`` becomes ``blobs/<etag>`` and ``X-Repo-Commit`` becomes ``snapshots/<commit>``,
unchecked, and it writes there before returning; a check of the metadata beforehand (a ``HEAD``) cannot help,
since the download makes its own request, which may be answered differently. So pulls do not use it:
``huggingface_hub`` is used for the API calls (``repo_info``, the tree listing on its HTTP session, auth
headers) and the files are streamed by :func:`_download` into a temp folder this module makes inside the
store, then moved into place once verified. Nothing the server says becomes a path: a commit id must be 40
lowercase hex digits before it names a folder; ``ETag`` is ignored; ``X-Repo-Commit``, when sent, must equal
the commit asked for. Each file must match the size and hash (SHA-256 of an LFS file, git blob id of a
regular one) the commit's listing gives, must not run past that size (or :data:`MAX_MANIFEST_BYTES` for
``adapter.json``), and must arrive within :func:`download_timeout` seconds (``ADAPTERFMT_HUB_TIMEOUT``,
``--timeout``). On any refusal only that temp folder is removed; the tool never deletes anything else.

Token, endpoint and offline mode come from the usual ``huggingface_hub`` settings (``HF_TOKEN`` or
``hf auth login``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``; the store sits beside ``HF_HUB_CACHE``), read when
each call is made. Every failure is raised as a :class:`HubError` subclass (or a :class:`FormatError` for
bad adapter bytes) with a one-line message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from ..errors import (
    AdapterError,
    ChecksumError,
    FormatError,
    HubAuthError,
    HubError,
    HubTransferError,
    MissingFileError,
    NotAnAdapterRepoError,
    PushConflictError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UnsafePathError,
    UnsupportedError,
)
from ..format import manifest as mf
from ..format.adapter import MANIFEST_FILE, TENSOR_FILE, Adapter, load, safe_member, save
from ..format.atomic import atomic_dir, check_output
from ..format.validate import validate

SCHEME = "hf://"
CARD_FILE = "README.md"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
DEFAULT_BRANCH = "main"
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
TIMEOUT_ENV = "ADAPTERFMT_HUB_TIMEOUT"
DEFAULT_TIMEOUT = 600.0
"""Seconds one file's download may take in all, unless ``ADAPTERFMT_HUB_TIMEOUT`` or ``--timeout`` says otherwise."""
MAX_MANIFEST_BYTES = 100 * 1024 * 1024
"""The most an ``adapter.json`` may be to be downloaded (the tensor files are bounded by the listed sizes)."""
REFS_FILE = "refs.json"
_T = TypeVar("_T")


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
    except hfe.OfflineModeIsEnabled:
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
    from ..plugin import registry

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


def _remove_repo(api: Any, repo_id: str) -> None:
    """Delete a repo this push created, after the push failed (an empty repo is not left behind)."""
    try:
        api.delete_repo(repo_id, missing_ok=True)
    except Exception as e:  # the push's own error is what the caller sees; this one is said once beside it
        warnings.warn(f"push {repo_id}: the repository this push created could not be removed: {_first_line(e)}",
                      stacklevel=3)


def push(path: str | os.PathLike[str], repo_id: str, *, revision: str | None = None, private: bool = False,
         message: str | None = None, also_peft: bool = False, token: str | None = None) -> PushResult:
    """Upload the adapter at ``path`` to ``repo_id`` (created if missing) on branch ``revision`` (default main).

    The adapter is fully validated first. One commit holds the adapter's files as they are on disk
    (folder form: ``adapter.json`` + its tensor files; single-file form: the file as
    ``adapter.safetensors``), a generated ``README.md`` and, with ``also_peft``, PEFT's
    ``adapter_config.json`` + ``adapter_model.safetensors``; adapter files left from an earlier push that
    this one does not have are deleted in the same commit. A missing branch is created from main. A
    foreign adapter (a PEFT folder ...) is pushed as ``adapter convert`` would write it. The repo is created
    only after every file is ready, and removed again if the commit then fails.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub import errors as hfe

    from .card import render_card

    ref = parse_ref(repo_id, revision)
    if ref.path:
        raise HubError(f"{repo_id!r}: pushing into a subfolder is not supported; give owner/name")
    branch = ref.revision or DEFAULT_BRANCH
    ref = HubRef(ref.repo_id, branch)
    if _COMMIT_RE.match(branch) or branch.startswith("refs/"):
        raise HubError(f"can only push to a branch name, not {branch!r}")
    adapter = validate(path)
    seconds = download_timeout()
    tok = hub_token(token)
    if tok is None:
        raise HubAuthError(f"push {ref.repo_id}: no Hugging Face token; set HF_TOKEN or run `hf auth login`"
                           + (" (a private repo needs one to be created)" if private else ""))
    ep = hub_endpoint()
    api = HfApi(endpoint=ep, token=tok)
    created = False
    with tempfile.TemporaryDirectory(prefix="adapterfmt-push-") as tmp:
        if adapter.converted_from:  # a foreign folder: push what `adapter convert` writes
            adapter = load(save(adapter, Path(tmp) / "adapter"))
        files = _adapter_upload_files(adapter)
        if also_peft:
            for p in _peft_files(adapter, Path(tmp)):
                files[p.name] = p
        card = render_card(adapter, repo_id=ref.repo_id, peft=also_peft).encode("utf-8")
        ops: list[Any] = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(local))
                          for rel, local in sorted(files.items())]
        ops.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card))
        try:  # everything that can fail locally is done: a repo created below holds the commit or is removed
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
                parent = _check_commit(api.repo_info(ref.repo_id, revision=branch).sha, f"push {ref.repo_id}",
                                       "commit id")
            listing = _tree(ref, parent, "push", tok, seconds)
            existing = set(listing)
            ours = {MANIFEST_FILE, TENSOR_FILE, *PEFT_FILES}
            old_manifest_files: set[str] = set()
            if MANIFEST_FILE in existing:  # tensor files named by the manifest already there are ours too
                old = Path(tmp) / "old-manifest.json"
                _download(ref, parent, _remote_file(listing, MANIFEST_FILE, _what(ref, "push")), old,
                          action="push", tok=tok, timeout=seconds, limit=MAX_MANIFEST_BYTES)
                with contextlib.suppress(ValueError, AttributeError):
                    old_manifest_files = set(json.loads(old.read_text("utf-8")).get("files", {}))
            stale = sorted((ours | old_manifest_files) & existing - set(files) - {CARD_FILE})
            ops += [CommitOperationDelete(path_in_repo=p) for p in stale]
            what = f"{adapter.method} adapter"
            with _translated(ref, "push"):
                commit = api.create_commit(ref.repo_id, ops, revision=branch, parent_commit=parent,
                                           commit_message=message or f"Upload {what} with adapterfmt",
                                           commit_description=f"Pushed with `adapter push` ({len(files)} adapter "
                                                              "files).")
        except BaseException:
            if created:
                _remove_repo(api, ref.repo_id)
            raise
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
    """The adapter (folder or file): the written copy with ``out``, else the verified copy in the store."""
    cache_path: Path
    files: list[str] = field(default_factory=list)
    form: str = "folder"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"], d["cache_path"] = str(self.path), str(self.cache_path)
        return d


def download_timeout(explicit: float | None = None) -> float:
    """Seconds one file's download may take in all: ``explicit``, else ``ADAPTERFMT_HUB_TIMEOUT``, else 600."""
    value: Any = explicit
    if value is None:
        value = os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise HubError(f"download timeout {value!r} ({TIMEOUT_ENV} or --timeout) is not a positive number of seconds")
    return seconds


def store_dir() -> Path:
    """Where pulled adapters are kept, verified: ``ADAPTERFMT_HUB_VIEWS``, else ``$HF_HUB_CACHE/../adapterfmt-hub``.

    Per repository ``models--owner--name/``: ``refs.json`` (revision -> commit, for offline use) and, per
    commit, ``root/`` (a folder-form adapter at the repo root), ``sub/<folder>/`` (one in a subfolder) and
    ``file/<repo path>`` (a single-file adapter). Each entry is moved into place only once it verified.
    """
    env = os.environ.get("ADAPTERFMT_HUB_VIEWS")
    return Path(env).expanduser() if env else hub_cache_dir().parent / "adapterfmt-hub"


def _repo_store(repo_id: str) -> Path:
    return store_dir() / ("models--" + repo_id.replace("/", "--"))


def _check_rel(rel: str, what: str) -> None:
    """Refuse a repo path that is not a plain relative path (it becomes a local path)."""
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or "\\" in rel or rel in ("", ".") or ":" in rel or "\0" in rel:
        raise UnsafePathError(f"{what}: file path {rel!r} escapes the adapter folder")


def _targets(ref: HubRef, sha: str) -> tuple[Path, Path]:
    """Where the adapter of ``ref`` at commit ``sha`` is stored: (folder form, single-file form)."""
    base = _repo_store(ref.repo_id) / sha
    return (base / "sub" / ref.path if ref.path else base / "root"), base / "file" / _single_path(ref)


def _single_path(ref: HubRef) -> str:
    """The repo path of the single-file adapter ``ref`` names."""
    return ref.path if ref.path.endswith(".safetensors") else (f"{ref.path}/" if ref.path else "") + TENSOR_FILE


def _read_refs(repo_dir: Path) -> dict[str, str]:
    try:
        refs = json.loads((repo_dir / REFS_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in refs.items() if isinstance(v, str) and _COMMIT_RE.match(v)} if isinstance(refs, dict) else {}


def _record_ref(repo_dir: Path, revision: str, sha: str) -> None:
    """Remember ``revision -> sha`` for offline use (best effort: a read-only store just is not updated)."""
    refs = _read_refs(repo_dir)
    if refs.get(revision) == sha:
        return
    refs[revision] = sha
    with contextlib.suppress(OSError):
        repo_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".refs.", suffix=".tmp", dir=repo_dir)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(refs, f, indent=1, sort_keys=True)
        os.replace(tmp, repo_dir / REFS_FILE)


def _bounded(fn: Callable[[threading.Event], _T], seconds: float, late: str) -> _T:
    """``fn(stop)`` run in a worker thread, waited for at most ``seconds``; past that ``stop`` is set (``fn``
    checks it between reads) and :class:`HubTransferError` ``late`` is raised, even while a read is blocked."""
    stop = threading.Event()
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = fn(stop)
        except BaseException as e:  # handed to the calling thread
            box["error"] = e

    worker = threading.Thread(target=work, name="adapterfmt-hub", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        stop.set()
        raise HubTransferError(late)
    if "error" in box:
        raise box["error"]
    return box["value"]


def _late(what: str, seconds: float, doing: str) -> str:
    return f"{what}: {doing} did not finish within {seconds:g} s (set {TIMEOUT_ENV} or --timeout for a longer limit)"


def _check_commit(value: object, what: str, source: str) -> str:
    if not isinstance(value, str) or not _COMMIT_RE.match(value):
        raise HubError(f"{what}: the server gave {source} {str(value)[:80]!r}, not a commit id (40 hex digits); refused")
    return value


def _resolve_commit(api: Any, ref: HubRef, what: str, offline: bool, tok: str | None, seconds: float) -> str:
    """The commit ``ref`` names: asked of the Hub, else (offline or unreachable) the one recorded at the last pull."""
    import httpx2
    from huggingface_hub import errors as hfe

    revision = ref.revision or DEFAULT_BRANCH
    if _COMMIT_RE.match(revision):
        return revision
    repo_dir = _repo_store(ref.repo_id)
    unreachable: BaseException | None = None
    if not offline:
        with _translated(ref, "pull"):
            try:
                info = _bounded(lambda _: api.repo_info(ref.repo_id, revision=revision, token=tok or False),
                                seconds, _late(what, seconds, "asking the Hub for the commit"))
                sha = _check_commit(info.sha, what, "commit id")
            except (httpx2.TransportError, hfe.OfflineModeIsEnabled) as e:
                unreachable = e
            except hfe.HfHubHTTPError as e:
                if e.response is None or e.response.status_code < 500:
                    raise
                unreachable = e
            except (KeyError, TypeError, ValueError) as e:
                raise HubError(f"{what}: malformed repository info from the server ({type(e).__name__})") from None
            else:
                _record_ref(repo_dir, revision, sha)
                return sha
    recorded = _read_refs(repo_dir).get(revision)
    if recorded is not None:
        return recorded
    if unreachable is not None:
        raise HubTransferError(f"{what}: the Hub could not be reached and the files are not in the local cache "
                               f"({_first_line(unreachable)})")
    raise HubError(f"{what}: not in the local cache and offline (HF_HUB_OFFLINE=1); pull it once while online")


@dataclass(frozen=True)
class _RemoteFile:
    """A file of the commit as the tree listing gives it: its size and the hash its bytes must have."""

    path: str
    size: int
    sha256: str | None  # LFS/Xet files: SHA-256 of the content
    git_oid: str  # regular files: the git blob id (SHA-1 of "blob <size>\0" + content)


def _tree(ref: HubRef, sha: str, action: str, tok: str | None, seconds: float) -> dict[str, dict[str, Any]]:
    """Repo path -> the listing's entry for each file, at commit ``sha`` (checked only when a file is fetched)."""
    with _translated(ref, action):
        try:
            entries = _bounded(lambda stop: _list_files(ref, sha, tok, stop), seconds,
                               _late(_what(ref, action), seconds, "listing the files"))
            return {f["path"]: f for f in entries if isinstance(f, dict) and f.get("type") == "file"
                    and isinstance(f.get("path"), str)}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise HubError(f"{action} {ref.repo_id}: malformed file listing from the server ({type(e).__name__})") from None


MAX_LISTING_PAGES = 10_000
"""Pages of a tree listing followed at most (the Hub gives 1000 entries a page): a server that keeps linking to
new pages ends there, deadline or not."""


def _list_files(ref: HubRef, sha: str, tok: str | None, stop: threading.Event) -> list[Any]:
    """The recursive tree listing of commit ``sha``, page by page (the ``Link: rel=next`` header).

    Plain requests on huggingface_hub's shared client, not ``HfApi.list_repo_tree``: that retries through
    ``http_backoff``, which closes the shared client when a retry meets a refused connection; a listing given up
    at its deadline would keep retrying in its worker thread and could close the client under the caller's
    later requests."""
    from urllib.parse import quote

    import httpx2
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = build_hf_headers(token=tok or False, library_name="adapterfmt")
    url: str | None = f"{hub_endpoint()}/api/models/{ref.repo_id}/tree/{quote(sha, safe='')}"
    params: dict[str, str] | None = {"recursive": "true", "expand": "false"}
    entries: list[Any] = []
    asked: set[str] = set()
    while url is not None and not stop.is_set():
        if url in asked:
            raise HubError(f"{_what(ref, 'list')}: the server's file listing links back to a page it gave; refused")
        if len(asked) == MAX_LISTING_PAGES:
            raise HubError(f"{_what(ref, 'list')}: the server's file listing runs past {MAX_LISTING_PAGES} pages; "
                           "refused")
        asked.add(url)
        for attempt in range(1, _RETRIES + 1):  # a dropped connection is tried again, as the download does
            try:
                r = get_session().get(url, headers=headers, params=params)
                break
            except (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError):
                if attempt == _RETRIES or stop.is_set():
                    raise
                time.sleep(0.2)
        hf_raise_for_status(r)
        page = r.json()
        if not isinstance(page, list):
            raise TypeError("the listing is not a list")
        entries.extend(page)
        url, params = r.links.get("next", {}).get("url"), None
    return entries


def _remote_file(listing: dict[str, dict[str, Any]], path: str, what: str) -> _RemoteFile:
    f = listing[path]
    lfs = f.get("lfs")
    size = lfs.get("size") if isinstance(lfs, dict) else f.get("size")
    sha256 = lfs.get("oid") if isinstance(lfs, dict) else None
    blob_id = f.get("oid")
    if (not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(blob_id, str)
            or not _COMMIT_RE.match(blob_id) or (lfs is not None and not isinstance(lfs, dict))
            or (sha256 is not None and not (isinstance(sha256, str) and _SHA256_RE.match(sha256)))):
        raise HubError(f"{what}: the listing gives {path} an invalid size or hash; refused")
    return _RemoteFile(path, size, sha256, blob_id)


class _Hasher:
    """The hash the Hub lists for a file: SHA-256 of an LFS file, the git blob id of a regular one."""

    def __init__(self, remote: _RemoteFile) -> None:
        self.remote = remote
        self.reset()

    def reset(self) -> None:
        if self.remote.sha256 is not None:
            self.h = hashlib.sha256()
        else:
            self.h = hashlib.sha1(b"blob %d\0" % self.remote.size)

    def matches(self) -> bool:
        return self.h.hexdigest() == (self.remote.sha256 or self.remote.git_oid)


def _what(ref: HubRef, action: str) -> str:
    return f"{action} {ref.repo_id}" + (f"@{ref.revision}" if ref.revision else "")


def _download(ref: HubRef, sha: str, remote: _RemoteFile, dest: Path, *, action: str, tok: str | None,
              timeout: float, limit: int | None = None) -> None:
    """Stream one file of commit ``sha`` into the new file ``dest`` (in a folder this module created).

    Refused, with one line naming the file: a body or ``Content-Length`` beyond the size the listing gives
    (or ``limit``), an ``X-Repo-Commit`` other than ``sha``, bytes whose hash differs from the listing's,
    and a transfer not finished within ``timeout`` seconds (see :func:`_bounded`: the deadline holds even
    while a read is blocked, and the worker stops writing once it passed).
    """
    what = _what(ref, action)
    if limit is not None and remote.size > limit:
        raise HubError(f"{what}: {remote.path} is listed as {remote.size} bytes, more than the {limit} allowed; refused")
    with open(dest, "xb") as f:
        with _translated(ref, action, file=remote.path):
            _bounded(lambda stop: _transfer(ref, sha, remote, f, stop, what=what, tok=tok, timeout=timeout),
                     timeout, _late(what, timeout, f"download of {remote.path}"))
        f.flush()
        os.fsync(f.fileno())


_RETRIES = 3
"""Consecutive attempts without progress before a broken transfer is given up."""


def _transfer(ref: HubRef, sha: str, remote: _RemoteFile, f: Any, stop: threading.Event, *, what: str,
              tok: str | None, timeout: float) -> None:
    import httpx2
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session

    url = hf_hub_url(ref.repo_id, remote.path, revision=sha, endpoint=hub_endpoint())
    headers = build_hf_headers(token=tok or False, library_name="adapterfmt")
    headers["Accept-Encoding"] = "identity"
    hasher = _Hasher(remote)
    where = f"{what}: {remote.path}"
    got, failures, last = 0, 0, None
    while True:
        start = got
        try:
            with get_session().stream("GET", url, headers={**headers, **({"Range": f"bytes={got}-"} if got else {})},
                                      timeout=min(timeout, constants.HF_HUB_DOWNLOAD_TIMEOUT)) as r:
                _check_response(r, sha, remote, got, where)
                if got and r.status_code == 200:  # the server ignored the range: start over
                    f.seek(0)
                    f.truncate()
                    got, start = 0, 0
                    hasher.reset()
                for chunk in r.iter_raw():
                    if stop.is_set():
                        return
                    if got + len(chunk) > remote.size:
                        raise HubTransferError(f"{where}: the server sent more than the {remote.size} bytes the "
                                               "commit lists for it; refused")
                    f.write(chunk)
                    hasher.h.update(chunk)
                    got += len(chunk)
            if got == remote.size:
                break
        except (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError) as e:
            if stop.is_set():
                return
            last = e
        failures = 0 if got > start else failures + 1
        if failures >= _RETRIES:
            raise HubTransferError(f"{where}: download cut short ({got} of {remote.size} bytes"
                                   + (f"; {_first_line(last)})" if last is not None else ")"))
        if failures:
            time.sleep(0.2)
    if not hasher.matches():
        kind, want = ("sha256", remote.sha256) if remote.sha256 else ("git blob id", remote.git_oid)
        raise ChecksumError(f"checksum mismatch: the bytes received do not have the {kind} {want[:12]}... the commit "
                            "lists", path=f"{SCHEME}{ref.repo_id}@{sha}/{remote.path}")


def _check_response(r: Any, sha: str, remote: _RemoteFile, got: int, where: str) -> None:
    """Refuse an error status, a commit other than ``sha`` and a declared length beyond the listed size."""
    for resp in (*r.history, r):
        commit = resp.headers.get("X-Repo-Commit")
        if commit is not None and commit != sha:
            raise HubError(f"{where}: the server answered for commit {commit[:80]!r}, not {sha}; refused")
    status = r.status_code
    if status in (401, 403):
        raise HubAuthError(f"{where}: the Hub refused (HTTP {status}); check your token (HF_TOKEN or `hf auth login`)")
    if status == 404:
        raise NotAnAdapterRepoError(f"{where}: not found at commit {sha}")
    if status not in (200, 206) or (status == 206) != bool(got):
        message = r.headers.get("X-Error-Message", "")
        raise HubTransferError(f"{where}: the server answered HTTP {status}" + (f": {message[:200]}" if message else ""))
    declared = r.headers.get("Content-Length")
    if declared is not None and (not declared.isdigit() or int(declared) > remote.size - (got if status == 206 else 0)):
        raise HubTransferError(f"{where}: the server announces {declared[:40]} bytes, but the commit lists "
                               f"{remote.size}; refused")
    if status == 206 and not r.headers.get("Content-Range", "").startswith(f"bytes {got}-"):
        raise HubTransferError(f"{where}: the server resumed at the wrong offset ({r.headers.get('Content-Range')!r})")


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


def _place(staged: Path, target: Path) -> None:
    """Move a verified file or folder into the store (a concurrent pull that placed it first wins)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(staged, target)
    except OSError:
        if not target.exists():
            raise


def fetch(ref: HubRef, *, token: str | None = None, timeout: float | None = None) -> PullResult:
    """Download the adapter at ``ref`` into the store (only its files), verified; no other copy is written."""
    seconds = download_timeout(timeout)
    what = _what(ref, "pull")
    if ref.path:
        _check_rel(ref.path, what)
    from huggingface_hub import HfApi

    tok = hub_token(token)
    offline = hub_offline()
    api = HfApi(endpoint=hub_endpoint(), token=tok or False)
    sha = _resolve_commit(api, ref, what, offline, tok, seconds)
    folder_target, file_target = _targets(ref, sha)
    for form, target in (("folder", folder_target), ("single-file", file_target)):
        if target.exists():  # a commit never changes: what verified once is used without asking the Hub
            adapter = _relabel(lambda t=target: validate(t), ref, sha)
            prefix = f"{ref.path}/" if ref.path else ""
            files = ([prefix + r for r in (MANIFEST_FILE, *sorted(adapter.manifest["files"]))] if form == "folder"
                     else [_single_path(ref)])
            return PullResult(repo_id=ref.repo_id, revision=ref.revision, commit=sha, path=target,
                              cache_path=target, files=files, form=form)
    if offline:
        raise HubError(f"{what}: commit {sha[:12]} is not in the local cache and HF_HUB_OFFLINE=1")
    listing = _tree(ref, sha, "pull", tok, seconds)
    form, first = _detect(set(listing), ref.path, what)
    repo_dir = _repo_store(ref.repo_id)
    repo_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".pull-", suffix=".tmp", dir=repo_dir))
    try:
        def get(repo_path: str, dest: Path, limit: int | None = None) -> Path:
            dest.parent.mkdir(parents=True, exist_ok=True)
            _download(ref, sha, _remote_file(listing, repo_path, what), dest, action="pull", tok=tok,
                      timeout=seconds, limit=limit)
            return dest

        files = [first]
        if form == "folder":
            staged = staging / "adapter"
            mpath = get(first, staged / MANIFEST_FILE, limit=MAX_MANIFEST_BYTES)
            manifest = _relabel(lambda: mf.loads(mpath.read_bytes(), path=mpath), ref, sha)
            rels = manifest.get("files") if isinstance(manifest, dict) else None
            if not isinstance(rels, dict):
                raise FormatError(f"{MANIFEST_FILE} has no files table", path=f"{SCHEME}{ref.repo_id}@{sha}/{first}")
            base = str(PurePosixPath(first).parent)
            for rel in sorted(rels):
                _check_rel(rel, what)  # refuse ../ before downloading anything
                repo_path = rel if base == "." else f"{base}/{rel}"
                if repo_path not in listing:
                    raise MissingFileError(f"{MANIFEST_FILE} names {rel!r}, which is not in the repository",
                                           path=str(ref))
                get(repo_path, staged / Path(*PurePosixPath(rel).parts))
                files.append(repo_path)
            _relabel(lambda: validate(staged), ref, sha)
            target = folder_target
        else:
            staged = get(first, staging / TENSOR_FILE)
            _relabel(lambda: validate(staged), ref, sha)
            target = file_target
        _place(staged, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PullResult(repo_id=ref.repo_id, revision=ref.revision, commit=sha, path=target, cache_path=target,
                      files=files, form=form)


def pull(repo: str, *, revision: str | None = None, out: str | os.PathLike[str] | None = None,
         overwrite: bool = False, token: str | None = None, timeout: float | None = None) -> PullResult:
    """Download and verify the adapter in ``repo`` (``owner/name[@rev]`` or ``hf://...``).

    Without ``out`` the verified adapter stays in the store (``result.path``, see :func:`store_dir`). With ``out`` a copy is
    written there atomically (folder form: ``out`` is the folder; single-file form: ``out`` is the file, or
    ``out/adapter.safetensors`` when ``out`` is an existing empty folder), with a provenance entry naming the
    repository and the resolved commit. Nothing is written to ``out`` unless everything was verified.
    ``timeout`` bounds each file's download in seconds (default: :func:`download_timeout`).
    """
    ref = parse_ref(repo, revision)
    target = Path(out) if out is not None else None
    empty_dir = target is not None and target.is_dir() and not any(target.iterdir())
    if target is not None and not empty_dir:
        check_output(target, overwrite)  # before downloading anything
    result = fetch(ref, token=token, timeout=timeout)
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
