"""Pull and push against a hostile Hub: server-given identifiers that are paths (ETag, ``X-Repo-Commit``,
the commit id of ``repo_info``), endless and slow bodies, lying lengths. Every refusal is one line naming the
repo or file, nothing is written outside the store, and no file the tool did not create is touched. The real
``huggingface_hub`` client talks to ``tests/hubserver.py`` over loopback HTTP; limits are set small so each
test takes seconds."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

import adapterfmt as af
from adapterfmt.hub import client as hub

sys.path.insert(0, str(Path(__file__).parent))
from hubserver import CLIENT_WORKER, FakeHub  # noqa: E402
from test_hub import assert_one_line_error, fake_hub, hub_env, make_adapter, run_cli  # noqa: E402, F401

TENSORS = "/alice/*/resolve/*/adapter.safetensors"


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for folders), links not followed."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def pushed(hub_env: FakeHub, tmp_path: Path) -> tuple[Path, dict[str, bytes | None]]:
    """A folder adapter pushed as alice/x, a file the tool must never touch, and the tree before any pull."""
    src = make_adapter(tmp_path / "a")
    hub.push(src, "alice/x")
    (tmp_path / "victim.txt").write_bytes(b"not yours")
    return src, tree(tmp_path)


def assert_nothing_new_outside_store(tmp_path: Path, before: dict[str, bytes | None]) -> None:
    store = "hf_home/adapterfmt-hub/"
    new = {p for p in set(tree(tmp_path)) - set(before) if not ((p + "/").startswith(store) or store.startswith(p + "/"))}
    assert not new, f"written outside the store: {sorted(new)}"
    after = tree(tmp_path)
    assert {p: after.get(p) for p in before} == before, "a file the tool did not create changed or vanished"
    leftovers = [p for p in after if p.startswith(store) and Path(p).name.startswith(".")]
    assert not leftovers, f"temp files left in the store: {leftovers}"


def assert_recovers(hub_env: FakeHub, src: Path, tmp_path: Path) -> None:
    """Once the server behaves, the same pull works: nothing bad was kept."""
    hub_env.faults.clear()
    out = hub.pull("alice/x", out=tmp_path / "good").path
    assert (out / "adapter.safetensors").read_bytes() == (src / "adapter.safetensors").read_bytes()


# ----- server-given identifiers never become paths ------------------------------------------------------
@pytest.mark.parametrize("etag", ["ABS", "../../../../planted", "VICTIM", "W/\"x\"", ""])
@pytest.mark.parametrize("tampered", [False, True])
def test_etag_is_never_used_as_a_path(hub_env: FakeHub, pushed, tmp_path: Path, etag: str, tampered: bool) -> None:
    src, before = pushed
    value = {"ABS": str(tmp_path / "planted-abs"), "VICTIM": str(tmp_path / "victim.txt")}.get(etag, etag)
    hub_env.fail(TENSORS, "etag", value=value)
    hub_env.fail(TENSORS, "etag", method="HEAD", value=value)
    if tampered:  # the old eviction on a checksum refusal unlinked whatever the ETag named
        hub_env.tamper("alice/x", "adapter.safetensors")
        with pytest.raises(af.ChecksumError, match="adapter.safetensors"):
            hub.pull("alice/x")
        hub_env.tamper("alice/x", "adapter.safetensors")
    else:
        pulled = hub.pull("alice/x")
        assert (pulled.path / "adapter.safetensors").read_bytes() == (src / "adapter.safetensors").read_bytes()
    assert (tmp_path / "victim.txt").read_bytes() == b"not yours"
    assert_nothing_new_outside_store(tmp_path, before)
    assert_recovers(hub_env, src, tmp_path)


@pytest.mark.parametrize("sha", ["../../../escaped", "ABS", "A" * 40, "0" * 39, "0" * 40 + "/.."])
def test_commit_id_from_repo_info_must_be_40_hex(hub_env: FakeHub, pushed, tmp_path: Path, sha: str) -> None:
    src, before = pushed
    hub_env.fail("/api/models/alice/x/revision/*", "sha", value=str(tmp_path / "escaped-abs") if sha == "ABS" else sha)
    with pytest.raises(af.HubError, match="not a commit id"):
        hub.pull("alice/x", out=tmp_path / "out")
    r = run_cli("pull", "alice/x", "--out", str(tmp_path / "out"))
    assert_one_line_error(r, "pull alice/x: the server gave commit id")
    assert not (tmp_path / "out").exists()
    assert_nothing_new_outside_store(tmp_path, before)
    store = tmp_path / "hf_home" / "adapterfmt-hub"
    assert not store.exists() or not any(store.rglob("*.safetensors"))
    assert_recovers(hub_env, src, tmp_path)


def test_push_refuses_a_path_as_the_parent_commit(hub_env: FakeHub, pushed, tmp_path: Path) -> None:
    hub_env.fail("/api/models/alice/x/revision/*", "sha", value="../../escaped")
    n = len(hub_env.history("alice/x"))
    with pytest.raises(af.HubError, match="not a commit id"):
        hub.push(make_adapter(tmp_path / "b", seed=4), "alice/x")
    assert len(hub_env.history("alice/x")) == n, "nothing committed"


@pytest.mark.parametrize("file", ["adapter.json", "adapter.safetensors"])
def test_repo_commit_header_holding_a_path(hub_env: FakeHub, pushed, tmp_path: Path, file: str) -> None:
    src, before = pushed
    hub_env.fail(f"/alice/x/resolve/*/{file}", "commit", value="../../../../escaped")
    with pytest.raises(af.HubError, match=f"{file}: the server answered for commit '../../../../escaped'"):
        hub.pull("alice/x")
    r = run_cli("pull", "alice/x", "--out", str(tmp_path / "out"))
    assert_one_line_error(r, "answered for commit")
    assert not (tmp_path / "out").exists() and not (tmp_path / "escaped").exists()
    assert_nothing_new_outside_store(tmp_path, before)
    assert_recovers(hub_env, src, tmp_path)


def test_hf_path_load_refuses_a_hostile_header_in_one_line(hub_env: FakeHub, pushed, tmp_path: Path) -> None:
    """``hf://`` paths in every command go through the same downloader."""
    _, before = pushed
    hub_env.fail(TENSORS, "commit", value="/etc")
    with pytest.raises(af.HubError, match="answered for commit '/etc'"):
        af.load("hf://alice/x")
    assert_nothing_new_outside_store(tmp_path, before)


# ----- sizes and deadlines ---------------------------------------------------------------------------------
def test_endless_body_is_cut_at_the_listed_size(hub_env: FakeHub, pushed, tmp_path: Path) -> None:
    src, before = pushed
    size = (src / "adapter.safetensors").stat().st_size
    hub_env.fail(TENSORS, "endless")
    t0 = time.monotonic()
    with pytest.raises(af.HubTransferError, match=f"adapter.safetensors: the server sent more than the {size} bytes"):
        hub.pull("alice/x", out=tmp_path / "out")
    assert time.monotonic() - t0 < 10
    r = run_cli("pull", "alice/x", "--out", str(tmp_path / "out"))
    assert_one_line_error(r, "sent more than")
    assert_nothing_new_outside_store(tmp_path, before)
    assert_recovers(hub_env, src, tmp_path)


def test_huge_content_length_is_refused_before_reading(hub_env: FakeHub, pushed, tmp_path: Path) -> None:
    src, before = pushed
    hub_env.fail(TENSORS, "huge", value=str(1 << 40), delay=0.01)
    t0 = time.monotonic()
    with pytest.raises(af.HubTransferError, match=r"adapter.safetensors: the server announces 1099511627776 bytes"):
        hub.pull("alice/x")
    assert time.monotonic() - t0 < 10
    assert_nothing_new_outside_store(tmp_path, before)
    assert_recovers(hub_env, src, tmp_path)


def test_slow_drip_hits_the_deadline(hub_env: FakeHub, pushed, tmp_path: Path, monkeypatch) -> None:
    src, before = pushed
    hub_env.fail(TENSORS, "drip", delay=0.05)  # ~1.4 KB at 20 bytes/s: over a minute
    monkeypatch.setenv(hub.TIMEOUT_ENV, "1.5")
    t0 = time.monotonic()
    with pytest.raises(af.HubTransferError, match=r"adapter.safetensors did not finish within 1.5 s"):
        hub.pull("alice/x", out=tmp_path / "out")
    assert time.monotonic() - t0 < 6
    monkeypatch.delenv(hub.TIMEOUT_ENV)
    t0 = time.monotonic()
    r = run_cli("pull", "alice/x", "--out", str(tmp_path / "out"), "--timeout", "1")
    assert_one_line_error(r, "did not finish within 1 s")
    assert time.monotonic() - t0 < 6
    assert not (tmp_path / "out").exists()
    assert_nothing_new_outside_store(tmp_path, before)
    assert_recovers(hub_env, src, tmp_path)


def test_a_listing_whose_pages_loop_is_refused(hub_env: FakeHub, pushed, tmp_path: Path) -> None:
    """A server whose next-page link points back at a page it gave would keep a pull listing forever (no deadline
    is set by default): the repeat is refused in one line."""
    src, before = pushed
    hub_env.tree_loop = True
    r = run_cli("pull", "alice/x", "--out", str(tmp_path / "out"))
    assert_one_line_error(r, "the server's file listing links back to a page it gave")
    assert len(hub_env.requests("GET", "/api/models/alice/x/tree/")) <= 3  # the push's listing, then two pages
    assert not (tmp_path / "out").exists()
    assert_nothing_new_outside_store(tmp_path, before)
    hub_env.tree_loop = False
    assert_recovers(hub_env, src, tmp_path)


def test_a_listing_past_the_page_limit_is_refused(hub_env: FakeHub, pushed, tmp_path: Path, monkeypatch) -> None:
    """New pages without end (each link new) stop at ``MAX_LISTING_PAGES`` (here 2; the repo lists 4 files a page
    each)."""
    src, before = pushed
    hub_env.tree_page = 1
    monkeypatch.setattr(hub, "MAX_LISTING_PAGES", 2)
    with pytest.raises(af.HubError, match="the server's file listing runs past 2 pages"):
        hub.pull("alice/x", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert_nothing_new_outside_store(tmp_path, before)
    monkeypatch.setattr(hub, "MAX_LISTING_PAGES", 4)
    assert_recovers(hub_env, src, tmp_path)


@pytest.mark.parametrize("api", ["revision/*", "tree/*"])
def test_stalled_api_answer_hits_the_deadline(hub_env: FakeHub, pushed, tmp_path: Path, api: str) -> None:
    src, before = pushed
    hub_env.fail(f"/api/models/alice/x/{api}", "stall", delay=8)
    t0 = time.monotonic()
    with pytest.raises(af.HubTransferError, match=r"pull alice/x: .* did not finish within 1 s"):
        hub.pull("alice/x", timeout=1)
    assert time.monotonic() - t0 < 4
    assert_nothing_new_outside_store(tmp_path, before)
    assert_recovers(hub_env, src, tmp_path)
    # The given-up request must end while the server is still up: a retry of huggingface_hub's that met a
    # refused connection would close its shared HTTP client under the next test's requests (EBADF).
    hub_env.stop()
    assert not [t for t in threading.enumerate() if t.name == CLIENT_WORKER]


def test_slow_but_within_the_deadline_succeeds(hub_env: FakeHub, pushed, tmp_path: Path) -> None:
    src, _ = pushed
    hub_env.fail("/alice/x/resolve/*/adapter.json", "drip", delay=0.001)
    pulled = hub.pull("alice/x", timeout=60)
    assert (pulled.path / "adapter.json").read_bytes() == (src / "adapter.json").read_bytes()


def test_manifest_over_the_download_limit(hub_env: FakeHub, pushed, tmp_path: Path, monkeypatch) -> None:
    _, before = pushed
    monkeypatch.setattr(hub, "MAX_MANIFEST_BYTES", 64)
    with pytest.raises(af.HubError, match=r"adapter.json is listed as \d+ bytes, more than the 64 allowed"):
        hub.pull("alice/x")
    assert not [m for m, p, _ in hub_env.log if "/resolve/" in p], "refused before downloading"
    assert_nothing_new_outside_store(tmp_path, before)


@pytest.mark.parametrize("value", ["abc", "0", "-3", "inf", "nan"])
def test_bad_timeout_setting(hub_env: FakeHub, tmp_path: Path, monkeypatch, value: str) -> None:
    monkeypatch.setenv(hub.TIMEOUT_ENV, value)
    n = len(hub_env.log)
    with pytest.raises(af.HubError, match="ADAPTERFMT_HUB_TIMEOUT or --timeout"):
        hub.pull("alice/x")
    assert len(hub_env.log) == n, "refused before asking the Hub"
