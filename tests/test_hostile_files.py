"""Hostile files (issue 12): allocation bombs, header and manifest bombs, numbers and strings Python's json
reads but the spec refuses. Each is refused cheaply with one ``AdapterError`` (one CLI line, exit 1), and the
reader limits of spec 4.2 are raised through their environment variables."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers_spec import EXAMPLES, invoke, tree

import adapterfmt as af
from adapterfmt.format import bitpack, codecs, limits
from adapterfmt.format import safetensors_io as sio

BIG = [65536, 65536]  # 2^32 elements: 16 GiB as fp32


# ----- building hostile adapters ----------------------------------------------------------------------------
def save_adapter(path: Path, modules: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write a single-file adapter with matching checksums as another tool might (``af.save`` refuses what
    ``validate`` would refuse)."""
    specs = {n: (sio.dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()}
    data = b"".join(sio.tensor_bytes(tensors[n]) for n in sorted(tensors))
    manifest = af.new_manifest("task_vector", modules)
    manifest["files"] = {".": {"sha256": hashlib.sha256(data).hexdigest(),
                               "table_sha256": sio.table_sha256(sio.layout(specs))}}
    head, _ = sio.encode_specs(specs, {"adapterfmt": json.dumps(manifest)})
    path.write_bytes(head + data)
    return path


def ternary_parts(index: int) -> dict[str, torch.Tensor]:
    """One kept element at flat ``index`` (gaps layout): 3 bytes of gaps, 1 of signs, one scale."""
    return {"gaps": bitpack.encode_gaps(torch.tensor([index])), "signs": bitpack.pack_bits(torch.tensor([True])),
            "scales": torch.tensor([0.5])}


def ternary_kind_bomb(tmp: Path) -> Path:
    parts = ternary_parts(123456)
    return save_adapter(tmp / "ternary.safetensors",
                        {"m": {"kind": "ternary", "shape": BIG, "params": {"layout": "gaps", "count": 1}}},
                        {f"m.{r}": t for r, t in parts.items()})


def codec_bomb(tmp: Path) -> Path:
    parts = ternary_parts(123456)
    spec = {"codec": "ternary", "layout": "gaps", "count": 1, "shape": BIG, "dtype": "F32"}
    return save_adapter(tmp / "codec.safetensors",
                        {"m": {"kind": "dense", "shape": BIG, "params": {"mode": "add"}, "encoding": {"delta": spec}}},
                        {f"m.delta.{r}": t for r, t in parts.items()})


def sparse_bomb(tmp: Path, name: str = "sparse.safetensors") -> Path:
    return save_adapter(tmp / name, {"m": {"kind": "sparse", "shape": [1 << 20, 1 << 20]}},
                        {"m.indices": torch.tensor([5]), "m.values": torch.tensor([1.0])})


def raw_header(path: Path, header_json: bytes, data: bytes = b"") -> Path:
    header_json += b" " * (-len(header_json) % 8)
    path.write_bytes(struct.pack("<Q", len(header_json)) + header_json + data)
    return path


def folder_with_manifest_text(tmp: Path, name: str, edit: Callable[[str], str]) -> Path:
    """The golden sparse folder with its adapter.json text (as ``json.dumps`` writes it) rewritten by ``edit``
    (raw JSON literals allowed)."""
    d = tmp / name
    shutil.copytree(EXAMPLES / "sparse", d)
    text = json.dumps(json.loads((d / "adapter.json").read_text("utf-8")))
    (d / "adapter.json").write_text(edit(text), encoding="utf-8")
    return d


def single_file_with_manifest_text(tmp: Path, name: str, edit: Callable[[str], str]) -> Path:
    """The golden sparse single file with its manifest JSON text rewritten by ``edit``."""
    raw = (EXAMPLES / "sparse.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["__metadata__"]["adapterfmt"] = edit(json.dumps(json.loads(header["__metadata__"]["adapterfmt"])))
    return raw_header(tmp / name, json.dumps(header).encode(), raw[8 + n:])


def expect_refused(path: Path, err: type[Exception], pattern: str) -> af.AdapterError:
    """``validate`` raises exactly ``err`` naming the file; the CLI says one line and exits 1."""
    with pytest.raises(err, match=pattern) as info:
        af.validate(path)
    assert type(info.value) is err, f"{type(info.value).__name__} is not {err.__name__}"
    assert info.value.path is not None and info.value.path.startswith(str(path))
    r = invoke("validate", str(path))
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    return info.value


# ----- 3. allocation bombs ----------------------------------------------------------------------------------
BOUNDED = """
import os, resource, sys
import adapterfmt as af
vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))  # 1 GiB more address space, no more
af.validate(sys.argv[1])                                  # a 16 GiB ternary delta: checked in its sparse form
for call in (lambda: af.load(sys.argv[2]),                # a 3-byte codec payload declaring 16 GiB
             lambda: af.merge_adapters([af.load(sys.argv[3])]),  # one value on a [2^20, 2^20] parameter: 4 TiB
             lambda: af.merge_adapters([af.load(sys.argv[1])])):
    try:
        call()
    except af.LimitError as e:
        print(e.message)
    else:
        raise SystemExit("not refused")
"""


def test_allocation_bombs_are_refused_before_allocating(tmp_path):
    """In a process that cannot map 1 GiB more, validate checks the huge ternary entry without densifying it,
    and load / merge refuse the codec payload and the sparse and ternary deltas with "would need N GiB"."""
    paths = [ternary_kind_bomb(tmp_path), codec_bomb(tmp_path), sparse_bomb(tmp_path)]
    r = subprocess.run([sys.executable, "-c", BOUNDED, *map(str, paths)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "ADAPTERFMT_MAX_DENSE_GIB": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "module 'm': delta (ternary): decoded tensor: a dense [65536, 65536] tensor would need 16 GiB " \
                       "(limit 1 GiB; set ADAPTERFMT_MAX_DENSE_GIB to raise it)"
    assert lines[1].startswith("module 'm': a dense [1048576, 1048576] tensor would need 4.1e+03 GiB")
    assert lines[2].startswith("module 'm': a dense [65536, 65536] tensor would need 16 GiB")


def test_dense_limit_is_raised_by_its_variable(tmp_path, monkeypatch):
    """The same module merges once the limit allows it; the default is half the physical memory."""
    path = save_adapter(tmp_path / "a.safetensors", {"m": {"kind": "sparse", "shape": [512, 1024]}},
                        {"m.indices": torch.tensor([3, 70000]), "m.values": torch.tensor([1.0, -2.0])})
    monkeypatch.setenv("ADAPTERFMT_MAX_DENSE_GIB", "0.001")  # 1 MiB < 2 MiB of fp32
    with pytest.raises(af.LimitError, match=r"would need 0.00195 GiB \(limit 0.001 GiB"):
        af.merge_adapters([af.load(path)])
    monkeypatch.setenv("ADAPTERFMT_MAX_DENSE_GIB", "0.002")
    merged = af.merge_adapters([af.load(path)])
    assert merged.tensor("m.values").tolist() == [1.0, -2.0]
    monkeypatch.setenv("ADAPTERFMT_MAX_DENSE_GIB", "lots")
    with pytest.raises(af.LimitError, match="ADAPTERFMT_MAX_DENSE_GIB must be a positive number, got 'lots'"):
        af.merge_adapters([af.load(path)])
    monkeypatch.delenv("ADAPTERFMT_MAX_DENSE_GIB")
    half = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    assert limits.DENSE_BYTES.value() == half


def test_cli_merge_of_a_sparse_bomb_says_one_line(tmp_path):
    path = sparse_bomb(tmp_path)
    before = tree(tmp_path)
    r = invoke("merge", str(path), str(path), "--out", str(tmp_path / "out.safetensors"))
    assert r.exit_code == 1, r.output
    assert r.stderr.strip().splitlines() == [
        "error: module 'm': a dense [1048576, 1048576] tensor would need 4.1e+03 GiB (limit "
        f"{limits.DENSE_BYTES.value() / (1 << 30):.3g} GiB; set ADAPTERFMT_MAX_DENSE_GIB to raise it)"]
    assert tree(tmp_path) == before


def test_codec_with_a_huge_group_size_decodes_without_expanding_it(tmp_path):
    """int4's group_size near 2^62 (one group) must not be expanded to 2^62 scales."""
    parts, spec = codecs.encode("int4", torch.ones(2, 3), group_size=64)
    one_group = codecs.get_codec("int4").decode(parts, spec)
    spec["group_size"] = 1 << 62
    tensors = {f"m.lora_A.{p}": t for p, t in parts.items()} | {"m.lora_B": torch.ones(4, 2)}
    path = save_adapter(tmp_path / "g.safetensors", {"m": {"kind": "lowrank", "shape": [4, 3],
                                                           "encoding": {"lora_A": spec}}}, tensors)
    assert torch.equal(af.validate(path).module_tensors("m")["lora_A"], one_group)


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_non_finite_codec_scales_are_refused(tmp_path, codec):
    parts, spec = codecs.encode(codec, torch.ones(2, 3))
    parts["scale"][0] = float("inf")
    tensors = {f"m.lora_A.{p}": t for p, t in parts.items()} | {"m.lora_B": torch.ones(4, 2)}
    path = save_adapter(tmp_path / "s.safetensors", {"m": {"kind": "lowrank", "shape": [4, 3],
                                                           "encoding": {"lora_A": spec}}}, tensors)
    expect_refused(path, af.FormatError, rf"module 'm': lora_A \({codec}\): part 'scale' holds a non-finite scale")


# ----- 4. header and manifest bombs -------------------------------------------------------------------------
def test_oversized_header_is_refused_from_its_length(tmp_path):
    """A 40 MiB header (the 99 MB / 1.7 M entry kind) is refused before it is read."""
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 40 << 20))
        f.truncate(8 + (40 << 20))
    t = time.perf_counter()
    expect_refused(path, af.LimitError, r"header claims 41943040 bytes, over the limit of 32 MiB "
                                        r"\(set ADAPTERFMT_MAX_HEADER_MIB to raise it\)")
    assert time.perf_counter() - t < 1.0


def test_header_entry_count_limit(tmp_path, monkeypatch):
    entries = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(101)}
    path = raw_header(tmp_path / "many.safetensors", json.dumps(entries).encode())
    monkeypatch.setenv("ADAPTERFMT_MAX_TENSORS", "100")
    expect_refused(path, af.LimitError, r"safetensors header lists 101 tensors, over the limit of 100 "
                                        r"\(set ADAPTERFMT_MAX_TENSORS to raise it\)")
    monkeypatch.setenv("ADAPTERFMT_MAX_TENSORS", "101")
    with pytest.raises(af.FormatError, match="no 'adapterfmt' manifest"):  # past the limit, read as usual
        af.load(path)


def test_manifest_of_a_million_modules_is_refused_in_well_under_a_second(tmp_path):
    d = tmp_path / "huge"
    shutil.copytree(EXAMPLES / "sparse", d)
    m = json.loads((d / "adapter.json").read_text("utf-8"))
    m["modules"] = {f"layers.{i}.proj": {"kind": "sparse", "shape": [8, 8]} for i in range(1_000_000)}
    (d / "adapter.json").write_text(json.dumps(m), encoding="utf-8")
    t = time.perf_counter()
    expect_refused(d, af.LimitError, r"adapter.json has \d+ bytes, over the limit of 32 MiB "
                                     r"\(set ADAPTERFMT_MAX_JSON_MIB to raise it\)")
    assert time.perf_counter() - t < 1.0


def test_module_count_limit_is_checked_before_the_schema(tmp_path, monkeypatch):
    def many(text: str) -> str:
        m = json.loads(text)
        m["modules"] = {f"layers.{i}.proj": {"kind": "not a kind!"} for i in range(11)}  # schema-invalid too
        return json.dumps(m)

    monkeypatch.setenv("ADAPTERFMT_MAX_MODULES", "10")
    for path in (folder_with_manifest_text(tmp_path, "f", many),
                 single_file_with_manifest_text(tmp_path, "s.safetensors", many)):
        expect_refused(path, af.LimitError, r"manifest has 11 module entries, over the limit of 10 "
                                            r"\(set ADAPTERFMT_MAX_MODULES to raise it\)")


def test_long_names_are_refused(tmp_path, monkeypatch):
    module = "m" * 1100
    path = save_adapter(tmp_path / "long.safetensors", {module: {"kind": "sparse", "shape": [4]}},
                        {f"{module}.indices": torch.tensor([1]), f"{module}.values": torch.tensor([1.0])})
    expect_refused(path, af.LimitError, r"tensor name 'm{40}'\.\.\. has 1108 bytes, over the limit of 1,024")
    monkeypatch.setenv("ADAPTERFMT_MAX_NAME_BYTES", "2000")
    af.validate(path)
    monkeypatch.setenv("ADAPTERFMT_MAX_NAME_BYTES", "1200")
    folder = tmp_path / "long"
    af.save(af.load(path), folder)
    monkeypatch.setenv("ADAPTERFMT_MAX_NAME_BYTES", "1000")
    expect_refused(folder, af.LimitError, r"module path 'm{40}'\.\.\. has 1100 bytes, over the limit of 1,000")


# ----- 5. numbers and strings -------------------------------------------------------------------------------
def sub(old: str, new: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, 1)
    return edit


def with_key(key: str, raw_value: str) -> Callable[[str], str]:
    """Add a top-level manifest key whose value is the raw JSON literal ``raw_value``."""
    return lambda text: text.replace("{", f'{{"{key}": {raw_value}, ', 1)


HUGE_INT = "1" * 5000
MANIFEST_CASES: dict[str, tuple[Callable[[str], str], type[Exception], str]] = {
    "int-5000-digits": (with_key("x", HUGE_INT), af.FormatError, r"integer 1{24}\.\.\. is outside \[-2\^63, 2\^64\)"),
    "int-2^64": (with_key("x", str(1 << 64)), af.FormatError, r"integer 18446744073709551616 is outside"),
    "spec-version-5000-digits": (lambda t: json.dumps({**json.loads(t), "spec_version": "1." + "0" * 5000}),
                                 af.FormatError, r"spec_version must be a 'MAJOR.MINOR' string of at most 9 digits"),
    "scale-1e999": (sub('"scale": 0.25', '"scale": 1e999'), af.FormatError, r"number 1e999 is too large for a float"),
    "provenance-inf": (sub('"provenance": [', '"provenance": [{"tool": "x", "loss": -1E400}, '), af.FormatError,
                       r"number -1E400 is too large"),
    "lone-surrogate": (sub('"version": "1"', '"version": "\\ud800"'), af.FormatError,
                       r"a string holds a lone surrogate escape"),
    "lone-low-surrogate-key": (with_key("\\udc00", "1"), af.FormatError, r"lone surrogate"),
    "nul-in-file-path": (sub('"adapter.safetensors"', '"adapter\\u0000.safetensors"'), af.FormatError,
                         r"file path 'adapter\\x00.safetensors' in the manifest holds a control character"),
    "300-byte-file-name": (sub('"adapter.safetensors"', '"' + "a" * 300 + '.safetensors"'), af.FormatError,
                           r"has a component longer than 255 bytes"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_manifest_numbers_and_strings_are_refused(tmp_path, case):
    edit, err, pattern = MANIFEST_CASES[case]
    folder = folder_with_manifest_text(tmp_path, "f", edit)
    expect_refused(folder, err, pattern)
    if "file" not in case:  # file paths are folder-form keys
        expect_refused(single_file_with_manifest_text(tmp_path, "s.safetensors", edit), err, pattern)


def test_writing_commands_never_meet_a_lone_surrogate(tmp_path):
    """The surrogate reached no writer: convert refuses at the read, writes nothing."""
    folder = folder_with_manifest_text(tmp_path, "f", sub('"version": "1"', '"version": "\\ud800"'))
    before = tree(tmp_path)
    r = invoke("convert", str(folder), str(tmp_path / "out"), "--to", "peft")
    assert r.exit_code == 1 and "lone surrogate" in r.stderr and "Traceback" not in r.stderr
    assert tree(tmp_path) == before


def header_case(tmp: Path, name: str, entry_json: str) -> Path:
    return raw_header(tmp / f"{name}.safetensors", ('{"t": ' + entry_json + "}").encode(), b"\0" * 4)


HEADER_CASES = {
    "dtype-list": ('{"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}', r"tensor 't': unknown dtype "),
    "shape-bool": ('{"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}', r"shape must be a list of non-neg"),
    "offset-5000-digits": ('{"dtype": "F32", "shape": [1], "data_offsets": [0, ' + HUGE_INT + "]}",
                           r"safetensors header is not valid JSON \(integer 1{24}\.\.\. is outside"),
    "shape-1e999": ('{"dtype": "F32", "shape": [1e999], "data_offsets": [0, 4]}', r"number 1e999 is too large"),
    "metadata-surrogate": ('{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"a": "\\udfff"}',
                           r"lone surrogate"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_header_values_are_refused(tmp_path, case):
    entry, pattern = HEADER_CASES[case]
    expect_refused(header_case(tmp_path, case, entry), af.FormatError, pattern)


def test_peft_config_with_a_huge_integer_is_refused(tmp_path):
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ' + HUGE_INT + "}", encoding="utf-8")
    af.write_tensor_file(folder / "adapter_model.safetensors", {"x.lora_A.weight": torch.zeros(1, 1)})
    before = tree(tmp_path)
    r = invoke("convert", str(folder), str(tmp_path / "out.safetensors"))
    assert r.exit_code == 1, r.output
    assert "adapter_config.json is not valid JSON (integer 1111" in r.stderr and "Traceback" not in r.stderr
    assert tree(tmp_path) == before


@pytest.mark.parametrize("weight", ["nan", "1e999", "-inf"])
def test_non_finite_merge_weights_are_refused(tmp_path, weight):
    """A weight JSON cannot hold would end in an unwritable provenance: refused up front, nothing written."""
    r = invoke("merge", str(EXAMPLES / "sparse.safetensors"), "--weights", weight, "--out", str(tmp_path / "o.safetensors"))
    assert r.exit_code == 1, r.output
    assert "merge weights must be finite numbers" in r.stderr and "Traceback" not in r.stderr
    assert tree(tmp_path) == {}
