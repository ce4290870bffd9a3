"""The tensor-table checksum (spec 8, version 1.1): header-only edits are caught (issue 12, item 12)."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct

import pytest
from helpers_spec import EXAMPLES

import adapterfmt as af


def _spec_table_sha256(raw_header: dict) -> str:
    """Section 8's definition, written out from the spec text."""
    out = b""
    for name in sorted((n for n in raw_header if n != "__metadata__"), key=lambda n: n.encode("utf-8")):
        e = raw_header[name]
        for text in (name, e["dtype"]):
            out += struct.pack("<Q", len(text.encode())) + text.encode()
        out += struct.pack("<Q", len(e["shape"])) + b"".join(struct.pack("<Q", d) for d in e["shape"])
        out += struct.pack("<QQ", *e["data_offsets"])
    return hashlib.sha256(out).hexdigest()


def _raw_header(path) -> dict:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n])


@pytest.mark.parametrize("name", ["lowrank", "sparse", "encoded"])
def test_golden_table_sha256_follows_the_spec_text(name):
    folder = EXAMPLES / name
    manifest = json.loads((folder / "adapter.json").read_text())
    assert manifest["spec_version"] == "1.2"  # table_sha256 is required from 1.1 on
    assert manifest["files"]["adapter.safetensors"]["table_sha256"] == _spec_table_sha256(
        _raw_header(folder / "adapter.safetensors"))
    single = _raw_header(EXAMPLES / f"{name}.safetensors")
    inner = json.loads(single["__metadata__"]["adapterfmt"])
    assert inner["files"]["."]["table_sha256"] == _spec_table_sha256(single)


def _swap_dtype(path) -> None:
    data = bytearray(path.read_bytes())
    i = data.index(b'"F32"')
    data[i:i + 5] = b'"I32"'  # same byte width: the data region and its sha256 are unchanged
    path.write_bytes(bytes(data))


def test_header_only_dtype_swap_is_refused_in_both_forms(tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(EXAMPLES / "lowrank", folder)
    _swap_dtype(folder / "adapter.safetensors")
    with pytest.raises(af.ChecksumError, match="tensor table"):
        af.load(folder)
    single = tmp_path / "a.safetensors"
    shutil.copy(EXAMPLES / "lowrank.safetensors", single)
    _swap_dtype(single)
    with pytest.raises(af.ChecksumError, match="tensor table"):
        af.load(single)


def test_a_1_1_manifest_without_table_sha256_is_refused_and_1_0_still_reads(tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(EXAMPLES / "lowrank", folder)
    mpath = folder / "adapter.json"
    m = json.loads(mpath.read_text())
    del m["files"]["adapter.safetensors"]["table_sha256"]
    mpath.write_text(json.dumps(m))
    with pytest.raises(af.ChecksumError, match="requires table_sha256"):
        af.load(folder)
    m["spec_version"] = "1.0"  # written before 1.1: data-region integrity only, as that version promised
    mpath.write_text(json.dumps(m))
    old = af.load(folder)
    # rewriting a 1.0 adapter upgrades it to the current version with both checksums
    again = af.load(af.save(old, tmp_path / "b"))
    assert again.manifest["spec_version"] == af.SPEC_VERSION == "1.2"
    assert "table_sha256" in again.manifest["files"]["adapter.safetensors"]
