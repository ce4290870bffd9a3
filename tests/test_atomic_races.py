"""Racing writers, killed writers and linked manifests (issue 12, items 9-11)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers_spec import EXAMPLES

import adapterfmt as af
from adapterfmt.format.atomic import atomic_dir, atomic_file, clean_stale


def test_file_that_appears_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "a.safetensors"
    with pytest.raises(af.OutputExistsError, match="appeared while it was being written"):
        with atomic_file(out) as f:
            f.write(b"second writer")
            out.write_bytes(b"first writer, finished")  # the other writer's rename lands first
    assert out.read_bytes() == b"first writer, finished"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]  # no temporary left


def test_folder_that_appears_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "baked"
    with pytest.raises(af.OutputExistsError):
        with atomic_dir(out) as tmp:
            (tmp / "x").write_text("second")
            out.mkdir()
            (out / "x").write_text("first")
    assert (out / "x").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baked"]


def test_overwrite_still_replaces(tmp_path):
    out = tmp_path / "a.bin"
    out.write_bytes(b"old")
    with atomic_file(out, overwrite=True) as f:
        f.write(b"new")
    assert out.read_bytes() == b"new"


def test_save_race_single_file(tmp_path):
    src = af.load(EXAMPLES / "lowrank.safetensors")
    out = tmp_path / "o.safetensors"
    af.save(src, out)
    before = out.read_bytes()
    # a second save without overwrite is refused up front, and the file is unchanged
    with pytest.raises(af.OutputExistsError):
        af.save(af.load(EXAMPLES / "lowrank.safetensors"), out)
    assert out.read_bytes() == before


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from adapterfmt.format.atomic import atomic_dir, atomic_file
    out = sys.argv[1]
    if sys.argv[2] == "dir":
        with atomic_dir(out) as tmp:
            (tmp / "part").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)
    with atomic_file(out) as f:
        f.write(b"x" * 1000)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("form", ["dir", "file"])
def test_temporaries_of_killed_writers_are_cleaned_on_the_next_run(tmp_path, form):
    out = tmp_path / ("out" if form == "dir" else "out.safetensors")
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out), form], capture_output=True)
    assert proc.returncode == -9
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert len(left) == 1 and not out.exists()
    # a live process's temporary (this one's pid) is kept
    mine = tmp_path / f".{out.name}.{os.getpid()}.abc.tmp"
    mine.write_bytes(b"in progress")
    af.save(af.load(EXAMPLES / "lowrank.safetensors"), out)
    assert out.exists() and mine.exists()
    assert not left[0].exists()
    assert clean_stale(out) == []


def test_manifest_linked_out_of_the_folder_is_refused(tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(EXAMPLES / "lowrank", folder)
    outside = tmp_path / "outside.json"
    shutil.move(folder / "adapter.json", outside)
    (folder / "adapter.json").symlink_to(outside)
    with pytest.raises(af.UnsafePathError, match="outside the adapter folder"):
        af.load(folder)
    # a link that stays inside the folder is fine
    inner = folder / "real.json"
    shutil.move(outside, inner)
    (folder / "adapter.json").unlink()
    (folder / "adapter.json").symlink_to("real.json")
    golden = af.load(EXAMPLES / "lowrank")
    name = golden.tensor_names()[0]
    assert torch.equal(af.load(folder).tensor(name), golden.tensor(name))
