"""Prompt-space kinds (``prompt``, ``dept``, ``multitask_prompt``) on transformers models called with ``input_ids``:
they act on the model's inputs as PEFT's prompt learning does (GPT-2 reshapes its output to the ids' length, so a
prompt prepended inside the model would come back as a wrong shape). Oracles: PEFT's prompt tuning and multitask
prompt tuning (logits, loss, greedy decoding), DePT's formula (spec 6.10) evaluated through ``inputs_embeds``.

PEFT 0.21.2's own ``generate`` is no oracle on transformers 5.24: it looks the cache up as ``past_key_values``
(transformers now calls it ``cache``), so it prepends the prompt again at every decoding step. Greedy decoding is
checked against PEFT's forward re-run on the whole sequence at every step instead."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("peft")
from helpers_peft import VOCAB, build, randomize
from peft import MultitaskPromptTuningConfig, PromptTuningConfig, get_peft_model

import adapterfmt as af

ATOL = 1e-5
N = 4
IDS = torch.randint(1, VOCAB, (3, 6), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # left padding
MODELS = ["gpt2", "llama"]


def peft_folder(tmp_path, model: str, config) -> tuple[torch.nn.Module, af.Adapter]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(build(model), copy.deepcopy(config))
        randomize(pm, 1)
        pm.eval().save_pretrained(tmp_path / "peft")
    return pm, af.read_foreign(tmp_path / "peft", base=build(model))


def greedy(model, steps: int = 4, **task) -> torch.Tensor:
    """Greedy decoding by re-running ``model`` on the whole sequence (no cache) at every step."""
    ids, mask = IDS, MASK
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=ids, attention_mask=mask, **task).logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, mask.new_ones(3, 1)], 1)
    return ids


@pytest.mark.parametrize("model", MODELS)
def test_prompt_tuning_called_with_input_ids_gives_peft_outputs(tmp_path, model):
    pm, adapter = peft_folder(tmp_path, model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    m = build(model)
    af.attach(m, adapter)
    embeds = m.get_input_embeddings()(IDS)
    assert embeds.shape == (3, 6, 16)  # the embedding module itself is left alone: the prompt acts on the inputs
    with torch.no_grad():
        for kwargs in ({"input_ids": IDS}, {"input_ids": IDS, "attention_mask": MASK},
                       {"input_ids": IDS, "attention_mask": MASK, "labels": IDS},
                       {"inputs_embeds": embeds, "attention_mask": MASK}):
            got, want = m(**kwargs), pm(**kwargs)
            assert got.logits.shape == want.logits.shape == (3, N + 6, VOCAB)
            assert (got.logits - want.logits).abs().max() <= ATOL
            if "labels" in kwargs:
                assert abs(got.loss - want.loss) <= ATOL
        assert (m(IDS).logits - pm(input_ids=IDS).logits).abs().max() <= ATOL  # ids given positionally
        assert (m(IDS, position_ids=torch.arange(6).expand(3, -1)).logits - pm(input_ids=IDS).logits).abs().max() \
            <= ATOL  # position ids dropped, as PEFT
    m.generation_config.eos_token_id = pm.generation_config.eos_token_id = None
    with torch.no_grad():
        out = m.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out, greedy(pm))
    af.detach(m)
    with torch.no_grad():
        assert m(IDS).logits.shape == (3, 6, VOCAB)


def test_prompt_tuning_on_a_bert_classifier_gives_peft_outputs():
    """An encoder (PEFT's SEQ_CLS): token type ids get zeros in front, the mask ones; trained here, PEFT given the
    same prompt."""
    base = build("bert")
    session = af.registry.get_method("prompt_tuning").train(base, config={"num_virtual_tokens": N, "seed": 3})
    adapter = session.extract()
    session.remove()
    (path,) = adapter.modules
    assert path == "bert.embeddings.word_embeddings"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(build("bert"), PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N)).eval()
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(adapter.tensor(f"{path}.embeddings"))
    af.attach(base, adapter)
    types = (torch.arange(6) >= 3).long().expand(3, -1)
    with torch.no_grad():
        for kwargs in ({"input_ids": IDS}, {"input_ids": IDS, "attention_mask": MASK, "token_type_ids": types},
                       {"input_ids": IDS, "attention_mask": MASK, "labels": torch.tensor([0, 2, 1])}):
            got, want = base(**kwargs), pm(**kwargs)
            assert got.logits.shape == (3, 3)
            assert (got.logits - want.logits).abs().max() <= ATOL
            if "labels" in kwargs:
                assert abs(got.loss - want.loss) <= ATOL


@pytest.mark.parametrize("model", MODELS)
def test_multitask_prompts_called_with_input_ids_give_peft_outputs(tmp_path, model):
    cfg = MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, num_tasks=3, num_ranks=2)
    pm, adapter = peft_folder(tmp_path, model, cfg)
    mpt = af.registry.get_method("multitask_prompt_tuning")
    m = build(model)
    for task in range(3):
        af.attach(m, mpt.for_task(adapter, task), name=f"t{task}", activate=False)
    with torch.no_grad():
        for task in (0, 2):
            af.activate(m, f"t{task}")
            got = m(input_ids=IDS, attention_mask=MASK).logits
            want = pm(input_ids=IDS, attention_mask=MASK, task_ids=torch.tensor([task] * 3)).logits
            assert got.shape == want.shape == (3, N + 6, VOCAB)
            assert (got - want).abs().max() <= ATOL
        with af.adapter_ids(m, ["t2", "t0", "t1"]):  # per-row tasks, as PEFT's task_ids
            got = m(IDS, attention_mask=MASK).logits
        assert (got - pm(input_ids=IDS, attention_mask=MASK, task_ids=torch.tensor([2, 0, 1])).logits).abs().max() \
            <= ATOL
    af.activate(m, "t1")
    m.generation_config.eos_token_id = pm.generation_config.eos_token_id = None
    with torch.no_grad():
        out = m.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(out, greedy(pm, 3, task_ids=torch.tensor([1] * 3)))


@pytest.mark.parametrize("model", MODELS)
def test_dept_called_with_input_ids_is_its_formula(model):
    """``concat(P, E(ids) + scale * (A @ B)[:T])`` (positions past ``max_length`` unchanged) as the model's
    ``inputs_embeds``, the mask extended by ones."""
    m = build(model)
    session = af.registry.get_method("dept").train(m, config={"num_virtual_tokens": N, "r": 2, "max_length": 5})
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in session.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    adapter = session.extract()
    session.remove()
    ((path, entry),) = adapter.modules.items()
    t = adapter.module_tensors(path)
    offset = entry["params"]["scale"] * (t["offset_A"] @ t["offset_B"])
    base = build(model)
    with torch.no_grad():
        plain = base.get_input_embeddings()(IDS)
        embeds = torch.cat([t["embeddings"].expand(3, -1, -1), plain + torch.cat([offset, torch.zeros(1, 16)])], 1)
        want = base(inputs_embeds=embeds, attention_mask=torch.cat([MASK.new_ones(3, N), MASK], 1)).logits
        af.attach(m, adapter)
        got = m(input_ids=IDS, attention_mask=MASK).logits
    assert got.shape == (3, N + 6, VOCAB)
    assert (got - want).abs().max() <= ATOL


def test_prompt_refusals(tmp_path):
    _, adapter = peft_folder(tmp_path, "gpt2", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    m = build("gpt2")
    af.attach(m, adapter)
    with pytest.raises(af.UnsupportedError, match="ones in front of a 2-D attention mask; got 4-D"):
        m(input_ids=IDS, attention_mask=torch.ones(3, 1, 6, 6))
    with pytest.raises(af.UnsupportedError, match="a prompt of one length on every row"), \
            af.adapter_ids(m, ["prompt_tuning", None, "prompt_tuning"]):
        m(IDS)  # a row without the prompt would be shorter
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
                                             vocab_size=VOCAB)).eval()
    manifest = af.new_manifest("prompt_tuning", {"shared": {"kind": "prompt", "shape": [VOCAB, 16], "params": {}}},
                               config={"num_virtual_tokens": N})
    with pytest.raises(af.UnsupportedError, match="T5ForConditionalGeneration is an encoder-decoder model"):
        af.attach(t5, af.Adapter(manifest, {"shared.embeddings": torch.randn(N, 16)}))
    assert af.attached(t5) == [] and not t5._forward_pre_hooks
    with pytest.raises(af.UnsupportedError, match="encoder-decoder"):
        af.registry.get_method("prompt_tuning").train(t5, config={"num_virtual_tokens": N})
    assert not t5._forward_pre_hooks and all(p.requires_grad for p in t5.parameters())


@pytest.mark.parametrize("model", MODELS)
def test_training_a_prompt_sees_the_inputs_peft_trains_on(model):
    """In a train session the prompt acts on the model's inputs as attached: PEFT's loss and prompt gradient."""
    m = build(model)
    session = af.registry.get_method("prompt_tuning").train(m, config={"num_virtual_tokens": N, "seed": 5})
    (prompt,) = session.parameters()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(build(model), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    peft_prompt = pm.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        peft_prompt.copy_(prompt)
    got = m(IDS, attention_mask=MASK, labels=IDS)
    want = pm(input_ids=IDS, attention_mask=MASK, labels=IDS)
    assert got.logits.shape == (3, N + 6, VOCAB)
    assert abs(got.loss - want.loss) <= ATOL
    got.loss.backward()
    want.loss.backward()
    assert (prompt.grad - peft_prompt.grad).abs().max() <= ATOL
    session.remove()
    with torch.no_grad():
        assert m(IDS).logits.shape == (3, 6, VOCAB)
