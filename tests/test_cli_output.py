"""Output conventions (docs/CLI.md): flags read as flags in --help, ``adapter --version``, and output that stays
readable at 80 columns and through a pipe (no path or module name cut or broken; tables that fit or one row
per line; --json unchanged)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
import typer
from adapterfmt.cli.main import app
from helpers_cli import cli
from helpers_spec import run_adapter

import adapterfmt as af

COMMANDS = [c.name for c in app.registered_commands]
LONG = [f"model.decoder.layers.{i}.encoder_attention_block.output_projection_{'x' * 20}" for i in range(3)]


@pytest.mark.parametrize("command", COMMANDS + ["plugin new", "plugin check"])
def test_flags_read_as_flags(command):
    r = cli(*command.split(), "--help")
    assert r.exit_code == 0, r.output
    assert "<bool>" not in r.stdout
    flags = [ln for ln in r.stdout.splitlines() if "--json " in ln or "--overwrite " in ln or "--help " in ln]
    assert flags and all("<" not in ln.split("--", 1)[1].split("  ", 1)[0] for ln in flags)


def test_version():
    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"adapter (adapterfmt) {af.__version__}"
    assert "--version" in cli("--help").stdout


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter with module names too long for an 80-column table, deep in a long path."""
    g = torch.Generator().manual_seed(0)
    modules = {m: af.lowrank_entry([16, 16], scale=1.0) for m in LONG}
    tensors = {f"{m}.lora_{r}": torch.randn(16, 16, generator=g) for m in LONG for r in "AB"}
    deep = tmp_path_factory.mktemp("w") / ("a-rather-long-folder-name-" * 3) / "and-another-one-below-it"
    return af.save(af.Adapter(af.new_manifest("lora", modules), tensors), deep / "adapter")


def _table_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln[:1] in "┏┃┡│└┌├"]


def test_piped_80_columns_keeps_names_whole(wide: Path, tmp_path: Path):
    r = run_adapter("inspect", str(wide), "--modules")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert f"path          {wide} (folder)" in lines  # one line, however long
    for m in LONG:  # the module table does not fit: one line per module, the name whole
        assert any(ln.startswith(f"{m}  kind: lowrank  shape: 16x16") for ln in lines), r.stdout
    assert "…" not in r.stdout
    assert all(len(ln) <= 80 for ln in _table_lines(r.stdout))

    out = wide.parent / "compressed-with-a-long-name.safetensors"
    r = run_adapter("compress", str(wide), "-o", str(out), "--rank", "2")
    assert r.returncode == 0, r.stderr
    assert f"compressed {wide} -> {out}" in r.stdout.splitlines()
    assert all(m in r.stdout for m in LONG) and "…" not in r.stdout

    names = [f"layers.{i}.q_proj" for i in range(2)]
    small = af.Adapter(af.new_manifest("lora", {m: af.lowrank_entry([16, 16], scale=1.0) for m in names}),
                       {f"{m}.lora_{r}": torch.ones(16, 16) for m in names for r in "AB"})
    r = run_adapter("inspect", str(af.save(small, tmp_path / "short")), "--modules")
    assert r.returncode == 0 and len(_table_lines(r.stdout)) == 4 + len(names)  # fits: a table
    assert all(len(ln) <= 80 for ln in _table_lines(r.stdout)) and all(m in r.stdout for m in names)


def test_json_is_not_wrapped(wide: Path):
    r = run_adapter("inspect", str(wide), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["path"] == str(wide) and sorted(m["module"] for m in info["modules"]) == sorted(LONG)
    assert json.loads(cli("inspect", str(wide), "--json").stdout) == info


@pytest.mark.parametrize("group", [[], ["plugin"]])
def test_command_lists_show_first_paragraphs_unbroken(group, monkeypatch):
    """A command list shows each command's first docstring paragraph as one text, rich wrapping it only at the
    width (typer's rich mode kept the docstring's line breaks: train's `adapterfmt.cli.main train` split in two)."""
    monkeypatch.setenv("COLUMNS", "1000")
    r = cli(*group, "--help")
    assert r.exit_code == 0, r.output
    root = typer.main.get_command(app)
    for name in group:
        root = root.commands[name]
    lines = r.stdout.splitlines()
    for name, command in root.commands.items():
        first = " ".join(inspect.cleandoc(command.help).split("\n\n")[0].split())
        assert any(ln.strip("│ ").startswith(name) and first in ln for ln in lines), (name, first)
