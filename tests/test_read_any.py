"""Every command reads every format (issue 14): ``af.load`` and the commands that read adapters take a foreign
adapter (a PEFT folder made by PEFT itself, a kohya file) by converting it in memory through its format's
codec, with one ``note:`` line on stderr. PEFT is the oracle for what the merged result computes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from helpers_peft import build, case, logits
from helpers_spec import invoke

import adapterfmt as af


@pytest.fixture(scope="module")
def peft_pair(tmp_path_factory: pytest.TempPathFactory):
    from peft import LoraConfig

    tmp = tmp_path_factory.mktemp("peft")
    a = case(tmp / "a", "llama", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]), seed=0)
    b = case(tmp / "b", "llama", LoraConfig(r=3, lora_alpha=3, target_modules=["q_proj", "o_proj"]), seed=0)
    return a, b


def test_load_converts_a_peft_folder_in_memory_and_says_so(peft_pair) -> None:
    a, _ = peft_pair
    with pytest.warns(af.AdapterNote, match=r"read peft folder .*peft-llama \(converted in memory"):
        loaded = af.load(a.folder)
    assert loaded.converted_from == "peft" and loaded.source == a.folder
    converted = af.read_foreign(a.folder, "peft")
    assert loaded.tensor_names() == converted.tensor_names()
    for name in converted.tensor_names():
        assert torch.equal(loaded.tensor(name), converted.tensor(name))
    model = build("llama")
    af.attach(model, loaded)
    torch.testing.assert_close(logits(model, a.ids), a.expected, rtol=1e-5, atol=1e-5)


def test_inspect_and_validate_a_peft_folder(peft_pair) -> None:
    a, _ = peft_pair
    r = invoke("inspect", str(a.folder))
    assert r.exit_code == 0, r.output
    assert "peft folder, converted in memory" in r.stdout and "r=2 x4" in r.stdout
    note = f"note: read peft folder {a.folder} (converted in memory; `adapter convert` keeps a copy)"
    assert r.stderr.strip().splitlines() == [note]
    info = json.loads(invoke("inspect", str(a.folder), "--json").stdout)
    assert info["form"] == "peft folder, converted in memory" and info["checksums"].startswith("none")
    r = invoke("validate", str(a.folder))
    assert r.exit_code == 0 and "valid" in r.stdout and "note: read peft folder" in r.stderr


def test_merge_two_peft_folders_equals_peft_with_both_active(peft_pair, tmp_path: Path) -> None:
    from peft import PeftModel

    a, b = peft_pair
    r = invoke("merge", str(a.folder), str(b.folder), "--out", str(tmp_path / "ab"))
    assert r.exit_code == 0, r.output
    assert r.stderr.count("note: read peft folder") == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(build("llama"), a.folder, adapter_name="a")
        pm.load_adapter(b.folder, adapter_name="b")
        pm.base_model.set_adapter(["a", "b"])
        expected = logits(pm.eval(), a.ids)
    model = build("llama")
    af.attach(model, af.load(tmp_path / "ab"))
    torch.testing.assert_close(logits(model, a.ids), expected, rtol=1e-5, atol=1e-5)


def test_compress_a_peft_folder(peft_pair, tmp_path: Path) -> None:
    _, b = peft_pair
    r = invoke("compress", str(b.folder), "--rank", "2", "--out", str(tmp_path / "small"), "--json")
    assert r.exit_code == 0, r.output
    small = af.load(tmp_path / "small")
    assert {small.shape(f"{m}.lora_A")[0] for m in small.modules} == {2}
    assert json.loads(r.stdout)["bytes_before"] > 0


def test_a_kohya_file_loads_too(tmp_path: Path) -> None:
    from helpers_cli import lora

    kohya = af.write_foreign(lora(1), tmp_path / "k.safetensors", "kohya")
    with pytest.warns(af.AdapterNote, match="read kohya file"):
        loaded = af.load(kohya)
    assert loaded.converted_from == "kohya" and len(loaded.modules) == 4


def test_a_folder_in_no_known_format_keeps_its_error(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("hello")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no note for what was not read
        with pytest.raises(af.MissingFileError, match="adapter.json is missing"):
            af.load(tmp_path / "x")
    r = invoke("inspect", str(tmp_path / "x"))
    assert r.exit_code == 1 and "adapter.json is missing" in r.stderr and "note" not in r.stderr
