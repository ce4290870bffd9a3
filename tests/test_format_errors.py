"""Broken adapters: each fails with its own specific error, in the library and the CLI (exit 1, one line on
stderr naming the file), and nothing is written. Writes are atomic and never replace an input unless asked."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers_spec import EXAMPLES, invoke, run_adapter, tree

import adapterfmt as af
from adapterfmt.errors import (
    ChecksumError,
    FormatError,
    MissingFileError,
    OutputExistsError,
    SpecVersionError,
    UnsafePathError,
)
from adapterfmt.format.safetensors_io import table_sha256


# ----- making broken files from the golden examples --------------------------------------------------------
def split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(path: Path, header: dict | bytes, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def edit_manifest(path: Path, fn: Callable[[dict], None]) -> None:
    """Change the manifest of a single-file adapter (tensor data, and so its checksum, untouched)."""
    header, data = split(path)
    m = json.loads(header["__metadata__"]["adapterfmt"])
    fn(m)
    header["__metadata__"]["adapterfmt"] = json.dumps(m)
    join(path, header, data)


def edit_folder_manifest(folder: Path, fn: Callable[[dict], None]) -> None:
    m = json.loads((folder / "adapter.json").read_text("utf-8"))
    fn(m)
    (folder / "adapter.json").write_text(json.dumps(m), encoding="utf-8")


def truncate_data(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-5])


def truncate_header(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:40])


def truncate_length(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:5])


def offsets_past_end(p: Path) -> None:
    header, data = split(p)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["data_offsets"][1] += 4
    header[last]["shape"][0] += 0  # shape now disagrees too, but the offsets are checked first
    join(p, header, data)


def offsets_petabytes(p: Path) -> None:
    header, data = split(p)
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [2 ** 48]
    header[name]["data_offsets"] = [0, 4 * 2 ** 48]
    join(p, header, data)


def header_petabytes(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    raw[:8] = struct.pack("<Q", 2 ** 50)
    p.write_bytes(bytes(raw))


def flip_data_byte(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    raw[-3] ^= 0x01
    p.write_bytes(bytes(raw))


def spec_v2(p: Path) -> None:
    edit_manifest(p, lambda m: m.update(spec_version="2.0"))


def reseal(p: Path, header: dict, data: bytes) -> None:
    """Write a single-file adapter with both checksums matching its (edited) tensors, as another writer
    might: what is wrong with it must then be caught by the structure checks."""
    m = json.loads(header["__metadata__"]["adapterfmt"])
    m["files"]["."]["sha256"] = hashlib.sha256(data).hexdigest()
    m["files"]["."]["table_sha256"] = table_sha256(
        {k: (v["dtype"], tuple(v["shape"]), *v["data_offsets"]) for k, v in header.items() if k != "__metadata__"})
    header["__metadata__"]["adapterfmt"] = json.dumps(m)
    join(p, header, data)


def tensor_missing(p: Path) -> None:
    header, data = split(p)
    victim = "model.layers.0.self_attn.q_proj.lora_B"
    start, end = header.pop(victim)["data_offsets"]
    data = data[:start] + data[end:]
    for k, v in header.items():
        if k != "__metadata__" and v["data_offsets"][0] >= end:
            v["data_offsets"] = [o - (end - start) for o in v["data_offsets"]]
    reseal(p, header, data)


def must_understand(p: Path) -> None:
    edit_manifest(p, lambda m: m.update(extensions={"zzvendor.magic": 1}, must_understand=["zzvendor.magic"]))


def metadata_not_utf8(p: Path) -> None:
    header, data = split(p)
    raw = json.dumps(header).encode().replace(b'"spec_version', b'"sp\xff\xfeec_version')
    join(p, raw, data)


def metadata_not_json(p: Path) -> None:
    header, data = split(p)
    header["__metadata__"]["adapterfmt"] = header["__metadata__"]["adapterfmt"][:-7]
    join(p, header, data)


def metadata_absent(p: Path) -> None:
    header, data = split(p)
    del header["__metadata__"]
    join(p, header, data)


SINGLE_FILE_CASES: dict[str, tuple[Callable[[Path], None], type[Exception], str]] = {
    "truncated-data": (truncate_data, FormatError, r"point past the end of the data"),
    "truncated-header": (truncate_header, FormatError, r"truncated safetensors file: header needs"),
    "truncated-length": (truncate_length, FormatError, r"truncated safetensors file \(5 bytes, no header length\)"),
    "offsets-past-end": (offsets_past_end, FormatError, r"data_offsets \[\d+, \d+\] point past the end"),
    "offsets-petabytes": (offsets_petabytes, FormatError, r"data_offsets \[0, 1125899906842624\] point past the end"),
    "header-petabytes": (header_petabytes, FormatError, r"header claims 1125899906842624 bytes"),
    "flipped-byte": (flip_data_byte, ChecksumError, r"checksum mismatch"),
    "spec-2.0": (spec_v2, SpecVersionError, r"spec_version 2.0 is not supported"),
    "tensor-missing": (tensor_missing, FormatError, r"tensor model\.layers\.0\.self_attn\.q_proj\.lora_B is missing"),
    "must-understand": (must_understand, af.UnknownExtensionError, r"does not understand: zzvendor\.magic"),
    "metadata-not-utf8": (metadata_not_utf8, FormatError, r"header is not valid UTF-8"),
    "metadata-not-json": (metadata_not_json, FormatError, r"manifest is not valid JSON"),
    "not-adapterfmt": (metadata_absent, FormatError, r"no 'adapterfmt' manifest"),
}


def folder_escape(d: Path) -> None:
    edit_folder_manifest(d, lambda m: m.update(files={"../x": m["files"]["adapter.safetensors"]}))


def folder_absolute(d: Path) -> None:
    edit_folder_manifest(d, lambda m: m.update(files={"/etc/passwd": m["files"]["adapter.safetensors"]}))


def folder_file_missing(d: Path) -> None:
    (d / "adapter.safetensors").unlink()


def folder_manifest_not_utf8(d: Path) -> None:
    (d / "adapter.json").write_bytes(b'{"spec_version": "1.0\xff"}')


def folder_manifest_not_json(d: Path) -> None:
    (d / "adapter.json").write_text('{"spec_version": "1.0",', encoding="utf-8")


def folder_spec_v2(d: Path) -> None:
    edit_folder_manifest(d, lambda m: m.update(spec_version="2.0"))


def folder_flipped(d: Path) -> None:
    flip_data_byte(d / "adapter.safetensors")


FOLDER_CASES: dict[str, tuple[Callable[[Path], None], type[Exception], str]] = {
    "path-escapes": (folder_escape, UnsafePathError, r"file path '\.\./x' in the manifest escapes the adapter folder"),
    "path-absolute": (folder_absolute, UnsafePathError, r"file path '/etc/passwd' in the manifest escapes"),
    "file-missing": (folder_file_missing, MissingFileError, r"tensor file 'adapter\.safetensors' named in adapter\.json is missing"),
    "manifest-not-utf8": (folder_manifest_not_utf8, FormatError, r"manifest is not valid UTF-8"),
    "manifest-not-json": (folder_manifest_not_json, FormatError, r"manifest is not valid JSON"),
    "spec-2.0": (folder_spec_v2, SpecVersionError, r"spec_version 2.0 is not supported"),
    "flipped-byte": (folder_flipped, ChecksumError, r"checksum mismatch"),
}


def make_bad(tmp_path: Path, case: str, folder: bool) -> tuple[Path, type[Exception], str]:
    if folder:
        fn, err, pattern = FOLDER_CASES[case]
        bad = tmp_path / f"{case}-adapter"
        shutil.copytree(EXAMPLES / "lowrank", bad)
    else:
        fn, err, pattern = SINGLE_FILE_CASES[case]
        bad = tmp_path / f"{case}.safetensors"
        shutil.copy(EXAMPLES / "lowrank.safetensors", bad)
    fn(bad)
    return bad, err, pattern


CASES = [(c, False) for c in SINGLE_FILE_CASES] + [(c, True) for c in FOLDER_CASES]
IDS = [f"{'folder' if f else 'file'}-{c}" for c, f in CASES]


@pytest.mark.parametrize(("case", "folder"), CASES, ids=IDS)
def test_library_raises_the_specific_error_and_writes_nothing(tmp_path, case, folder):
    bad, err, pattern = make_bad(tmp_path, case, folder)
    before = tree(tmp_path)
    with pytest.raises(err, match=pattern) as info:
        af.save(af.validate(bad), tmp_path / "copy.safetensors")
    assert type(info.value) is err, f"{type(info.value).__name__} is not the specific {err.__name__}"
    assert info.value.path is not None and info.value.path.startswith(str(bad)), "the error must name the file"
    assert tree(tmp_path) == before, "a failed read must not write anything"


COMMANDS = {  # commands that read an adapter; the writing ones get an output path that must stay absent
    "validate": [], "inspect": [],
    "convert": ["{out}", "--to", "peft"], "compress": ["{out}", "--bits", "8"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(("case", "folder"), CASES, ids=IDS)
def test_cli_exits_1_with_one_line_naming_the_file(tmp_path, case, folder, command):
    bad, err, pattern = make_bad(tmp_path, case, folder)
    before = tree(tmp_path)
    r = invoke(command, str(bad), *(a.format(out=tmp_path / "out") for a in COMMANDS[command]))
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(bad) in lines[0] and "Traceback" not in r.stderr
    assert r.stdout == ""
    if command == "validate":
        assert lines[0].startswith(f"invalid {err.__name__}: ")
    assert tree(tmp_path) == before


def test_the_real_command_reports_each_bad_file_on_its_own_line(tmp_path):
    """One process, every broken file: exit 1, one stderr line per file, valid ones still listed as valid."""
    bad = [make_bad(tmp_path, c, f)[0] for c, f in CASES]
    good = EXAMPLES / "sparse.safetensors"
    r = run_adapter("validate", str(good), *map(str, bad))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == len(bad) and "Traceback" not in r.stderr
    for path, line in zip(bad, lines):
        assert str(path) in line
    assert r.stdout.strip() == f"valid   {good}"


def test_debug_env_shows_the_traceback(tmp_path):
    bad, _, _ = make_bad(tmp_path, "flipped-byte", False)
    r = run_adapter("inspect", str(bad), env={"ADAPTERFMT_DEBUG": "1"})
    assert r.returncode == 1 and "Traceback" in r.stderr and "ChecksumError" in r.stderr


def test_unverified_load_still_checks_structure(tmp_path):
    """``verify=False`` skips the checksum, nothing else."""
    bad, _, _ = make_bad(tmp_path, "flipped-byte", False)
    assert af.load(bad, verify=False).tensor_names()
    bad2, err, pattern = make_bad(tmp_path, "offsets-past-end", False)
    with pytest.raises(err, match=pattern):
        af.load(bad2, verify=False)


def test_dora_magnitude_with_a_lora_bias_is_refused(tmp_path):
    adapter = af.load(EXAMPLES / "lowrank")
    down = "model.layers.0.mlp.down_proj"
    tensors = {**adapter.tensors(), f"{down}.bias": torch.zeros(8)}
    path = tmp_path / "both.safetensors"
    with pytest.raises(FormatError, match="not written.*cannot have both magnitude .DoRA. and bias"):
        af.save(af.Adapter(adapter.manifest, tensors), path)
    assert not path.exists()
    shutil.copy(EXAMPLES / "lowrank.safetensors", path)  # the same file made by another writer
    header, data = split(path)
    header[f"{down}.bias"] = {"dtype": "F32", "shape": [8], "data_offsets": [len(data), len(data) + 32]}
    reseal(path, header, data + bytes(32))
    with pytest.raises(FormatError, match="cannot have both magnitude .DoRA. and bias"):
        af.validate(path)
    r = invoke("validate", str(path))
    assert r.exit_code == 1 and "cannot have both" in r.stderr


def test_must_understand_passes_for_core_fields_and_is_refused_otherwise(tmp_path):
    ok = tmp_path / "ok.safetensors"
    shutil.copy(EXAMPLES / "lowrank.safetensors", ok)
    edit_manifest(ok, lambda m: m.update(must_understand=["compression", "base"]))
    af.validate(ok)
    edit_manifest(ok, lambda m: m.update(must_understand=["compression", "future_field"]))
    with pytest.raises(FormatError, match="does not understand: future_field"):
        af.load(ok)


def test_newer_minor_version_and_unknown_fields_are_accepted(tmp_path):
    p = tmp_path / "newer.safetensors"
    shutil.copy(EXAMPLES / "lowrank.safetensors", p)

    def newer(m: dict) -> None:
        m["spec_version"] = "1.7"
        m["some_future_field"] = {"x": 1}
        m["modules"]["model.layers.0.self_attn.q_proj"]["future_entry_field"] = [1, 2]
        m["extensions"] = {"acme.unknown": True}

    edit_manifest(p, newer)
    a = af.validate(p)
    assert a.manifest["spec_version"] == "1.7"


# ----- writes ------------------------------------------------------------------------------------------------
def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    src = tmp_path / "in.safetensors"
    shutil.copy(EXAMPLES / "dense.safetensors", src)
    original = src.read_bytes()
    adapter = af.load(EXAMPLES / "sparse.safetensors")
    for target in (src, tmp_path):
        with pytest.raises(OutputExistsError, match="output exists"):
            af.save(adapter, target, single_file=target is src)
    assert src.read_bytes() == original
    af.save(adapter, src, overwrite=True)
    assert src.read_bytes() == (EXAMPLES / "sparse.safetensors").read_bytes()
    folder = tmp_path / "folder"
    af.save(adapter, folder)
    af.save(af.load(EXAMPLES / "dense"), folder, overwrite=True)
    assert tree(folder) == tree(EXAMPLES / "dense")


def test_saving_an_adapter_over_its_own_source_reads_it_first(tmp_path):
    """``overwrite=True`` onto the file being read: the lazily-read tensors are read before the rename."""
    p = tmp_path / "self.safetensors"
    shutil.copy(EXAMPLES / "lowrank.safetensors", p)
    af.save(af.load(p), p, overwrite=True)
    assert p.read_bytes() == (EXAMPLES / "lowrank.safetensors").read_bytes()


WRITE_FAILS = r"""
import resource, signal, sys, torch, adapterfmt as af
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
big = af.Adapter(af.new_manifest("task_vector", {"m": {"kind": "dense", "shape": [64, 64]}}),
                 {"m.delta": torch.ones(64, 64)})
for target in sys.argv[1:]:
    try:
        af.save(big, target, overwrite=True)
    except OSError as e:
        print("failed:", e.errno)
"""


def test_a_write_failing_midway_leaves_the_old_output_and_no_temp_files(tmp_path):
    """A real failure mid-write (file size limit, EFBIG): the previous output is intact, no partial file."""
    shutil.copy(EXAMPLES / "sparse.safetensors", tmp_path / "old.safetensors")
    shutil.copytree(EXAMPLES / "sparse", tmp_path / "old-folder")
    before = tree(tmp_path)
    targets = [str(tmp_path / "old.safetensors"), str(tmp_path / "old-folder")]
    r = subprocess.run([sys.executable, "-c", WRITE_FAILS, *targets], capture_output=True, text=True, timeout=120)
    assert r.stdout.split("\n")[:2] == ["failed: 27", "failed: 27"], r.stdout + r.stderr  # EFBIG
    assert tree(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == ["old-folder", "old.safetensors"]
