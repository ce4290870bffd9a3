"""A small Hugging Face Hub API server for tests: stdlib ``http.server`` in a thread on 127.0.0.1.

It speaks enough of the Hub's HTTP API for the real ``huggingface_hub`` client to create repos, commit
(regular files inline in the NDJSON commit payload, large/binary files through the Git LFS "basic"
transfer), list trees and refs, create branches and tags, and download files through ``/resolve/``
(``HEAD`` + ``GET`` with ``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag``/``X-Linked-Size`` and ``Range``).

Storage is git-like and in memory: content-addressed blobs, immutable commits (a full file map each) and
refs (branches, tags). Faults can be injected per request (``FakeHub.fail``) and stored bytes tampered
with (``FakeHub.tamper``) to test what a client does when the server misbehaves, or is hostile: ETags,
``X-Repo-Commit`` headers and ``repo_info`` commit ids that are paths, endless or slow bodies, lying
``Content-Length`` (see ``Fault.mode``). Streamed bodies are sent outside the storage lock, so a client
stuck on one does not block the server.

Not a full Hub: no PRs, no Xet, no pagination beyond one page, model repos only.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import itertools
import json
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_THRESHOLD = 10 * 1024 * 1024
"""Files at least this big go through LFS (the Hub's rule), as do binary ones (see ``_is_lfs``)."""

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".npy", ".npz")


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class FileEntry:
    sha256: str
    size: int
    lfs: bool

    def git_oid(self, hub: FakeHub) -> str:
        if self.lfs:
            return git_blob_oid(lfs_pointer(self.sha256, self.size))
        return git_blob_oid(hub.blobs[self.sha256])


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, FileEntry]
    title: str
    date: str


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


CLIENT_WORKER = "adapterfmt-hub"
"""The name of the worker threads ``adapterfmt.hub.client`` runs its bounded transfers in."""

STREAM_CAP_S = 30.0
"""An endless or dripping body stops after this many seconds, whatever the client does."""


@dataclass
class Fault:
    """How matching requests misbehave. ``mode``:

    - ``500``: an internal error; ``cut`` / ``short``: half the body, then the connection drops (with / without
      the full ``Content-Length``);
    - ``etag`` / ``commit``: a file's ``ETag`` (and ``X-Linked-Etag``) / ``X-Repo-Commit`` header is ``value``;
    - ``sha``: ``repo_info`` answers with commit id ``value``;
    - ``endless``: the file's bytes, then zeros forever, with no ``Content-Length``;
    - ``huge``: ``Content-Length: value`` (a huge number) and zeros trickling out every ``delay`` seconds;
    - ``drip``: the true headers, then the body one byte every ``delay`` seconds;
    - ``stall``: the answer only after ``delay`` seconds;
    - ``drop``: the connection closes without an answer.
    """

    method: str
    pattern: str
    mode: str
    times: int  # how many more requests it hits; -1 = forever
    value: str = ""
    delay: float = 0.0
    hits: int = 0


class HubHTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class FakeHub:
    """State of the fake Hub; ``start()`` serves it on a random loopback port."""

    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self.tokens = dict(tokens or {"hf_test_token": "alice"})
        self.repos: dict[str, Repo] = {}
        self.commits: dict[str, Commit] = {}
        self.blobs: dict[str, bytes] = {}
        self.lfs_pending: dict[str, int] = {}
        self.faults: list[Fault] = []
        self.hooks: list[tuple[str, str, Any]] = []
        self.log: list[tuple[str, str, int]] = []
        self.lock = threading.RLock()
        self._counter = itertools.count()
        self.connections: set[Any] = set()
        self.threads: list[threading.Thread] = []
        self.tree_page: int | None = None
        """Entries per page of a tree listing (None: all in one page)."""
        self.tree_loop = False
        """A hostile listing: every page's ``Link: rel=next`` points back at the page itself."""
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.stopping = threading.Event()
        """Set by :meth:`stop`: stalled and streaming answers end at once instead of outliving the test."""

    # ----- lifecycle ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop open keep-alive connections (the Hub becomes unreachable) and wait (up to 10 s)
        for every request thread to end, so nothing of this server outlives the test that started it."""
        if self._server is None:
            return
        self.stopping.set()  # stalled answers go out now, dripping ones end
        # A pull that gave up at its deadline leaves its worker thread running a request of huggingface_hub's;
        # were the server gone, that request's retry would meet a refused connection, and huggingface_hub then
        # closes its shared HTTP client under whatever the next test is sending (EBADF). Let them end first.
        for t in threading.enumerate():
            if t.name == CLIENT_WORKER:
                t.join(10)
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with self.lock:
                live = [t for t in self.threads if t.is_alive()]
                socks = list(self.connections)
            if not live:
                break
            for sock in socks:  # again each round: a connection accepted just before the shutdown joins late
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            live[0].join(0.05)

    # ----- test helpers -----------------------------------------------------------------------------
    def fail(self, pattern: str, mode: str = "500", *, method: str = "GET", times: int = -1, value: str = "",
             delay: float = 0.0) -> Fault:
        """Make requests whose path matches ``pattern`` (fnmatch on the unquoted path) misbehave (see ``Fault``)."""
        fault = Fault(method.upper(), pattern, mode, times, value, delay)
        with self.lock:
            self.faults.append(fault)
        return fault

    def on_request(self, pattern: str, fn: Any, *, method: str = "POST") -> None:
        """Call ``fn(hub)`` (under the storage lock) before serving each request whose path matches ``pattern``."""
        self.hooks.append((method.upper(), pattern, fn))

    def commit_directly(self, repo_id: str, files: dict[str, bytes], title: str = "direct", branch: str = "main") -> str:
        """Make a commit on ``branch`` without going through HTTP (another client's push, say)."""
        with self.lock:
            repo = self.repos[repo_id]
            merged = dict(self.commits[repo.branches[branch]].files)
            for path, data in files.items():
                merged[path] = self.store(data, _is_lfs(path, len(data), data[:512]))
            commit = self.new_commit(repo, repo.branches[branch], merged, title)
            repo.branches[branch] = commit.oid
            return commit.oid

    def tamper(self, repo_id: str, path: str, revision: str = "main") -> None:
        """Flip the last byte of a stored file in place (the commit, oid and ETag stay as they were)."""
        with self.lock:
            entry = self.commits[self.resolve(self.repos[repo_id], revision)].files[path]
            data = bytearray(self.blobs[entry.sha256])
            data[-1] ^= 0xFF
            self.blobs[entry.sha256] = bytes(data)

    def head(self, repo_id: str, branch: str = "main") -> str:
        return self.repos[repo_id].branches[branch]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Every file at a revision, as stored."""
        with self.lock:
            commit = self.commits[self.resolve(self.repos[repo_id], revision)]
            return {p: self.blobs[e.sha256] for p, e in commit.files.items()}

    def history(self, repo_id: str, branch: str = "main") -> list[Commit]:
        """Commits reachable from a branch, newest first."""
        out = []
        oid: str | None = self.repos[repo_id].branches[branch]
        while oid is not None:
            out.append(self.commits[oid])
            oid = self.commits[oid].parent
        return out

    def requests(self, method: str | None = None, contains: str = "") -> list[tuple[str, str, int]]:
        return [r for r in self.log if (method is None or r[0] == method) and contains in r[1]]

    # ----- storage ----------------------------------------------------------------------------------
    def new_commit(self, repo: Repo, parent: str | None, files: dict[str, FileEntry], title: str) -> Commit:
        seed = json.dumps([repo.repo_id, parent, title, next(self._counter),
                           sorted((p, e.sha256) for p, e in files.items())]).encode()
        commit = Commit(hashlib.sha1(seed).hexdigest(), parent, files, title,
                        datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"))
        self.commits[commit.oid] = commit
        return commit

    def store(self, data: bytes, lfs: bool) -> FileEntry:
        sha = hashlib.sha256(data).hexdigest()
        self.blobs.setdefault(sha, data)
        return FileEntry(sha, len(data), lfs)

    def create_repo(self, repo_id: str, owner: str, private: bool) -> Repo:
        repo = Repo(repo_id, owner, private)
        attrs = self.store(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", False)
        commit = self.new_commit(repo, None, {".gitattributes": attrs}, "initial commit")
        repo.branches["main"] = commit.oid
        self.repos[repo_id] = repo
        return repo

    def resolve(self, repo: Repo, rev: str) -> str:
        for prefix, table in (("refs/heads/", repo.branches), ("refs/tags/", repo.tags)):
            if rev.startswith(prefix) and rev[len(prefix):] in table:
                return table[rev[len(prefix):]]
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.tags:
            return repo.tags[rev]
        if re.fullmatch(r"[0-9a-f]{40}", rev) and rev in self.commits and self._reachable(repo, rev):
            return rev
        raise HubHTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _reachable(self, repo: Repo, oid: str) -> bool:
        for head in itertools.chain(repo.branches.values(), repo.tags.values()):
            cur: str | None = head
            while cur is not None:
                if cur == oid:
                    return True
                cur = self.commits[cur].parent
        return False


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-body (as it should on a hostile one) is not an error of the server."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _is_lfs(path: str, size: int, sample: bytes) -> bool:
    return size >= LFS_THRESHOLD or path.endswith(LFS_SUFFIXES) or b"\0" in sample


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out without waiting for delayed ACKs
    wbufsize = 1 << 16  # one write per response; handle_one_request flushes

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr
        pass

    def setup(self) -> None:
        super().setup()
        with self.hub.lock:
            self.hub.connections.add(self.connection)
            self.hub.threads.append(threading.current_thread())

    def finish(self) -> None:
        with self.hub.lock:
            self.hub.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    # ----- plumbing ---------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _json_body(self) -> Any:
        body = self._body()
        return json.loads(body) if body else {}

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.hub.log.append((self.command, self.path, status))
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        user = self.hub.tokens.get(token)
        if user is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        return user

    def _repo(self, repo_id: str, *, write: bool = False) -> Repo:
        user = self._user()
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            raise HubHTTPError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if write and user is None:
            raise HubHTTPError(401, "You must be authenticated to write to a repo")
        if write and user != repo.owner:
            raise HubHTTPError(403, "You don't have the rights to write to this repo")
        return repo

    def _fault(self, method: str, path: str) -> Fault | None:
        with self.hub.lock:
            for f in self.hub.faults:
                if f.method == method and f.times != 0 and fnmatch.fnmatchcase(path, f.pattern):
                    if f.times > 0:
                        f.times -= 1
                    f.hits += 1
                    return f
        return None

    def _dispatch(self, method: str) -> None:
        raw = urlsplit(self.path)
        segments = [unquote(s) for s in raw.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(raw.query).items()}
        fault = self._fault(method, unquote(raw.path))
        if fault is not None and fault.mode == "stall":
            self.hub.stopping.wait(fault.delay)
        if fault is not None and fault.mode == "drop":
            self.close_connection = True  # no answer at all: the client sees the connection close
            return
        if fault is not None and fault.mode == "500":
            self._body()
            self._send_json(500, {"error": "Internal Error - injected fault"})
            return
        for hook_method, pattern, fn in list(self.hub.hooks):
            if hook_method == method and fnmatch.fnmatchcase(unquote(raw.path), pattern):
                with self.hub.lock:
                    fn(self.hub)
        self._stream: tuple[int, bytes, dict[str, str], Fault] | None = None
        try:
            with self.hub.lock:
                self._route(method, segments, query, fault)
            if self._stream is not None:
                self._send_stream(*self._stream)
        except HubHTTPError as e:
            headers = dict(e.headers)
            if e.code:
                headers["X-Error-Code"] = e.code
            headers["X-Error-Message"] = e.message
            self._send_json(e.status, {"error": e.message}, headers)

    def _route(self, method: str, seg: list[str], query: dict[str, str], fault: Fault | None) -> None:
        hub = self.hub
        if method == "POST" and seg[:3] == ["api", "repos", "create"]:
            return self._create_repo(self._json_body())
        if method == "DELETE" and seg[:3] == ["api", "repos", "delete"]:
            return self._delete_repo(self._json_body())
        if method == "POST" and seg[:2] == ["api", "validate-yaml"]:
            return self._validate_yaml(self._json_body())
        if method == "GET" and seg[:2] == ["api", "whoami-v2"]:
            user = self._user()
            if user is None:
                raise HubHTTPError(401, "Invalid credentials in Authorization header")
            return self._send_json(200, {"type": "user", "name": user})
        if len(seg) >= 4 and seg[0] == "api" and seg[1] == "models":
            repo_id = f"{seg[2]}/{seg[3]}"
            rest = seg[4:]
            if method == "GET" and not rest:
                return self._model_info(repo_id, "main", fault)
            if method == "GET" and rest[0] == "revision" and len(rest) == 2:
                return self._model_info(repo_id, rest[1], fault)
            if method == "GET" and rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), query.get("recursive") in ("True", "true", "1"),
                                  int(query.get("cursor", 0)))
            if method == "GET" and rest == ["refs"]:
                return self._refs(repo_id)
            if method == "POST" and rest[0] == "preupload" and len(rest) == 2:
                return self._preupload(repo_id, rest[1], self._json_body())
            if method == "POST" and rest[0] == "commit" and len(rest) == 2:
                return self._commit(repo_id, rest[1], self._body())
            if method == "POST" and rest[0] == "branch" and len(rest) == 2:
                return self._create_branch(repo_id, rest[1], self._json_body())
            if method == "POST" and rest[0] == "tag" and len(rest) == 2:
                return self._create_tag(repo_id, rest[1], self._json_body())
        if method == "POST" and len(seg) >= 2 and seg[1].endswith(".git") and seg[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{seg[0]}/{seg[1][:-4]}", self._json_body())
        if method == "PUT" and seg[:1] == ["lfs-upload"] and len(seg) == 2:
            return self._lfs_upload(seg[1], self._body())
        if method == "POST" and seg[:1] == ["lfs-verify"]:
            body = self._json_body()
            if body.get("oid") not in hub.blobs:
                raise HubHTTPError(404, "object not uploaded")
            return self._send_json(200, {})
        if method in ("GET", "HEAD") and len(seg) >= 5 and seg[2] == "resolve":
            return self._resolve(method, f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]), fault)
        raise HubHTTPError(404, f"no route for {method} {self.path}")

    # ----- endpoints --------------------------------------------------------------------------------
    def _create_repo(self, body: dict[str, Any]) -> None:
        user = self._user()
        if user is None:
            raise HubHTTPError(401, "You must be authenticated to create a repo")
        if body.get("type") not in (None, "model"):
            raise HubHTTPError(400, "only model repos here")
        owner = body.get("organization") or user
        if owner != user:
            raise HubHTTPError(403, f"You don't have the rights to create a repo under {owner}")
        repo_id = f"{owner}/{body['name']}"
        if repo_id in self.hub.repos:
            raise HubHTTPError(409, "You already created this model repo", headers={})
        private = body.get("visibility") == "private" or bool(body.get("private"))
        self.hub.create_repo(repo_id, owner, private)
        self._send_json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _delete_repo(self, body: dict[str, Any]) -> None:
        user = self._user()
        repo_id = f"{body.get('organization') or user}/{body.get('name')}"
        self._repo(repo_id, write=True)
        del self.hub.repos[repo_id]
        self._send_json(200, {})

    def _validate_yaml(self, body: dict[str, Any]) -> None:
        content = body.get("content", "")
        m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        errors = []
        if m:
            try:
                meta = yaml.safe_load(m.group(1))
                if meta is not None and not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a mapping"})
            except yaml.YAMLError as e:
                errors.append({"message": f"invalid YAML: {e}"})
        self._send_json(400 if errors else 200, {"errors": errors, "warnings": []})

    def _model_info(self, repo_id: str, rev: str, fault: Fault | None) -> None:
        repo = self._repo(repo_id)
        oid = self.hub.resolve(repo, rev)
        commit = self.hub.commits[oid]
        self._send_json(200, {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
            "author": repo.owner, "sha": fault.value if fault is not None and fault.mode == "sha" else oid, "lastModified": commit.date, "private": repo.private,
            "gated": False, "disabled": False, "tags": [], "library_name": None,
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        })

    def _tree(self, repo_id: str, rev: str, prefix: str, recursive: bool, cursor: int) -> None:
        repo = self._repo(repo_id)
        commit = self.hub.commits[self.hub.resolve(repo, rev)]
        prefix = prefix.strip("/")
        base = f"{prefix}/" if prefix else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, entry in sorted(commit.files.items()):
            if not path.startswith(base):
                continue
            rel = path[len(base):].split("/")
            for depth in range(1, len(rel)):
                if depth > 1 and not recursive:
                    break
                folder = base + "/".join(rel[:depth])
                entries.setdefault(folder, {"type": "directory", "path": folder,
                                            "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0})
            if len(rel) > 1 and not recursive:
                continue
            item: dict[str, Any] = {"type": "file", "path": path, "size": entry.size, "oid": entry.git_oid(self.hub)}
            if entry.lfs:
                item["lfs"] = {"oid": entry.sha256, "size": entry.size,
                               "pointerSize": len(lfs_pointer(entry.sha256, entry.size))}
            entries[path] = item
        if prefix and not entries:
            raise HubHTTPError(404, f"Entry not found: {prefix}", "EntryNotFound")
        items = list(entries.values())
        size = self.hub.tree_page or len(items) or 1
        headers = {}
        if cursor + size < len(items):  # the Hub's paging: a Link header to the next page
            raw = urlsplit(self.path)
            query = "&".join(kv for kv in raw.query.split("&") if kv and not kv.startswith("cursor="))
            headers["Link"] = f'<{self.hub.url}{raw.path}?{query}&cursor={cursor + size}>; rel="next"'
        if self.hub.tree_loop:
            headers["Link"] = f'<{self.hub.url}{self.path}>; rel="next"'
        self._send_json(200, items[cursor:cursor + size], headers)

    def _refs(self, repo_id: str) -> None:
        repo = self._repo(repo_id)
        self._send_json(200, {
            "branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in sorted(repo.branches.items())],
            "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in sorted(repo.tags.items())],
            "converts": [], "pullRequests": [],
        })

    def _create_branch(self, repo_id: str, branch: str, body: dict[str, Any]) -> None:
        repo = self._repo(repo_id, write=True)
        if branch in repo.branches:
            raise HubHTTPError(409, "Reference already exists")
        repo.branches[branch] = self.hub.resolve(repo, body.get("startingPoint") or "main")
        self._send_json(200, {})

    def _create_tag(self, repo_id: str, rev: str, body: dict[str, Any]) -> None:
        repo = self._repo(repo_id, write=True)
        if body["tag"] in repo.tags:
            raise HubHTTPError(409, "Tag already exists")
        repo.tags[body["tag"]] = self.hub.resolve(repo, rev)
        self._send_json(200, {})

    def _preupload(self, repo_id: str, rev: str, body: dict[str, Any]) -> None:
        repo = self._repo(repo_id, write=True)
        current = self.hub.commits[self.hub.resolve(repo, rev)].files
        out = []
        for f in body.get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = _is_lfs(f["path"], f["size"], sample)
            old = current.get(f["path"])
            oid = None
            if old is not None:
                oid = old.sha256 if old.lfs else old.git_oid(self.hub)
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._send_json(200, {"files": out, "commitOid": self.hub.resolve(repo, rev)})

    def _lfs_batch(self, repo_id: str, body: dict[str, Any]) -> None:
        self._repo(repo_id, write=True)
        if body.get("operation") != "upload":
            raise HubHTTPError(400, "only uploads")
        objects = []
        for obj in body.get("objects", []):
            item: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.blobs:
                self.hub.lfs_pending[obj["oid"]] = obj["size"]
                item["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{obj['oid']}", "header": {}},
                                   "verify": {"href": f"{self.hub.url}/lfs-verify", "header": {}}}
            objects.append(item)
        self._send_json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_upload(self, oid: str, data: bytes) -> None:
        if oid not in self.hub.lfs_pending:
            raise HubHTTPError(404, "no upload pending for this object")
        if hashlib.sha256(data).hexdigest() != oid or len(data) != self.hub.lfs_pending[oid]:
            raise HubHTTPError(400, "uploaded bytes do not match the announced oid/size")
        self.hub.blobs[oid] = data
        del self.hub.lfs_pending[oid]
        self._send(200, b"", content_type="text/plain")

    def _commit(self, repo_id: str, rev: str, body: bytes) -> None:
        repo = self._repo(repo_id, write=True)
        if rev not in repo.branches:
            raise HubHTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubHTTPError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        head = repo.branches[rev]
        parent = header.get("parentCommit")
        if parent is not None and parent != head:
            raise HubHTTPError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(self.hub.commits[head].files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubHTTPError(400, "only base64 contents")
                files[path] = self.hub.store(base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                if value["oid"] not in self.hub.blobs:
                    raise HubHTTPError(422, f"LFS object {value['oid']} for {path} was never uploaded")
                files[path] = FileEntry(value["oid"], len(self.hub.blobs[value["oid"]]), True)
            elif key == "deletedFile":
                if path not in files:
                    raise HubHTTPError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                for p in [p for p in files if p.startswith(path.rstrip("/") + "/")]:
                    del files[p]
            else:
                raise HubHTTPError(400, f"unknown commit operation {key!r}")
        commit = self.hub.new_commit(repo, head, files, header.get("summary") or "")
        repo.branches[rev] = commit.oid
        self._send_json(200, {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{commit.oid}",
                              "commitOid": commit.oid, "success": True})

    def _resolve(self, method: str, repo_id: str, rev: str, path: str, fault: Fault | None) -> None:
        repo = self._repo(repo_id)
        oid = self.hub.resolve(repo, rev)
        entry = self.hub.commits[oid].files.get(path)
        commit_header = fault.value if fault is not None and fault.mode == "commit" else oid
        if entry is None:
            raise HubHTTPError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit_header})
        data = self.hub.blobs[entry.sha256]
        etag = entry.sha256 if entry.lfs else entry.git_oid(self.hub)
        if fault is not None and fault.mode == "etag":
            etag = fault.value
        headers = {"X-Repo-Commit": commit_header, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(entry.size)
        status = 200
        rng = self.headers.get("Range")
        if method == "GET" and rng and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())):
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        if method == "GET" and fault is not None and fault.mode in ("cut", "short"):
            return self._send_cut(status, data, headers, declare_length=fault.mode == "cut")
        if method == "GET" and fault is not None and fault.mode in ("endless", "huge", "drip"):
            self._stream = (status, data, headers, fault)  # sent by _dispatch once the lock is released
            return
        self._send(status, data, headers, content_type="application/octet-stream")

    def _send_stream(self, status: int, data: bytes, headers: dict[str, str], fault: Fault) -> None:
        """An endless body, a huge declared length trickled out, or the true body dripped byte by byte."""
        self.hub.log.append((self.command, self.path, status))
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        if fault.mode == "huge":
            self.send_header("Content-Length", fault.value)
        elif fault.mode == "drip":
            self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.close_connection = True
        if fault.mode == "drip":
            chunks: Any = (data[i:i + 1] for i in range(len(data)))
        else:
            chunks = itertools.chain([data] if fault.mode == "endless" else [], itertools.repeat(b"\0" * 4096))
        deadline = time.monotonic() + STREAM_CAP_S
        with contextlib.suppress(OSError):
            for chunk in chunks:
                if time.monotonic() > deadline or self.hub.stopping.is_set():
                    break
                self.wfile.write(chunk)
                self.wfile.flush()
                if fault.delay:
                    self.hub.stopping.wait(fault.delay)

    def _send_cut(self, status: int, data: bytes, headers: dict[str, str], *, declare_length: bool) -> None:
        """Send half the body and drop the connection."""
        self.hub.log.append((self.command, self.path, status))
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        if declare_length:
            self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True
