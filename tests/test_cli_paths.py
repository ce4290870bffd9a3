"""What the ``adapter`` command is given to read: ``hf://owner/name[@rev][/subfolder]`` paths for every
command that takes an adapter (resolved through the real huggingface_hub client against the Hub-API server
in ``tests/hubserver.py``, no mocks), broken safetensors files, and pickles that try to run code."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
import torch
from adapterfmt.cli.main import app
from safetensors.torch import load_file, save_file
from test_hub import FakeHub, fake_hub, hub_env, make_adapter  # noqa: F401  (fixtures)
from typer.testing import CliRunner

import adapterfmt as af
from adapterfmt.hub import client as hub


def cli(*args: str | Path):
    """Run ``adapter ARGS`` in-process; stdout and stderr apart."""
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_refused(result, *fragments: str) -> str:
    """Exit code 1, exactly one line on stderr (no traceback) holding every fragment; returns the line."""
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return af.load(path).tensors()


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


# ----- hf:// on every command that takes an adapter ----------------------------------------------------
@pytest.fixture
def on_hub(hub_env: FakeHub, tmp_path: Path) -> dict[str, object]:
    """alice/a at main (folder form), and a single-file adapter in subfolder sub/ of a later commit; plus
    their local copies and a base checkpoint that fits them."""
    a, b = make_adapter(tmp_path / "a", seed=1), make_adapter(tmp_path / "b.safetensors", seed=2, single_file=True)
    first = hub.push(a, "alice/a").commit
    second = hub_env.commit_directly("alice/a", {"sub/adapter.safetensors": b.read_bytes()})
    gen = torch.Generator().manual_seed(0)
    base = tmp_path / "base"
    base.mkdir()
    save_file({f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(16, 16, generator=gen) for i in range(2)},
              base / "model.safetensors")
    return {"a": a, "b": b, "first": first, "second": second, "base": base}


def test_validate_and_inspect_hf_paths(on_hub: dict, tmp_path: Path) -> None:
    sub = f"hf://alice/a@{on_hub['second']}/sub"
    r = cli("validate", "--json", "hf://alice/a@main", sub, f"hf://alice/a@{on_hub['first']}")
    assert r.exit_code == 0, r.output
    assert [(x["path"], x["valid"]) for x in json.loads(r.stdout)] == [
        ("hf://alice/a@main", True), (sub, True), (f"hf://alice/a@{on_hub['first']}", True)]
    assert_refused(cli("validate", "hf://alice/a@main/nothere"), "alice/a@main", "nothere/adapter.json")
    r = cli("inspect", "--json", sub)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["form"] == "single-file"


def test_convert_hf_path(on_hub: dict, tmp_path: Path) -> None:
    r = cli("convert", "--json", "hf://alice/a", tmp_path / "peft", "--to", "peft")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["src"] == "hf://alice/a"
    af.convert(on_hub["a"], tmp_path / "peft-local", "peft")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "peft" / name).read_bytes() == (tmp_path / "peft-local" / name).read_bytes(), name


def test_merge_and_bake_hf_paths(on_hub: dict, tmp_path: Path) -> None:
    sub = f"hf://alice/a@{on_hub['second']}/sub"
    r = cli("merge", "hf://alice/a@main", sub, "--weights", "0.5,2", "--out", tmp_path / "m.safetensors")
    assert r.exit_code == 0, r.output
    af.save(af.merge_adapters([af.load(on_hub["a"]), af.load(on_hub["b"])], weights=[0.5, 2]),
            tmp_path / "m-local.safetensors")
    assert_same(tensors(tmp_path / "m.safetensors"), tensors(tmp_path / "m-local.safetensors"))
    r = cli("merge", sub, "--into", on_hub["base"], "--out", tmp_path / "baked")
    assert r.exit_code == 0, r.output
    assert cli("merge", on_hub["b"], "--into", on_hub["base"], "--out", tmp_path / "baked-local").exit_code == 0
    got, want = load_file(tmp_path / "baked" / "model.safetensors"), load_file(tmp_path / "baked-local" / "model.safetensors")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in got)


def test_compress_port_and_push_hf_paths(hub_env: FakeHub, on_hub: dict, tmp_path: Path) -> None:
    for src, tag in (("hf://alice/a", "hub"), (on_hub["a"], "local")):
        assert cli("compress", src, tmp_path / f"c-{tag}", "--rank", "2").exit_code == 0
        assert cli("port", src, "--to", on_hub["base"], "--out", tmp_path / f"p-{tag}").exit_code == 0
    assert_same(tensors(tmp_path / "c-hub"), tensors(tmp_path / "c-local"))
    assert_same(tensors(tmp_path / "p-hub"), tensors(tmp_path / "p-local"))
    r = cli("push", f"hf://alice/a@{on_hub['second']}/sub", "alice/copy")
    assert r.exit_code == 0, r.output
    assert hub_env.files("alice/copy")["adapter.safetensors"] == on_hub["b"].read_bytes()


# ----- a broken safetensors file gets its own error, whatever the command -------------------------------
def test_truncated_safetensors_same_error_for_convert_and_inspect(tmp_path: Path) -> None:
    good = make_adapter(tmp_path / "a.safetensors", single_file=True)
    for name, cut in (("short.safetensors", 5), ("cut.safetensors", good.stat().st_size - 7)):
        bad = tmp_path / name
        bad.write_bytes(good.read_bytes()[:cut])
        seen = assert_refused(cli("inspect", bad), str(bad), "truncated")
        assert assert_refused(cli("convert", bad, tmp_path / "out", "--to", "peft"), str(bad)) == seen
        assert "any known format" not in seen
        assert not (tmp_path / "out").exists()
    plain = tmp_path / "plain.safetensors"  # a sound file that simply is no adapter keeps the generic answer
    save_file({"x": torch.ones(2)}, plain)
    assert_refused(cli("convert", plain, tmp_path / "out"), str(plain), "not an adapter in any known format")


# ----- pickles are read with weights_only=True, and a refusal is one line ---------------------------------
class _RunsShell:
    """Unpickling this runs a shell command (what an attacker's checkpoint would do)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("fmt", ["peft", "torchtune"])
def test_malicious_pickle_is_refused_in_one_line(tmp_path: Path, fmt: str) -> None:
    from helpers_formats import llama, llama_modules, lora_adapter

    model = llama()
    folder = af.write_foreign(lora_adapter(model, llama_modules((0,), ("v_proj",))), tmp_path / "src", fmt)
    weights = folder / "adapter_model.safetensors"
    pickle_name = {"peft": "adapter_model.bin", "torchtune": "adapter_model.pt"}[fmt]
    marker = tmp_path / "executed"
    payload: dict[str, object] = dict(load_file(weights))
    payload[next(iter(payload))] = _RunsShell(f"touch {shlex.quote(str(marker))}")
    torch.save(payload, folder / pickle_name)
    weights.unlink()

    line = assert_refused(cli("convert", folder, tmp_path / "out.safetensors", "--allow-pickle"),
                          f"refused to unpickle {pickle_name}", str(folder / pickle_name), "posix.system")
    assert "weights_only` set to `False`" not in line, "no advice to turn the protection off"
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()
    torch.load(folder / pickle_name, weights_only=False)  # the payload is real: unpickled unsafely, it runs
    assert marker.exists()

    (folder / pickle_name).write_bytes((folder / pickle_name).read_bytes()[:100])  # a corrupt checkpoint
    assert_refused(cli("convert", folder, tmp_path / "out.safetensors", "--allow-pickle"),
                   f"cannot read {pickle_name} as a PyTorch checkpoint", str(folder / pickle_name))
    torch.save([torch.ones(1)], folder / pickle_name)  # loads fine, but is no {name: tensor} dict
    assert_refused(cli("convert", folder, tmp_path / "out.safetensors", "--allow-pickle"),
                   f"{pickle_name} does not hold a {{name: tensor}} dict")
