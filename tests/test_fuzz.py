"""Fuzz (issue 12): seeded mutations of the golden files of ``spec/examples`` and of a real PEFT adapter
folder — JSON edits of manifests, configs and safetensors headers, bit flips, truncations, inserted bytes —
replayed through load + validate (with and without checksums, so mutations reach the checks behind them)
and, for PEFT, through convert. Every failure must be an ``af.AdapterError``, and no case may take long.
A longer run: ``FUZZ_CASES=1000 FUZZ_SEED=x pytest tests/test_fuzz.py`` (cases per source, seed suffix)."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers_spec import EXAMPLES
from torch import nn

import adapterfmt as af

CASES_PER_SOURCE = int(os.environ.get("FUZZ_CASES", "20"))
SEED = os.environ.get("FUZZ_SEED", "")
CASE_SECONDS = 2.0

SENTINEL = "\x01fuzz\x01"
HOSTILE = [  # raw JSON literals put in place of a value
    "1" * 5000, "-" + "9" * 30, str(1 << 64), "-1", "0", "1e999", "-1e999", "1e-999", "0.5", "true", "false",
    "null", "[]", "{}", '""', '"\\ud800"', '"\\udfff\\ud800"', '"a\\u0000b"', '"' + "x" * 1100 + '"',
    '"../x"', '"/etc/passwd"', '"F32"', '"U8"', '["F32"]', "[1e999]", "[-1]", "[0, 0]", "[[[[[]]]]]",
    "[" * 5000 + "]" * 5000, '{"a": 1, "a": 2}', '"1.' + "0" * 5000 + '"', "[65536, 65536]", "[1048576, 1048576]",
    str((1 << 63) - 1), '"ternary"', '"sparse"', '"lowrank"', '"dense"', '"gaps"', '"bitmap"', '"int4"', '"replace"',
    '{"codec": "ternary", "layout": "gaps", "count": 1, "shape": [65536, 65536], "dtype": "F32"}',
    '{"codec": "int4", "group_size": 0, "shape": [8], "dtype": "F16"}', '{"shared": {"lora_A": "nope"}}',
]


# ----- mutations ------------------------------------------------------------------------------------------
def _slots(node: Any, out: list[tuple[Any, Any, int]], depth: int = 0) -> list[tuple[Any, Any, int]]:
    """Every (container, key or index, depth) in a JSON tree."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        out.append((node, k, depth))
        _slots(v, out, depth + 1)
    return out


def edit_json(text: str, rng: random.Random) -> str:
    """One random edit of a JSON text: a value replaced by a hostile literal, a key dropped or renamed, a
    duplicate key added, or a string value made a number."""
    data = json.loads(text)
    slots = _slots(data, [])
    if not slots:
        return rng.choice(HOSTILE)
    deep = [s for s in slots if s[2] >= 2]  # module entries, tensor entries: past the first checks
    node, key, _ = rng.choice(deep if deep and rng.random() < 0.6 else slots)
    op = rng.randrange(4)
    if op == 0 or not isinstance(node, dict):
        node[key] = SENTINEL
        return json.dumps(data).replace(json.dumps(SENTINEL), rng.choice(HOSTILE))
    if op == 1:
        del node[key]
        return json.dumps(data)
    if op == 2:
        node[SENTINEL] = node.pop(key)
        return json.dumps(data).replace(json.dumps(SENTINEL), rng.choice(['"\\ud800"', '""', json.dumps(key * 300)]))
    node[SENTINEL] = node[key]  # a duplicate key
    return json.dumps(data).replace(json.dumps(SENTINEL), json.dumps(key))


def split(raw: bytes) -> tuple[str, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return raw[8:8 + n].decode("utf-8"), raw[8 + n:]


def join(header: str, data: bytes) -> bytes:
    h = header.encode("utf-8", "surrogatepass")
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def edit_header(raw: bytes, rng: random.Random) -> bytes:
    header, data = split(raw)
    return join(edit_json(header, rng), data)


def edit_embedded_manifest(raw: bytes, rng: random.Random) -> bytes:
    """A JSON edit of the manifest inside a single file's ``__metadata__`` (tensor data untouched)."""
    header, data = split(raw)
    h = json.loads(header)
    meta = h.get("__metadata__") or {}
    if "adapterfmt" not in meta:
        return edit_header(raw, rng)
    meta["adapterfmt"] = SENTINEL
    text = json.dumps(h).replace(json.dumps(SENTINEL), json.dumps(edit_json(meta_text(raw), rng)))
    return join(text, data)


def meta_text(raw: bytes) -> str:
    return json.loads(split(raw)[0])["__metadata__"]["adapterfmt"]


def flip_bits(raw: bytes, rng: random.Random) -> bytes:
    b = bytearray(raw)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def truncate(raw: bytes, rng: random.Random) -> bytes:
    return raw[:rng.randrange(len(raw))]


def insert(raw: bytes, rng: random.Random) -> bytes:
    i = rng.randrange(len(raw) + 1)
    return raw[:i] + rng.randbytes(rng.randint(1, 16)) + raw[i:]


def flip_data(raw: bytes, rng: random.Random) -> bytes:
    """Bit flips in the tensor data only (found by the data checks once checksums are off)."""
    header, data = split(raw)
    return join(header, flip_bits(data, rng)) if data else raw


BYTE_MUTATIONS: list[Callable[[bytes, random.Random], bytes]] = [edit_header, flip_bits, truncate, insert, flip_data]
SINGLE_MUTATIONS = [*BYTE_MUTATIONS, edit_embedded_manifest, edit_embedded_manifest]


# ----- running one case -------------------------------------------------------------------------------------
def check_adapter(path: Path) -> None:
    """load + validate with checksums, then without (the deeper checks)."""
    for run in (lambda: af.validate(path), lambda: af.validate(af.load(path, verify=False))):
        try:
            run()
        except af.AdapterError:
            pass


def replay(label: str, path: Path, run: Callable[[], None], failures: list[str], slowest: list[float]) -> None:
    t = time.perf_counter()
    try:
        run()
    except af.AdapterError:
        pass
    except Exception as e:  # noqa: BLE001 - what the fuzz looks for
        where = traceback.extract_tb(e.__traceback__)[-1]
        failures.append(f"{label}: {type(e).__name__}: {str(e)[:200]} at {where.filename}:{where.lineno}")
    slowest.append(time.perf_counter() - t)


def report(failures: list[str], slowest: list[float]) -> None:
    assert not failures, f"{len(failures)} non-AdapterError failure(s):\n" + "\n".join(failures[:20])
    assert max(slowest) < CASE_SECONDS, f"slowest case took {max(slowest):.2f} s"


GOLDEN = sorted(p.name for p in EXAMPLES.iterdir())


@pytest.mark.parametrize("name", GOLDEN)
def test_mutated_golden_files_fail_only_with_adapter_errors(tmp_path, name):
    src = EXAMPLES / name
    rng = random.Random(f"golden:{name}{SEED}")
    failures: list[str] = []
    slowest: list[float] = []
    for case in range(CASES_PER_SOURCE):
        if src.is_dir():
            d = tmp_path / f"c{case}"
            shutil.copytree(src, d)
            if case % 2:
                mpath = d / "adapter.json"
                mpath.write_text(edit_json(mpath.read_text("utf-8"), rng), encoding="utf-8")
                what = "adapter.json edit"
            else:
                tpath = d / "adapter.safetensors"
                mutate = rng.choice(BYTE_MUTATIONS)
                tpath.write_bytes(mutate(tpath.read_bytes(), rng))
                what = mutate.__name__
            target = d
        else:
            mutate = rng.choice(SINGLE_MUTATIONS)
            target = tmp_path / f"c{case}.safetensors"
            target.write_bytes(mutate(src.read_bytes(), rng))
            what = mutate.__name__
        replay(f"{name} case {case} ({what})", target, lambda: check_adapter(target), failures, slowest)
    report(failures, slowest)


# ----- PEFT ---------------------------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.proj = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4, bias=False)


@pytest.fixture(scope="module")
def peft_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(Tiny(), LoraConfig(r=2, lora_alpha=4, target_modules=["proj", "out", "emb"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_()
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(folder)
    return folder


def test_mutated_peft_folders_convert_or_fail_with_adapter_errors(tmp_path, peft_folder):
    af.convert(peft_folder, tmp_path / "clean.safetensors")  # the unmutated folder converts
    rng = random.Random(f"peft{SEED}")
    failures: list[str] = []
    slowest: list[float] = []
    for case in range(3 * CASES_PER_SOURCE):
        d = tmp_path / f"c{case}"
        shutil.copytree(peft_folder, d)
        if case % 3 == 0:
            cfg = d / "adapter_config.json"
            cfg.write_text(edit_json(cfg.read_text("utf-8"), rng), encoding="utf-8")
            what = "config edit"
        else:
            weights = d / "adapter_model.safetensors"
            mutate = rng.choice(BYTE_MUTATIONS)
            weights.write_bytes(mutate(weights.read_bytes(), rng))
            what = mutate.__name__
        out = tmp_path / f"out{case}.safetensors"

        def run(d: Path = d, out: Path = out) -> None:
            af.convert(d, out)
            af.validate(out)

        replay(f"peft case {case} ({what})", d, run, failures, slowest)
    report(failures, slowest)
