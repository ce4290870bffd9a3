"""PEFT's p-tuning through ``adapter convert`` against PEFT's logits (prefix tuning: test_prefix_tuning.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
from helpers_peft import build, case, load_peft, logits
from peft import PromptEncoderConfig
from safetensors.torch import load_file

import adapterfmt as af

ATOL = 1e-5


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_p_tuning_is_its_encoder_output_as_a_prompt(tmp_path, encoder):
    c = case(tmp_path, "llama", PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                    encoder_hidden_size=12, encoder_reparameterization_type=encoder))
    adapter = af.read_foreign(c.folder, base=c.base)
    (entry,) = adapter.modules.values()
    assert entry["kind"] == "prompt"
    model = build("llama")
    af.attach(model, adapter)
    assert (logits(model, c.ids) - c.expected).abs().max() <= ATOL
    af.write_foreign(adapter, tmp_path / "back", "peft", base=c.base)  # as PEFT prompt tuning: the same function
    pm, missing, unexpected = load_peft("llama", tmp_path / "back")
    assert missing == [] and unexpected == []
    assert (logits(pm, c.ids) - c.expected).abs().max() <= ATOL
    assert torch.equal(load_file(tmp_path / "back" / "adapter_model.safetensors")["prompt_embeddings"],
                       load_file(c.folder / "adapter_model.safetensors")["prompt_embeddings"])

