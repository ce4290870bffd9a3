"""Loading already checks structure: an adapter whose tensors do not fit its kinds fails at load, with one
clear error, in every command that reads it (not as a crash deep inside merge or compress)."""

from __future__ import annotations

import pytest
import torch
from helpers_spec import invoke, save_unchecked

import adapterfmt as af


def misshapen(path) -> None:
    """A lowrank adapter whose lora_B has the wrong rank (saved without validation, as a buggy tool might)."""
    modules = {"model.layers.0.self_attn.q_proj": af.lowrank_entry([64, 64], 1.0)}
    tensors = {"model.layers.0.self_attn.q_proj.lora_A": torch.ones(4, 64),
               "model.layers.0.self_attn.q_proj.lora_B": torch.ones(64, 3)}
    save_unchecked(af.Adapter(af.new_manifest("lora", modules), tensors), path)


@pytest.mark.parametrize("name", ["bad", "bad.safetensors"])
def test_load_refuses_shapes_that_do_not_fit_the_kind(tmp_path, name: str) -> None:
    misshapen(tmp_path / name)
    with pytest.raises(af.FormatError, match=r"q_proj'.*lora_B has shape \[64, 3\]") as e:
        af.load(tmp_path / name)
    assert str(tmp_path / name) in str(e.value)
    assert af.load(tmp_path / name, verify=False).tensor_names()  # an explicit opt-out still reads it


@pytest.mark.parametrize("command", [
    ["merge", "{a}", "{a}", "--out", "{out}"],
    ["compress", "{a}", "{out}", "--rank", "2"],
    ["convert", "{a}", "{out}", "--to", "peft"],
    ["inspect", "{a}"],
])
def test_every_command_reports_it_in_one_line(tmp_path, command: list[str]) -> None:
    misshapen(tmp_path / "a")
    args = [c.format(a=tmp_path / "a", out=tmp_path / "out") for c in command]
    result = invoke(*args)
    assert result.exit_code == 1
    assert "lora_B has shape [64, 3]" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_data_rules_are_checked_wherever_values_are_used(tmp_path) -> None:
    """Unsorted sparse indices pass the shape checks of load, and are refused when any verb reads them."""
    entry = {"kind": "sparse", "shape": [4, 4], "params": {}}
    save_unchecked(af.Adapter(af.new_manifest("sparse_ft", {"0": entry}),
                              {"0.indices": torch.tensor([5, 2]), "0.values": torch.ones(2)}), tmp_path / "s")
    adapter = af.load(tmp_path / "s")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(af.FormatError, match="strictly increasing") as e:
        af.attach(model, adapter)
    assert str(tmp_path / "s") in str(e.value)
    assert af.attached(model) == []
    with pytest.raises(af.FormatError, match="strictly increasing"):
        af.merge_adapters([adapter, adapter])
    with pytest.raises(af.FormatError, match="strictly increasing"):
        af.validate(tmp_path / "s")
