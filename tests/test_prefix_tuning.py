"""Prefix tuning (kind ``prefix``): PEFT's prefix-tuning folders on tiny Llama (grouped-query) and GPT-2
models read by ``adapter convert``, attached with ``af.attach`` giving PEFT's logits, and written back as
files PEFT reloads with the same logits; refusals in one line."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
from helpers_peft import build, case, load_peft, logits
from helpers_spec import invoke
from peft import PrefixTuningConfig
from safetensors.torch import load_file

import adapterfmt as af

ATOL = 1e-5


@pytest.mark.parametrize(("model", "projection"), [("llama", False), ("gpt2", False), ("llama", True)])
def test_prefix_tuning_reads_applies_and_writes_back_as_peft(tmp_path, model, projection):
    c = case(tmp_path, model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                 prefix_projection=projection, encoder_hidden_size=12))
    adapter = af.read_foreign(c.folder, base=c.base)
    ((path, entry),) = adapter.modules.items()
    assert entry["kind"] == "prefix" and path == c.base.base_model_prefix
    assert adapter.tensor(f"{path}.keys").shape[:2] == (2, 3)
    m = build(model)
    base_out = logits(m, c.ids)
    af.attach(m, adapter)
    got = logits(m, c.ids)
    assert (got - c.expected).abs().max() <= ATOL < (base_out - c.expected).abs().max()
    mask = torch.ones_like(c.ids)  # a given mask is extended by the prefix, as PEFT extends it
    with torch.no_grad():
        assert (m(c.ids, attention_mask=mask).logits - c.expected).abs().max() <= ATOL
    af.detach(m)
    assert torch.equal(logits(m, c.ids), base_out)

    af.write_foreign(adapter, tmp_path / "back", "peft", base=c.base)
    pm, missing, unexpected = load_peft(model, tmp_path / "back")
    assert missing == [] and unexpected == []
    assert (logits(pm, c.ids) - c.expected).abs().max() <= ATOL
    assert torch.equal(load_file(tmp_path / "back" / "adapter_model.safetensors")["prompt_embeddings"],
                       load_file(c.folder / "adapter_model.safetensors")["prompt_embeddings"])


def test_prefix_convert_cli_and_refusals(tmp_path):
    c = case(tmp_path, "llama", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    res = invoke("convert", str(c.folder), str(tmp_path / "o.safetensors"))  # no base: the stack is unnamed
    assert res.exit_code == 1 and "does not name the decoder stack" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "o.safetensors").exists()
    c.base.save_pretrained(tmp_path / "base")  # a checkpoint folder names it: model.layers.0. ...
    res = invoke("convert", str(c.folder), str(tmp_path / "o.safetensors"), "--base", str(tmp_path / "base"))
    assert res.exit_code == 0, res.stderr
    adapter = af.load(tmp_path / "o.safetensors")
    m = build("llama")
    af.attach(m, adapter)
    assert (logits(m, c.ids) - c.expected).abs().max() <= ATOL
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, vocab_size=48,
                                         num_attention_heads=2, num_key_value_heads=2))  # not 1 key/value head
    with pytest.raises(af.BaseMismatchError, match=r"\[layers, kv_heads, head_dim\] \[2, 1, 8\].*\[2, 2, 8\]"):
        af.attach(other, adapter, name="p")
    m = build("llama")
    af.attach(m, adapter, name="p")
    with pytest.raises(af.UnsupportedError, match="cannot be merged"):
        af.merge_into(m, "p")
    with pytest.raises(af.UnsupportedError, match="per-row adapter ids"), af.adapter_ids(m, ["p", None]):
        logits(m, c.ids)


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_cached_generation_equals_one_call_on_the_whole_sequence(tmp_path, model):
    """Greedy generate (the cache holds the prefix after the first step) scores each step as one forward pass
    on the whole sequence does (that forward is PEFT's, tested above). PEFT 0.21.2's own generate is not used:
    on transformers 5.24 its scores differ from its own forward's by ~0.03-0.08."""
    c = case(tmp_path, model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    m = build(model)
    af.attach(m, af.read_foreign(c.folder, base=c.base))
    out = m.generate(input_ids=c.ids, attention_mask=torch.ones_like(c.ids), max_new_tokens=3, do_sample=False,
                     pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    full = logits(m, out.sequences)
    t = c.ids.shape[1]
    assert len(out.scores) == 3
    for i, scores in enumerate(out.scores):
        assert (scores - full[:, t - 1 + i]).abs().max() <= ATOL
