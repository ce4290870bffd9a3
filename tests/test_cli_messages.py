"""Honest refusals (issue 14): demo never replaces files without --overwrite, the README's Python example can be
run twice, a file that is not safetensors is called that, and wrong-architecture errors stay one short line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adapterfmt as af
from adapterfmt.tiny import TinyConfig, build_tiny, save_tiny

from helpers_cli import cli
from helpers_spec import ROOT


def test_demo_refuses_a_workdir_with_files(tmp_path):
    mine = tmp_path / "lowrank-adapter"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own notes")
    r = cli("demo", "--workdir", tmp_path)
    assert r.exit_code == 1 and "--overwrite" in r.stderr and str(tmp_path) in r.stderr
    assert [p.name for p in tmp_path.rglob("*")] == ["lowrank-adapter", "notes.txt"]
    assert (mine / "notes.txt").read_text() == "my own notes"


def readme_python_example() -> str:
    """The first Python block of the README's tour (the Python API)."""
    text = (ROOT / "README.md").read_text("utf-8")
    tour = text[text.index("### The Python API"):]
    return re.search(r"```python\n(.*?)```", tour, re.S).group(1)


def test_readme_python_example_runs_twice(tmp_path):
    code = readme_python_example()
    assert "af.save(adapter, \"my-lora\"" in code
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    assert af.load(tmp_path / "my-lora").modules == af.load(tmp_path / "my-lora.safetensors").modules


@pytest.mark.parametrize("content", [b"hello world, these are my notes\n", b"\x89PNG\r\n\x1a\n" + b"\0" * 64])
def test_not_a_safetensors_file(tmp_path, content):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    r = cli("inspect", path)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1, r.stderr
    assert "not a safetensors file" in lines[0] and "claims" not in lines[0] and str(path) in lines[0]


@pytest.fixture(scope="module")
def other_arch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A LoRA on every linear module of the tiny model, and a base of another width."""
    folder = tmp_path_factory.mktemp("arch")
    model = build_tiny(0)
    names = [n for n, m in model.named_modules() if type(m).__name__ == "Linear" and n.startswith("model.")]
    modules, tensors = {}, {}
    for n in names:
        out_f, in_f = model.get_submodule(n).weight.shape
        modules[n] = af.lowrank_entry([out_f, in_f], scale=1.0)
        tensors[f"{n}.lora_A"], tensors[f"{n}.lora_B"] = torch.full((4, in_f), 0.01), torch.full((out_f, 4), 0.01)
    return {"adapter": af.save(af.Adapter(af.new_manifest("lora", modules), tensors), folder / "wide"),
            "base": save_tiny(build_tiny(0, TinyConfig(hidden=32, intermediate=64)), folder / "h32"),
            "count": len(names)}


@pytest.mark.parametrize("command", [["port", "{adapter}", "--base", "{base}", "-o", "{out}"],
                                     ["merge", "{adapter}", "--base", "{base}", "-o", "{out}", "--force"]])
def test_wrong_architecture_is_one_short_line(other_arch, tmp_path, command):
    args = [c.format(out=tmp_path / "out", **other_arch) for c in command]
    r = cli(*args)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1, r.stderr
    n = other_arch["count"]
    assert n > 6 and f"{n} " in lines[0] and f"and {n - 3} more" in lines[0]
    assert len(lines[0]) < 700, len(lines[0])
    assert not (tmp_path / "out").exists()


def test_the_command_line_hides_bitsandbytes_missing_kernel_line():
    """bitsandbytes logs, on import on AVX512-BF16 CPUs, that an optional kernel package is missing; `adapter`
    commands that import peft (demo, convert) do not show it (on other CPUs the line never appears)."""
    code = "import adapterfmt.cli.main, bitsandbytes, peft"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "kernels-community" not in r.stderr, r.stderr
