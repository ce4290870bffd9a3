"""No command hands back a file that validate refuses: save checks the adapter before writing (issue 12, item 7)."""

from __future__ import annotations

import json

import pytest
from helpers_peft import case
from helpers_spec import EXAMPLES, invoke
from peft import IA3Config, LoraConfig

import adapterfmt as af


def test_save_refuses_an_invalid_manifest_and_writes_nothing(tmp_path):
    a = af.load(EXAMPLES / "lowrank")
    a.manifest["base"]["revision"] = 5  # the schema says a string
    with pytest.raises(af.FormatError, match=r"not written, the adapter is invalid: manifest field base/revision"):
        af.save(a, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_tensors_that_do_not_fit_their_kind(tmp_path):
    a = af.load(EXAMPLES / "lowrank")
    module = sorted(a.modules)[0]
    a.modules[module]["shape"] = [a.modules[module]["shape"][0] + 1, a.modules[module]["shape"][1]]
    with pytest.raises(af.FormatError, match="not written"):
        af.save(a, tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_convert_of_a_peft_folder_with_a_non_string_revision_exits_1_and_writes_nothing(tmp_path):
    c = case(tmp_path, "llama", LoraConfig(r=2, target_modules=["q_proj"]))
    cfg_path = c.folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["revision"] = 7
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    result = invoke("convert", str(c.folder), str(out))
    assert result.exit_code != 0
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()


def test_ia3_fan_in_fan_out_on_llama_converts_to_what_peft_computes(tmp_path):
    """PEFT resets fan_in_fan_out on nn.Linear; the converted adapter must load and compute PEFT's logits."""
    import torch

    c = case(tmp_path, "llama", IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                          fan_in_fan_out=True))
    out = tmp_path / "out"
    result = invoke("convert", str(c.folder), str(out))
    assert result.exit_code == 0, result.output
    model = c.base
    af.attach(model, af.validate(out))
    with torch.no_grad():
        torch.testing.assert_close(model(c.ids).logits, c.expected, atol=1e-5, rtol=0)
