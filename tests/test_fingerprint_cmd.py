"""A converted adapter without ``--base`` records no base fingerprint: ``convert`` says so, and
``adapter fingerprint ADAPTER --base BASE`` (``af.record_base``) adds it later, atomically, after checking
that every module fits the base (issue 14)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_cli import cli, lora, tiny_setup
from helpers_spec import tree

import adapterfmt as af
from adapterfmt.tiny import TinyConfig, build_tiny, save_tiny


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    paths = tiny_setup(tmp_path)
    paths["peft"] = af.to_peft(lora(3), tmp_path / "peft")  # a PEFT folder that names no base
    return paths


def test_convert_without_base_says_no_fingerprint(setup: dict[str, Path], tmp_path: Path) -> None:
    r = cli("convert", setup["peft"], "--out", tmp_path / "conv")
    assert r.exit_code == 0, r.output
    assert f"note: no base fingerprint recorded (no --base), so merge, bake and port cannot check the base; add " \
           f"it with `adapter fingerprint {tmp_path / 'conv'} --base BASE`" in r.stderr
    assert af.load(tmp_path / "conv").base.get("fingerprint") is None
    r = cli("convert", setup["peft"], "--out", tmp_path / "with-base", "--base", setup["base"])
    assert r.exit_code == 0 and "no base fingerprint" not in r.stderr


def test_fingerprint_adds_it_in_place(setup: dict[str, Path], tmp_path: Path) -> None:
    cli("convert", setup["peft"], "--out", tmp_path / "conv.safetensors")
    before = af.load(tmp_path / "conv.safetensors").tensors()
    r = cli("fingerprint", tmp_path / "conv.safetensors", "--base", setup["base"])
    assert r.exit_code == 0, r.output
    after = af.validate(tmp_path / "conv.safetensors")
    assert after.base["fingerprint"] == af.fingerprint_checkpoint(setup["base"])
    assert after.tensors().keys() == before.keys()
    assert all(after.tensor(n).equal(t) for n, t in before.items())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("conv")] == ["conv.safetensors"]
    # now a bake into another base is checked against it
    r = cli("merge", tmp_path / "conv.safetensors", "--base", setup["tuned"], "--out", tmp_path / "baked")
    assert r.exit_code == 1 and "fingerprint" in r.stderr


def test_fingerprint_of_a_foreign_folder_needs_out(setup: dict[str, Path], tmp_path: Path) -> None:
    r = cli("fingerprint", setup["peft"], "--base", setup["base"])
    assert r.exit_code == 2 and "give --out" in r.stderr
    r = cli("fingerprint", setup["peft"], "--base", setup["base"], "--out", tmp_path / "fp", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["base"]["fingerprint"] == af.fingerprint_checkpoint(setup["base"])


def test_fingerprint_refuses_a_base_that_does_not_fit(setup: dict[str, Path], tmp_path: Path) -> None:
    cli("convert", setup["peft"], "--out", tmp_path / "conv")
    before = tree(tmp_path / "conv")
    other = save_tiny(build_tiny(config=TinyConfig(hidden=32, intermediate=64)), tmp_path / "small-base")
    r = cli("fingerprint", tmp_path / "conv", "--base", other)
    assert r.exit_code == 1, r.output
    line = r.stderr.strip()
    assert "\n" not in line and "is not a base of this adapter: 4 module(s) do not fit" in line
    assert "expects weight of shape [64, 64], the base has [32, 32]" in line and "and 1 more" in line
    assert tree(tmp_path / "conv") == before
    with pytest.raises(af.BaseMismatchError, match="records another base"):  # new weights: that is a port
        af.record_base(af.load(setup["a"]), setup["tuned"])
