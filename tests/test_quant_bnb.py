"""LoRA over a base held in bitsandbytes' 4-bit / 8-bit formats (the QLoRA recipe, on the CPU), with PEFT's
bitsandbytes LoRA layers as the oracle, and the reference quantiser's conventions against bitsandbytes' own."""

from __future__ import annotations

import copy
import warnings

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from adapterfmt.cli.main import app
from helpers_peft import logits, randomize
from torch import nn
from typer.testing import CliRunner

import adapterfmt as af
from adapterfmt.verbs.bake import bake

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


def test_dora_on_a_4_bit_base_computes_pefts_logits_and_is_refused_on_int8(tmp_path):
    """DoRA rescales ``x W^T`` with the dequantised ``W``: PEFT's on nf4 (train mode, bitsandbytes' dequantising
    matmul); refused on Linear8bitLt, whose product quantises the input too."""
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    for kind in ("nf4", "int8"):
        base = quantize_bnb(llama().train(), kind)
        ours = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), use_dora=True))
            randomize(pm, 1)
            pm.save_pretrained(tmp_path / kind)
        if kind == "int8":
            with pytest.raises(af.UnsupportedError, match="DoRA on a bitsandbytes Linear8bitLt"):
                af.attach(ours, af.load(tmp_path / kind))
            assert not af.attached(ours)
            continue
        expected = logits(pm, ids)
        af.attach(ours, af.load(tmp_path / kind))
        assert torch.allclose(logits(ours, ids), expected, atol=1e-5, rtol=0)


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


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_bake_into_a_bitsandbytes_checkpoint_is_pefts_merge(tmp_path, kind):
    """``merge --base`` a checkpoint saved from a bitsandbytes model: the written codes and state are those of
    PEFT's ``merge_and_unload`` on the live quantised model (dequantise, add, re-quantise with bitsandbytes), and
    the reported error is that of the written weight against ``W + dW``."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    base = quantize_bnb(llama().train(), kind)
    before = {k: v.contiguous() for k, v in base.state_dict().items()}
    save_file(before, tmp_path / "base.safetensors")
    exact = {p: af.function_weight(m).float() for p, m in base.named_modules() if p.endswith(TARGETS)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS)))
        randomize(pm, 5)
        pm.save_pretrained(tmp_path / "peft")
        merged = pm.merge_and_unload()
    adapter = af.load(tmp_path / "peft")
    rep = bake([adapter], tmp_path / "base.safetensors", tmp_path / "out.safetensors")
    out, expected = load_file(tmp_path / "out.safetensors"), merged.state_dict()
    assert set(out) == set(expected) == set(before)
    assert rep.bytes == sum(v.numel() * v.element_size() for v in out.values())  # a state may change size
    for k, v in expected.items():
        assert torch.equal(out[k], v), k
    assert sorted(rep.requantized) == sorted(exact)
    res = CliRunner().invoke(app, ["merge", str(tmp_path / "peft"), "--base", str(tmp_path / "base.safetensors"),
                                   "--out", str(tmp_path / "cli.safetensors")])
    assert res.exit_code == 0 and "re-quantised with bitsandbytes" in res.output, res.output
    assert (tmp_path / "cli.safetensors").read_bytes() == (tmp_path / "out.safetensors").read_bytes()
    assert all(k.startswith(tuple(rep.requantized)) for k in out if not torch.equal(out[k], before[k]))
    for path, r in rep.requantized.items():
        t = adapter.module_tensors(path)
        dw = adapter.modules[path]["params"]["scale"] * t["lora_B"].float() @ t["lora_A"].float()
        err = af.function_weight(merged.get_submodule(path)).float() - (exact[path] + dw)
        assert r["bits"] == (8 if kind == "int8" else 4) and r["quant_type"] == kind
        assert r["max_abs_error"] == pytest.approx(float(err.abs().max()), rel=1e-4)
        assert r["relative_error"] == pytest.approx(float(err.norm() / dw.norm()), rel=1e-4)


def test_symmetric_8_bit_per_channel_is_bitsandbytes_int8_and_nf4_fp4_codecs_are_its_4_bit():
    """The reference quantiser's symmetric 8-bit per-channel grid is LLM.int8()'s row-wise one: codes and row
    absmax (``127 s``) bit for bit; the values to an ulp (bitsandbytes multiplies by a rounded 1/127). The nf4 /
    fp4 codecs (spec 6.8) are ``quantize_4bit`` / ``dequantize_4bit`` (block 64, no nested scales) bit for bit,
    fp4 up to the sign of a zero code."""
    from adapterfmt.format.bitpack import unpack_nibbles
    from adapterfmt.format.codecs import encode, get_codec

    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    ours = af.quantize(w, af.QuantSpec(8, None, "symmetric"))
    codes, absmax, _ = bnbf.int8_vectorwise_quant(w.clone())
    assert torch.equal(ours.codes, codes) and torch.equal(ours.scale[:, 0], absmax / 127)
    assert torch.equal(absmax, w.abs().amax(1))
    torch.testing.assert_close(af.dequantize(ours), bnbf.int8_vectorwise_dequant(codes, absmax), rtol=2.4e-7, atol=0)
    for codec in ("nf4", "fp4"):
        parts, spec = encode(codec, 0.3 * w, block_size=64)
        packed, state = bnbf.quantize_4bit(0.3 * w, blocksize=64, quant_type=codec, compress_statistics=False)
        theirs = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], 1).reshape(-1).long()  # high first
        mine = unpack_nibbles(parts["q"], w.numel(), what="codes").long()
        assert torch.equal(parts["absmax"], state.absmax)
        assert torch.equal(mine, theirs) if codec == "nf4" else torch.equal(mine % 8, theirs % 8)
        assert torch.equal(get_codec(codec).decode(parts, spec).reshape(w.shape), bnbf.dequantize_4bit(packed, state))


def test_bake_into_a_bitsandbytes_checkpoint_refuses_what_it_cannot_requantise(tmp_path):
    from safetensors.torch import save_file

    model = quantize_bnb(llama().train())
    ia3 = af.registry.get_method("ia3").train(llama(), config={"target_modules": ["down_proj"]}).extract()
    lin = model.model.layers[0].self_attn.q_proj
    wide = bnb.nn.Params4bit(llama().model.layers[0].self_attn.q_proj.weight.data, requires_grad=False,
                             quant_type="nf4", blocksize=128).to("cpu")  # blocks of 128 span the 64-input rows
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "base.safetensors")
    lin.weight = wide
    with pytest.raises(af.UnsupportedError, match="Linear4bit: bitsandbytes' CPU dequantize_4bit decodes blocks"):
        af.function_weight(lin)  # what DoRA or a derived base part would read
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "wide.safetensors")
    with pytest.raises(af.UnsupportedError, match="bitsandbytes' format: only W \\+ dW kinds bake into it, not vector"):
        bake([ia3], tmp_path / "base.safetensors", tmp_path / "out.safetensors", force=True)
    with pytest.raises(af.UnsupportedError, match="q_proj'.*blocks that span rows wrongly \\(block size 128 > 64"):
        bake([_random_lora(llama())], tmp_path / "wide.safetensors", tmp_path / "out.safetensors", force=True)
    assert not (tmp_path / "out.safetensors").exists()


def test_bake_into_a_transformers_4_bit_folder_loads_back_with_pefts_merged_logits(tmp_path):
    """The QLoRA flow end to end: a folder transformers saved with ``load_in_4bit`` (double-quantised nf4), a PEFT
    LoRA over it, ``merge --base``; transformers loads the baked folder as a 4-bit model whose logits are those of
    PEFT's ``merge_and_unload``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    llama().save_pretrained(tmp_path / "fp")
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                             bnb_4bit_use_double_quant=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=cfg, device_map="cpu"
                                             ).save_pretrained(tmp_path / "q4")
        q4 = AutoModelForCausalLM.from_pretrained(tmp_path / "q4", device_map="cpu")
        pm = get_peft_model(q4, LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS)))
        randomize(pm, 7)
        pm.save_pretrained(tmp_path / "peft")
        expected = logits(pm.merge_and_unload().eval(), ids)
    rep = bake([tmp_path / "peft"], tmp_path / "q4", tmp_path / "baked")
    assert len(rep.requantized) == 3 and (tmp_path / "baked" / "config.json").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        baked = AutoModelForCausalLM.from_pretrained(tmp_path / "baked", device_map="cpu")
        plain = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "q4", device_map="cpu").eval(), ids)
    assert type(baked.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert torch.equal(logits(baked.eval(), ids), expected) and (expected - plain).abs().max() > 1e-2


def test_an_int8_module_stays_quantised_after_a_training_forward():
    """bitsandbytes moves a Linear8bitLt's row scales from its weight to ``module.state`` at the first
    training-mode forward: the module still holds its weight quantised, dequantises the same, and refuses DoRA."""
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    model = quantize_bnb(llama().train(), "int8")
    q = model.model.layers[0].self_attn.q_proj
    before = af.function_weight(q).clone()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(ids)
    assert q.weight.SCB is None and q.state.SCB is not None  # where bitsandbytes keeps them now
    assert af.held_quantized(q) and torch.equal(af.function_weight(q), before)
    dora = af.registry.get_method("dora").train(model, config={"target_modules": ["q_proj"], "r": 2})
    with pytest.raises(af.UnsupportedError, match="DoRA on a bitsandbytes Linear8bitLt"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(ids)
    dora.remove()
