"""LoRA over a base held in bitsandbytes' 4-bit / 8-bit formats (the QLoRA recipe, on the CPU), with PEFT's
bitsandbytes LoRA layers as the oracle, and the reference quantiser's conventions against bitsandbytes' own."""

from __future__ import annotations

import copy
import warnings

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from helpers_peft import logits, randomize
from torch import nn

import adapterfmt as af

TARGETS = ("q_proj", "v_proj", "down_proj")
VOCAB = 48


def llama(seed: int = 0) -> nn.Module:
    """A tiny Llama whose linear layers have multiples of 32 outputs (bitsandbytes' CPU kernels need them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                                        max_position_embeddings=64, tie_word_embeddings=False,
                                        attention_bias=True, mlp_bias=True)).float().eval()


def quantize_bnb(model: nn.Module, kind: str = "nf4") -> nn.Module:
    """Replace the targeted ``nn.Linear`` s by bitsandbytes ``Linear4bit`` (``nf4`` / ``fp4``) or
    ``Linear8bitLt`` (``int8``) layers, computing in float32, as transformers' ``load_in_4bit`` does."""
    for path, lin in list(model.named_modules()):
        if not path.endswith(TARGETS):
            continue
        if kind == "int8":
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    has_fp16_weights=False)
            q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=torch.float32, quant_type=kind)
            q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=kind)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, q.to("cpu").train(lin.training))
    model.is_loaded_in_8bit, model.is_loaded_in_4bit = kind == "int8", kind != "int8"  # what PEFT dispatches on
    return model


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_lora_on_a_bitsandbytes_base_computes_peft_logits(tmp_path, kind):
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    base = quantize_bnb(llama(), kind)
    ours = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS)))
        assert type(pm.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
        randomize(pm, 1)
        pm.eval()
        expected = logits(pm, ids)
        pm.save_pretrained(tmp_path / "peft")
    plain = logits(ours, ids)
    af.attach(ours, af.load(tmp_path / "peft"))
    got = logits(ours, ids)
    assert (expected - plain).abs().max() > 1e-2
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids).logits
    return nn.functional.cross_entropy(out[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_training_a_lora_on_a_bitsandbytes_base_has_peft_gradients(kind):
    """Same factors, same batch: our session's gradients are PEFT's on its bitsandbytes LoRA layers (train mode,
    bitsandbytes' dequantising matmul); the quantised weights get none and stay as they were."""
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    base = quantize_bnb(llama().train(), kind)
    ours = copy.deepcopy(base)
    packed = {n: p.detach().clone() for n, p in ours.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(TARGETS)))
    randomize(pm, 2)
    session = af.registry.get_method("lora").train(ours, config={"target_modules": list(TARGETS), "r": 4, "alpha": 8})
    assert sorted(session.layers) == sorted(p for p, _ in ours.named_modules() if p.endswith(TARGETS))
    layers = {p.removeprefix("base_model.model."): m for p, m in pm.named_modules() if hasattr(m, "lora_A")}
    with torch.no_grad():
        for path, layer in session.layers.items():
            assert layer.entry["shape"] == [layers[path].out_features, layers[path].in_features]
            layer.weights.lora_A.copy_(layers[path].lora_A["default"].weight)
            layer.weights.lora_B.copy_(layers[path].lora_B["default"].weight)
    _loss(pm, ids).backward()
    _loss(ours, ids).backward()
    for path, layer in session.layers.items():
        for role in ("lora_A", "lora_B"):
            ref = getattr(layers[path], role)["default"].weight.grad
            assert ref.abs().max() > 0
            assert torch.allclose(getattr(layer.weights, role).grad, ref, atol=1e-6, rtol=1e-5), (path, role)
    adapter = session.extract()
    session.remove()
    assert all(torch.equal(p, packed[n]) for n, p in ours.named_parameters())
    assert all(t.dtype == torch.float32 for m in adapter.modules for t in adapter.module_tensors(m).values())
    pm.eval()
    with torch.no_grad():
        expected = pm(ids).logits
    af.attach(ours.eval(), adapter)
    assert torch.allclose(logits(ours, ids), expected, atol=1e-5, rtol=0)


def test_a_bitsandbytes_module_refuses_merging_and_other_kinds():
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    model = quantize_bnb(llama())
    af.attach(model, _random_lora(llama()))
    before = logits(model, ids)
    with pytest.raises(af.UnsupportedError, match="Linear4bit, which holds its weight quantised"):
        af.merge_into(model, af.attached(model)[0])
    assert torch.equal(logits(model, ids), before)  # nothing half-merged
    ia3 = af.registry.get_method("ia3").train(llama(), config={"target_modules": ["down_proj"]})
    vec = ia3.extract()
    with pytest.raises(af.BaseMismatchError, match="down_proj' \\(Linear4bit\\) holds its weight quantised; kind 'vector'"):
        af.attach(quantize_bnb(llama()), vec)
    with pytest.raises(af.UnsupportedError, match="holds its weight quantised; kind 'vector'"):
        af.registry.get_method("ia3").train(quantize_bnb(llama()), config={"target_modules": ["down_proj"]})


def _random_lora(model: nn.Module, seed: int = 4) -> af.Adapter:
    session = af.registry.get_method("lora").train(model, config={"target_modules": list(TARGETS), "r": 2})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in session.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    adapter = session.extract()
    session.remove()
    return adapter
