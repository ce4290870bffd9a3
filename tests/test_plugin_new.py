"""``adapter plugin new``: the generated distribution installs with pip, its entry point loads, and the
conformance kit passes on it (``adapter plugin check`` and the generated tests); every ``--kind`` conforms;
existing folders and bad names are refused with nothing written."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_spec import invoke, run_adapter

from adapterfmt.authoring import scaffold
from adapterfmt.authoring.conformance import CHECKS, check_method
from adapterfmt.plugin import registry


@pytest.fixture
def fresh_registry() -> Iterator[None]:
    old_path = list(sys.path)
    registry.reset()
    try:
        yield
    finally:
        sys.path[:] = old_path
        registry.reset()


def test_generated_plugin_installs_and_conforms(tmp_path: Path) -> None:
    src, site = tmp_path / "src", tmp_path / "site"
    res = invoke("plugin", "new", "scaffolded_kron", "--dir", str(src), "--kind", "custom", "--json")
    assert res.exit_code == 0, res.stderr
    assert sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()) == [
        "README.md", "adapterfmt_scaffolded_kron/__init__.py", "pyproject.toml", "tests/test_conformance.py"]
    assert 'scaffolded_kron = "adapterfmt_scaffolded_kron"' in (src / "pyproject.toml").read_text()
    # installed into a private target folder (not the shared venv): removing the folder uninstalls it
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--no-build-isolation", "--target", str(site), str(src)],
                   check=True, capture_output=True, timeout=300, cwd=tmp_path)
    env = {"PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    methods = run_adapter("methods", "--json", env=env)
    assert '"name": "scaffolded_kron"' in methods.stdout, methods.stderr
    check = run_adapter("plugin", "check", "scaffolded_kron", env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"{len(CHECKS)} passed, 0 failed, 0 skipped" in check.stdout
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(src / "tests")],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, **env})
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert f"{len(CHECKS)} passed" in tests.stdout
    assert run_adapter("plugin", "check", "scaffolded_kron").returncode == 1  # gone without the folder


@pytest.mark.parametrize("kind", [k for k in scaffold.KINDS if k != "custom"])
def test_every_kind_conforms(kind: str, tmp_path: Path, fresh_registry: None) -> None:
    """The other templates, imported from their folder and registered in process (no install)."""
    name = f"scaffolded_{kind}"
    folder = scaffold.new_plugin(name, tmp_path / name, kind=kind)
    sys.path.insert(0, str(folder))
    registry.reset()  # new_plugin looked the methods up (name clash check)
    registry.plugin_manager().register(importlib.import_module(f"adapterfmt_{name}"), name=name)
    try:
        report = check_method(name)
    finally:
        sys.modules.pop(f"adapterfmt_{name}", None)
    assert report.by_status("fail") == {}, report.to_dict()
    expected_skips = {"merge_verb"} if kind == "vector" else set()  # a scaling is not W + dW
    assert set(report.by_status("skip")) == expected_skips
    assert registry.get_method(name).kinds == (kind,)


def test_refusals(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    res = invoke("plugin", "new", "fine_name", "--dir", str(taken))
    assert res.exit_code == 1 and "never writes over" in res.stderr
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    for name, why in (("Bad-Name", "lowercase letters"), ("lora", "already installed")):
        res = invoke("plugin", "new", name, "--dir", str(tmp_path / "out"))
        assert res.exit_code == 1 and why in res.stderr, res.stderr
    res = invoke("plugin", "new", "fine_name", "--dir", str(tmp_path / "out"), "--kind", "nope")
    assert res.exit_code == 1 and "unknown --kind 'nope'" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # nothing written, no temp folder left
