"""Hub push / pull, driven through the real ``huggingface_hub`` client over real HTTP against the fake Hub
server in ``tests/hubserver.py`` (127.0.0.1, random port). The HF cache lives in tmp_path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import typer
from adapterfmt.cli import hub_cmd
from typer.testing import CliRunner

import adapterfmt as af
from adapterfmt.hub import client as hub
from adapterfmt.hub.card import parse_front_matter

sys.path.insert(0, str(Path(__file__).parent))
from hubserver import FakeHub  # noqa: E402

TOKEN = "hf_test_token"


# ----- fixtures -------------------------------------------------------------------------------------
@pytest.fixture
def fake_hub():
    server = FakeHub({TOKEN: "alice", "hf_bob": "bob"}).start()
    yield server
    server.stop()


@pytest.fixture
def hub_env(fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    """Point every huggingface_hub setting at the fake server and at tmp_path."""
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    return fake_hub


def make_adapter(path: Path, *, seed: int = 0, rank: int = 4, single_file: bool = False) -> Path:
    gen = torch.Generator().manual_seed(seed)
    modules, tensors = {}, {}
    for i in range(2):
        m = f"model.layers.{i}.self_attn.q_proj"
        modules[m] = {"kind": "lowrank", "shape": [16, 16], "params": {"scale": 2.0}}
        tensors[f"{m}.lora_A"] = torch.randn(rank, 16, generator=gen)
        tensors[f"{m}.lora_B"] = torch.randn(16, rank, generator=gen)
    manifest = af.new_manifest("lora", modules, base={"name": "org/tiny-base", "revision": None, "fingerprint": None},
                               provenance=[{"tool": "test"}])
    return af.save(af.Adapter(manifest, tensors), path, single_file=single_file)


def snapshot_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(*args: str):
    app = typer.Typer(pretty_exceptions_enable=False)
    hub_cmd.register(app)
    return CliRunner().invoke(app, list(args))


def assert_one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0], lines[0]


# ----- round trips ----------------------------------------------------------------------------------
def test_push_pull_roundtrip_folder_byte_for_byte(hub_env: FakeHub, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a")
    res = hub.push(src, "alice/lora-a")
    assert res.created_repo and res.changed
    assert res.commit == hub_env.head("alice/lora-a")
    assert res.commit_url.endswith(res.commit)
    stored = hub_env.files("alice/lora-a")
    assert stored["adapter.json"] == (src / "adapter.json").read_bytes()
    assert stored["adapter.safetensors"] == (src / "adapter.safetensors").read_bytes()
    assert hub_env.requests("PUT", "/lfs-upload/"), "the safetensors file goes through LFS"

    pulled = hub.pull("alice/lora-a")
    assert pulled.commit == res.commit
    store = tmp_path / "hf_home" / "adapterfmt-hub" / "models--alice--lora-a"
    assert pulled.path == store / res.commit / "root"
    assert sorted(p.name for p in store.iterdir()) == [res.commit, "refs.json"], "no temp folder left behind"
    assert json.loads((store / "refs.json").read_text()) == {"main": res.commit}
    assert snapshot_bytes(pulled.path) == snapshot_bytes(src), "only the adapter's files, byte for byte"
    assert not (pulled.path / "README.md").exists()

    out = hub.pull("alice/lora-a", out=tmp_path / "out").path
    assert out == tmp_path / "out"
    assert (out / "adapter.safetensors").read_bytes() == (src / "adapter.safetensors").read_bytes()
    got, want = json.loads((out / "adapter.json").read_text()), json.loads((src / "adapter.json").read_text())
    prov = got["provenance"].pop()
    assert got == want
    assert prov == {"tool": "adapterfmt", "action": "pull", "source": "hf://alice/lora-a", "revision": "main",
                    "commit": res.commit, "endpoint": hub_env.url}
    af.validate(out)
    # the cache copy was not rewritten by --out
    assert snapshot_bytes(pulled.path) == snapshot_bytes(src)


def test_a_listing_in_pages_is_followed_to_its_end(hub_env: FakeHub, tmp_path: Path) -> None:
    """The Hub pages long tree listings (``Link: rel=next``); a file on the last page is still found."""
    src = make_adapter(tmp_path / "a")
    hub.push(src, "alice/paged")
    hub_env.tree_page = 1  # .gitattributes, README.md, adapter.json, adapter.safetensors: one per page
    listed = len(hub_env.requests("GET", "/api/models/alice/paged/tree/"))  # the push's listing
    pulled = hub.pull("alice/paged", out=tmp_path / "out")
    assert (pulled.path / "adapter.safetensors").read_bytes() == (src / "adapter.safetensors").read_bytes()
    pages = hub_env.requests("GET", "/api/models/alice/paged/tree/")[listed:]
    assert len(pages) == len(hub_env.files("alice/paged")) and sum("cursor=" in p for _, p, _ in pages) == len(pages) - 1
    hub.push(make_adapter(tmp_path / "b", seed=1), "alice/paged")  # push reads the listing too
    assert hub_env.files("alice/paged")["adapter.safetensors"] == (tmp_path / "b" / "adapter.safetensors").read_bytes()


def test_a_listing_whose_connection_drops_is_asked_again(hub_env: FakeHub, tmp_path: Path) -> None:
    hub.push(make_adapter(tmp_path / "a"), "alice/dropped")
    always = hub_env.fail("/api/models/alice/dropped/tree/*", "drop")
    with pytest.raises(af.HubTransferError, match="pull alice/dropped: connection failed"):
        hub.pull("alice/dropped", out=tmp_path / "out")
    assert always.hits == 3 and not (tmp_path / "out").exists()
    always.times = 0
    once = hub_env.fail("/api/models/alice/dropped/tree/*", "drop", times=1)
    assert (hub.pull("alice/dropped", out=tmp_path / "out").path / "adapter.json").is_file()
    assert once.hits == 1


def test_push_pull_single_file(hub_env: FakeHub, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a.safetensors", single_file=True)
    res = hub.push(src, "alice/single")
    assert hub_env.files("alice/single")["adapter.safetensors"] == src.read_bytes()
    pulled = hub.pull("alice/single")
    assert pulled.form == "single-file" and pulled.path.read_bytes() == src.read_bytes()
    out = hub.pull("alice/single", out=tmp_path / "b.safetensors").path
    a, b = af.load(src), af.load(out)
    assert b.manifest["provenance"][-1]["commit"] == res.commit
    for name in a.tensor_names():
        assert torch.equal(a.tensor(name), b.tensor(name))


def test_model_card(hub_env: FakeHub, tmp_path: Path) -> None:
    hub.push(make_adapter(tmp_path / "a", rank=3), "alice/carded")
    card = hub_env.files("alice/carded")["README.md"].decode()
    meta = parse_front_matter(card)
    assert meta["base_model"] == "org/tiny-base"
    assert meta["library_name"] == "adapterfmt"
    assert {"adapterfmt", "lora", "lowrank"} <= set(meta["tags"])
    assert meta["adapterfmt"]["method"] == "lora" and meta["adapterfmt"]["rank"] == 3
    assert meta["adapterfmt"]["size_bytes"] > 0
    assert 'adapterfmt.load("hf://alice/carded")' in card and "adapter pull alice/carded" in card


def test_two_pushes_two_commits_and_pull_by_branch_tag_commit(hub_env: FakeHub, tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    a, b = make_adapter(tmp_path / "a", seed=1), make_adapter(tmp_path / "b", seed=2)
    first = hub.push(a, "alice/versions", message="first")
    second = hub.push(b, "alice/versions", message="second")
    history = hub_env.history("alice/versions")
    assert [c.oid for c in history[:2]] == [second.commit, first.commit]
    assert [c.title for c in history[:2]] == ["second", "first"]
    assert history[0].parent == first.commit

    HfApi(endpoint=hub_env.url, token=TOKEN).create_tag("alice/versions", tag="v1", revision=first.commit)
    dev = hub.push(a, "alice/versions", revision="dev")
    assert dev.revision == "dev" and hub_env.head("alice/versions", "dev") == dev.commit
    assert hub_env.head("alice/versions") == second.commit, "pushing to dev leaves main alone"

    def tensors_of(ref: str, **kw) -> bytes:
        return (hub.pull(ref, **kw).path / "adapter.safetensors").read_bytes()

    a_bytes, b_bytes = (a / "adapter.safetensors").read_bytes(), (b / "adapter.safetensors").read_bytes()
    assert tensors_of("alice/versions") == b_bytes
    assert tensors_of("alice/versions@v1") == a_bytes
    assert tensors_of(f"alice/versions@{first.commit}") == a_bytes
    assert tensors_of("alice/versions", revision="dev") == a_bytes
    assert tensors_of("hf://alice/versions@main") == b_bytes
    assert hub.pull("alice/versions@v1").commit == first.commit


def test_push_unchanged_makes_no_commit(hub_env: FakeHub, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a")
    first = hub.push(src, "alice/same")
    again = hub.push(src, "alice/same")
    assert not again.changed and again.commit == first.commit


def test_switching_form_removes_stale_files(hub_env: FakeHub, tmp_path: Path) -> None:
    hub.push(make_adapter(tmp_path / "a"), "alice/forms")
    hub.push(make_adapter(tmp_path / "a.safetensors", single_file=True), "alice/forms")
    assert "adapter.json" not in hub_env.files("alice/forms")
    assert hub.pull("alice/forms").form == "single-file"


def test_concurrent_push_is_refused_not_overwritten(hub_env: FakeHub, tmp_path: Path) -> None:
    hub.push(make_adapter(tmp_path / "a"), "alice/race")
    raced = {}

    def other_client(server: FakeHub) -> None:
        if not raced:
            raced["oid"] = server.commit_directly("alice/race", {"notes.txt": b"someone else"})

    hub_env.on_request("/api/models/alice/race/preupload/*", other_client)
    with pytest.raises(af.PushConflictError, match="branch moved"):
        hub.push(make_adapter(tmp_path / "b", seed=5), "alice/race")
    assert hub_env.head("alice/race") == raced["oid"]


def test_failed_push_leaves_no_new_repo(hub_env: FakeHub, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a")
    hub_env.fail("/api/models/alice/gone/commit/*", "500", method="POST")
    with pytest.raises(af.HubError):
        hub.push(src, "alice/gone")
    assert "alice/gone" not in hub_env.repos
    assert any(m == "DELETE" and "/api/repos/delete" in p for m, p, _ in hub_env.requests())
    hub.push(src, "alice/kept")  # a repo that existed before the failed push is left as it was
    head = hub_env.head("alice/kept")
    hub_env.fail("/api/models/alice/kept/commit/*", "500", method="POST")
    with pytest.raises(af.HubError):
        hub.push(make_adapter(tmp_path / "b", seed=2), "alice/kept")
    assert hub_env.head("alice/kept") == head


def test_push_a_peft_folder_as_adapterfmt(hub_env: FakeHub, tmp_path: Path) -> None:
    peft_dir = af.to_peft(af.load(make_adapter(tmp_path / "a")), tmp_path / "peft")
    with pytest.warns(af.AdapterNote, match="read peft folder"):
        hub.push(peft_dir, "alice/from-peft")
    files = hub_env.files("alice/from-peft")
    assert {"adapter.json", "adapter.safetensors", "README.md"} <= set(files)
    pulled, converted = af.load(hub.pull("alice/from-peft").path), af.read_foreign(peft_dir, "peft")
    for name in converted.tensor_names():
        assert torch.equal(pulled.tensor(name), converted.tensor(name))


def test_card_base_model_is_a_hub_id_or_absent(hub_env: FakeHub, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "base").mkdir(parents=True)
    src = make_adapter(tmp_path / "a", seed=1)
    for name, expected in (("runs/base", None), (str(tmp_path / "runs" / "base"), None), ("gpt2", "gpt2"),
                           ("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B"), ("a/b/c", None)):
        ad = af.load(src)
        ad.base["name"] = name
        repo = f"alice/card-{abs(hash(name)) % 10**6}"
        hub.push(af.save(ad, tmp_path / "named", overwrite=True), repo)
        card = hub_env.files(repo)["README.md"].decode()
        assert parse_front_matter(card).get("base_model") == expected, name
        assert (name in card) == (expected is not None), name


# ----- hf:// paths and offline use -------------------------------------------------------------------
def test_hf_paths_resolve_through_cache_and_offline(hub_env: FakeHub, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_adapter(tmp_path / "a")
    res = hub.push(src, "alice/offline")
    path = hub.resolve_adapter_path("hf://alice/offline@main")
    assert snapshot_bytes(path) == snapshot_bytes(src)
    assert af.load("hf://alice/offline").source == path  # core's loader goes through resolve_adapter_path

    hub_env.stop()  # unreachable Hub, still online mode: the cached commit is used
    assert hub.resolve_adapter_path("hf://alice/offline@main") == path
    with pytest.raises(af.HubTransferError, match="could not be reached"):
        hub.pull("alice/never-pulled", out=tmp_path / "o")
    assert not (tmp_path / "o").exists()

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve_adapter_path("hf://alice/offline") == path
    assert hub.resolve_adapter_path(f"hf://alice/offline@{res.commit}") == path
    assert af.validate("hf://alice/offline@main").source == path
    with pytest.raises(af.HubError, match="offline"):
        hub.resolve_adapter_path("hf://alice/never-pulled")


def test_subfolder_in_hf_path(hub_env: FakeHub, tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    src = make_adapter(tmp_path / "a")
    api = HfApi(endpoint=hub_env.url, token=TOKEN)
    api.create_repo("alice/multi")
    api.upload_folder(repo_id="alice/multi", folder_path=str(src), path_in_repo="style")
    path = hub.resolve_adapter_path("hf://alice/multi@main/style")
    assert snapshot_bytes(path) == snapshot_bytes(src)


# ----- failures: one clear error, nothing half-written ------------------------------------------------
def test_repo_not_found(hub_env: FakeHub, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(af.RepoNotFoundError, match="alice/missing"):
        hub.pull("alice/missing", out=out)
    assert not out.exists()
    r = run_cli("pull", "alice/missing", "--out", str(out))
    assert_one_line_error(r, "repository alice/missing not found")
    assert not out.exists()


def test_private_repo_needs_a_token_to_pull(hub_env: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.push(make_adapter(tmp_path / "a"), "alice/secret", private=True)
    assert hub_env.repos["alice/secret"].private
    hub.pull("alice/secret")
    monkeypatch.setenv("HF_TOKEN", "hf_bob")
    with pytest.raises(af.RepoNotFoundError):
        hub.pull("alice/secret@main", out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("rev", ["nope", "0123456789abcdef0123456789abcdef01234567"])
def test_revision_not_found(hub_env: FakeHub, tmp_path: Path, rev: str) -> None:
    hub.push(make_adapter(tmp_path / "a"), "alice/revs")
    out = tmp_path / "out"
    with pytest.raises(af.RevisionNotFoundError, match=rev):
        hub.pull(f"alice/revs@{rev}", out=out)
    assert not out.exists()
    r = run_cli("pull", "alice/revs", "--revision", rev, "--out", str(out))
    assert_one_line_error(r, f"revision {rev!r} not found")
    assert not out.exists()


def test_server_error_mid_download(hub_env: FakeHub, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a")
    hub.push(src, "alice/flaky")
    fault = hub_env.fail("/alice/flaky/resolve/*/adapter.safetensors", "500")
    out = tmp_path / "out"
    with pytest.raises(af.HubTransferError, match="HTTP 500"):
        hub.pull("alice/flaky", out=out)
    assert fault.hits == 1, "a download error is reported at once, not retried for minutes"
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    r = run_cli("pull", "alice/flaky", "--out", str(out))
    assert_one_line_error(r, "HTTP 500")
    assert not out.exists()
    fault.times = 0  # the server recovers: the same pull now works (nothing bad was left in the cache)
    assert (hub.pull("alice/flaky", out=out).path / "adapter.safetensors").read_bytes() == \
        (src / "adapter.safetensors").read_bytes()


def test_connection_cut_mid_download(hub_env: FakeHub, tmp_path: Path) -> None:
    hub.push(make_adapter(tmp_path / "a"), "alice/cut")
    hub_env.fail("/alice/cut/resolve/*/adapter.safetensors", "short")
    out = tmp_path / "out"
    with pytest.raises(af.HubTransferError, match="cut short"):
        hub.pull("alice/cut", out=out)
    assert not out.exists()
    r = run_cli("pull", "alice/cut", "--out", str(out))
    assert_one_line_error(r, "cut short")
    assert not out.exists()


def test_connection_dropped_once_is_resumed(hub_env: FakeHub, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a")
    hub.push(src, "alice/resume")
    fault = hub_env.fail("/alice/resume/resolve/*/adapter.safetensors", "cut", times=1)
    out = hub.pull("alice/resume", out=tmp_path / "out").path
    assert fault.hits == 1
    gets = [s for m, p, s in hub_env.log if m == "GET" and p.endswith("/adapter.safetensors")]
    assert len(gets) == 2, "the client retried the broken transfer once"
    assert (out / "adapter.safetensors").read_bytes() == (src / "adapter.safetensors").read_bytes()


def test_tampered_file_on_server(hub_env: FakeHub, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a")
    hub.push(src, "alice/tampered")
    hub_env.tamper("alice/tampered", "adapter.safetensors")
    out = tmp_path / "out"
    with pytest.raises(af.ChecksumError, match="checksum mismatch"):
        hub.pull("alice/tampered", out=out)
    assert not out.exists()
    with pytest.raises(af.ChecksumError):
        hub.resolve_adapter_path("hf://alice/tampered")
    r = run_cli("pull", "alice/tampered", "--out", str(out))
    assert_one_line_error(r, "checksum mismatch")
    assert not out.exists()
    hub_env.tamper("alice/tampered", "adapter.safetensors")  # flip the byte back
    assert (hub.pull("alice/tampered", out=out).path / "adapter.safetensors").read_bytes() == \
        (src / "adapter.safetensors").read_bytes(), "the bad copy was evicted from the cache"


def test_tampered_by_a_later_commit(hub_env: FakeHub, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a")
    good = hub.push(src, "alice/swapped")
    other = make_adapter(tmp_path / "b", seed=9)
    hub_env.commit_directly("alice/swapped", {"adapter.safetensors": (other / "adapter.safetensors").read_bytes()})
    with pytest.raises(af.ChecksumError):
        hub.pull("alice/swapped")
    assert hub.pull(f"alice/swapped@{good.commit}").commit == good.commit


def test_no_token_for_private_push(hub_env: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN")
    src = make_adapter(tmp_path / "a")
    with pytest.raises(af.HubAuthError, match="no Hugging Face token"):
        hub.push(src, "alice/private", private=True)
    assert "alice/private" not in hub_env.repos and not hub_env.log
    r = run_cli("push", str(src), "alice/private", "--private")
    assert_one_line_error(r, "no Hugging Face token")


def test_bad_token_and_foreign_namespace(hub_env: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_adapter(tmp_path / "a")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(af.HubAuthError, match="HTTP 401"):
        hub.push(src, "alice/x")
    monkeypatch.setenv("HF_TOKEN", "hf_bob")
    with pytest.raises(af.HubAuthError, match="HTTP 403"):
        hub.push(src, "alice/x")
    assert not hub_env.repos


def test_invalid_adapter_is_not_pushed(hub_env: FakeHub, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a")
    data = bytearray((src / "adapter.safetensors").read_bytes())
    data[-1] ^= 1
    (src / "adapter.safetensors").write_bytes(bytes(data))
    with pytest.raises(af.ChecksumError):
        hub.push(src, "alice/bad")
    assert not hub_env.repos


def test_repo_without_adapter(hub_env: FakeHub, tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_env.url, token=TOKEN)
    api.create_repo("alice/peft-only")
    api.upload_file(repo_id="alice/peft-only", path_or_fileobj=b"{}", path_in_repo="adapter_config.json")
    with pytest.raises(af.NotAnAdapterRepoError, match="adapter convert"):
        hub.pull("alice/peft-only")


def test_existing_out_is_refused_before_downloading(hub_env: FakeHub, tmp_path: Path) -> None:
    hub.push(make_adapter(tmp_path / "a"), "alice/o")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    n = len(hub_env.log)
    with pytest.raises(af.OutputExistsError):
        hub.pull("alice/o", out=out)
    assert len(hub_env.log) == n and (out / "keep.txt").read_text() == "mine"
    hub.pull("alice/o", out=out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "adapter.json").exists()


# ----- --also-peft ------------------------------------------------------------------------------------
def test_also_peft_without_the_peft_plugin(hub_env: FakeHub, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERFMT_BLOCK_PLUGINS", "peft_format")
    af.registry.reset()
    try:
        with pytest.raises(af.UnsupportedError, match="'peft' format plugin"):
            hub.push(make_adapter(tmp_path / "a"), "alice/nopeft", also_peft=True)
    finally:
        monkeypatch.delenv("ADAPTERFMT_BLOCK_PLUGINS")
        af.registry.reset()
    assert "alice/nopeft" not in hub_env.repos, "the PEFT copy is made before the repo is created"


# ----- CLI --------------------------------------------------------------------------------------------
def test_cli_push_and_pull_json(hub_env: FakeHub, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a")
    r = run_cli("push", str(src), "alice/cli", "--message", "from the CLI", "--json")
    assert r.exit_code == 0, r.output
    pushed = json.loads(r.stdout)
    assert pushed["commit"] == hub_env.head("alice/cli") and pushed["created_repo"]
    assert hub_env.history("alice/cli")[0].title == "from the CLI"
    r = run_cli("push", str(src), "alice/cli", "--revision", "exp")
    assert r.exit_code == 0, r.output
    assert hub_env.head("alice/cli", "exp") in r.stdout and "alice/cli@exp" in r.stdout
    r = run_cli("pull", f"alice/cli@{pushed['commit']}", "--out", str(tmp_path / "o"), "--json")
    assert r.exit_code == 0, r.output
    pulled = json.loads(r.stdout)
    assert pulled["commit"] == pushed["commit"] and pulled["path"] == str(tmp_path / "o")
    af.validate(tmp_path / "o")


def test_cli_help_texts() -> None:
    for cmd in ("push", "pull"):
        r = run_cli(cmd, "--help")
        assert r.exit_code == 0
        assert "Hub" in r.stdout
    assert "--also-peft" in run_cli("push", "--help").stdout


def test_also_peft_with_the_real_converter(hub_env: FakeHub, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a")
    res = hub.push(src, "alice/both", also_peft=True)
    files = hub_env.files("alice/both")
    assert json.loads(files["adapter_config.json"])["peft_type"] == "LORA"
    assert "adapter.json" in files
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(res.files)
    assert "peft" in parse_front_matter(files["README.md"].decode())["tags"]
    peft_dir = tmp_path / "peft-copy"
    peft_dir.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (peft_dir / name).write_bytes(files[name])
    back, original = af.read_foreign(peft_dir, "peft"), af.load(src)
    assert back.modules.keys() == original.modules.keys()
    for m, entry in original.modules.items():
        kind = af.registry.get_kind(entry["kind"])
        torch.testing.assert_close(kind.delta(back.modules[m], back.module_tensors(m)),
                                   kind.delta(entry, original.module_tensors(m)), rtol=0, atol=0)
    assert hub.pull("alice/both").form == "folder", "pull takes the adapterfmt files, not the PEFT copy"
    hub.push(make_adapter(tmp_path / "b", seed=3), "alice/both")  # a later push without PEFT drops stale copies
    assert "adapter_config.json" not in hub_env.files("alice/both")
