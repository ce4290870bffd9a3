"""Prompt tuning and DePT: training, reload, PEFT's prompt tuning as oracle, the dept kind's math."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers_methods import lm_loss, lm_task, one_thread, train  # noqa: F401 (fixture)

import adapterfmt as af
from adapterfmt.tiny import build_tiny

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = af.registry.get_method("prompt_tuning")
DEPT = af.registry.get_method("dept")
EMBED = "model.embed_tokens"


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("method", ["prompt_tuning", "dept"])
def test_training_lowers_the_loss_and_the_adapter_reloads_identically(method: str, tmp_path) -> None:
    model = build_tiny(seed=0)
    batch = lm_task(rows=8, length=8)
    session = af.registry.get_method(method).train(model, config={"num_virtual_tokens": 4, "max_length": 16}
                                                   if method == "dept" else {"num_virtual_tokens": 4})
    assert list(session.layers) == [EMBED]
    start, end = train(lambda: lm_loss(model, batch), session.parameters(), steps=40, lr=0.1)
    assert end < 0.8 * start, (start, end)
    with torch.no_grad():
        trained = model(batch[0])
    assert trained.shape[1] == batch[0].shape[1] + 4
    adapter = session.extract()
    session.remove()
    assert adapter.modules[EMBED]["kind"] == ("dept" if method == "dept" else "prompt")
    assert adapter.config["embedding_module"] == EMBED
    loaded = af.validate(af.save(adapter, tmp_path / "p"))
    name = af.attach(model, loaded)
    with torch.no_grad():
        torch.testing.assert_close(model(batch[0]), trained, atol=0, rtol=0)
    with pytest.raises(af.UnsupportedError, match="cannot be merged"):
        af.merge_into(model, name)


def test_init_from_token_embeddings_repeats_ids_as_peft() -> None:
    model = build_tiny(seed=0)
    session = PROMPT.train(model, config={"num_virtual_tokens": 5, "init": "tokens", "init_token_ids": [7, 9]})
    emb = session.extract().tensor(f"{EMBED}.embeddings")
    session.remove()
    torch.testing.assert_close(emb, model.model.embed_tokens.weight.detach()[[7, 9, 7, 9, 7]])
    with pytest.raises(af.FormatError, match="init_token_ids"):
        PROMPT.train(model, config={"init": "tokens"})


def test_matches_peft_prompt_tuning_forward() -> None:
    """PEFT's PromptEmbedding prepends the virtual tokens to ``inputs_embeds``, extends the attention mask
    with ones in front and passes no position ids (Llama counts positions over the whole sequence). With
    the same virtual token values and the prompt attached to ``embed_tokens``, adapterfmt does the same to the
    model's inputs: every logit matches, padded rows included (an already extended mask is taken as it is)."""
    from peft import PromptTuningConfig, get_peft_model

    base = tiny_llama()
    n = 3
    session = PROMPT.train(base, config={"num_virtual_tokens": n, "seed": 4})
    adapter = session.extract()
    session.remove()
    peft_model = get_peft_model(copy.deepcopy(base), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(adapter.tensor(f"{EMBED}.embeddings"))
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.int64)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding on row 1
    af.attach(base, adapter)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
        got = base(input_ids=ids, attention_mask=mask).logits
        extended = base(input_ids=ids, attention_mask=torch.cat([mask.new_ones(2, n), mask], 1)).logits
        no_mask = base(input_ids=ids[:1]).logits
    assert got.shape == expected.shape == (2, n + 6, 64)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(extended, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(no_mask, expected[:1], atol=1e-6, rtol=1e-6)  # all-ones mask == no mask


def test_dept_kind_math_and_checks() -> None:
    model = build_tiny(seed=0)
    session = DEPT.train(model, config={"num_virtual_tokens": 2, "r": 2, "alpha": 4, "max_length": 5})
    with torch.no_grad():
        for p in session.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    adapter = session.extract()
    session.remove()
    t = adapter.module_tensors(EMBED)
    ids = torch.randint(0, 128, (2, 7))
    plain = model.model.embed_tokens(ids)
    assert adapter.modules[EMBED]["params"]["scale"] == 4 / math.sqrt(2)  # alpha / sqrt(r), as DePT's code
    offset = (4 / math.sqrt(2)) * (t["offset_A"] @ t["offset_B"])
    expected = torch.cat([t["embeddings"].expand(2, 2, -1),
                          plain + torch.cat([offset, torch.zeros(2, plain.shape[-1])])], 1)
    af.attach(model, adapter)
    with torch.no_grad():
        torch.testing.assert_close(model.model.embed_tokens(ids), expected)
        short = model.model.embed_tokens(ids[:, :3])  # shorter than max_length: the first rows of the offset
        torch.testing.assert_close(short[:, 2:], plain[:, :3] + offset[:3])
    bad = copy.deepcopy(adapter.manifest)
    bad_tensors = {**adapter.tensors(), f"{EMBED}.offset_B": torch.zeros(3, 64)}
    with pytest.raises(af.FormatError, match="offset_A"):
        af.validate(af.Adapter(bad, bad_tensors))


def test_dept_default_scale_is_the_authors_alpha_over_sqrt_r() -> None:
    """DePT's ``PromptEmbeddingLoRA`` (peft/tuners/prompt_tuning_lora.py) sets ``scaling = lora_alpha /
    math.sqrt(r)`` with ``lora_alpha`` left at its default 8 by the authors' train.py."""
    model = build_tiny(seed=0)
    session = DEPT.train(model, config={"r": 16})
    params = session.extract().modules[EMBED]["params"]
    session.remove()
    assert params["scale"] == 8 / math.sqrt(16) == 2.0


def test_a_dept_file_applies_the_scale_it_records(tmp_path) -> None:
    """A file written under the old ``alpha / r`` default (scale 1.0 for alpha 4, r 4) applies that scale."""
    model = build_tiny(seed=0)
    session = DEPT.train(model, config={"num_virtual_tokens": 2, "r": 4, "max_length": 6})
    with torch.no_grad():
        for p in session.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    adapter = session.extract()
    session.remove()
    manifest = copy.deepcopy(adapter.manifest)
    manifest["modules"][EMBED]["params"]["scale"] = 1.0
    loaded = af.load(af.save(af.Adapter(manifest, adapter.tensors()), tmp_path / "old"))
    t = loaded.module_tensors(EMBED)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    plain = model.model.embed_tokens(ids)
    af.attach(model, loaded)
    with torch.no_grad():
        got = model.model.embed_tokens(ids)
    torch.testing.assert_close(got[:, 2:], plain + t["offset_A"] @ t["offset_B"], atol=1e-6, rtol=1e-6)
