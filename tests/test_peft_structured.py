"""PEFT's structured additive types (SHiRA, LN tuning, FourierFT, VB-LoRA, RandLoRA, C3A, MiSS / Bone), with the
real peft package as the oracle, on tiny Llama and GPT-2 models with random non-zero adapter tensors:

``adapter convert SRC OUT --base BASE`` succeeds; the converted adapter attached with ``af.attach`` gives PEFT's
logits (fp32, atol 1e-5), merged too (for the additive types and MiSS's weight-dependent "bat" form);
``adapter convert OUT BACK --to peft`` writes files PEFT reloads with no missing or unexpected keys, the same
logits and the source's tensors (identical, same dtype) and config fields. What cannot be represented is
refused in one line naming it, with nothing written.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

pytest.importorskip("peft")
from helpers_peft import case, load_peft, logits
from helpers_spec import invoke
from peft import (
    C3AConfig,
    FourierFTConfig,
    LNTuningConfig,
    MissConfig,
    RandLoraConfig,
    ShiraConfig,
    VBLoRAConfig,
)
from safetensors.torch import load_file, save_model

import adapterfmt as af

ATOL = 1e-5
CASES = {
    "llama-shira": ("llama", lambda: ShiraConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=2,
                                                 random_seed=4, init_weights=False)),
    "gpt2-shira-head": ("gpt2", lambda: ShiraConfig(target_modules=["lm_head"], r=1, init_weights=False)),
    "llama-ln": ("llama", lambda: LNTuningConfig(target_modules=["input_layernorm", "norm"])),
    "gpt2-ln-mts": ("gpt2", lambda: LNTuningConfig(target_modules=["ln_1", "ln_f"], modules_to_save=["ln_2"])),
    "llama-fourierft": ("llama", lambda: FourierFTConfig(target_modules=["q_proj", "v_proj", "up_proj"], n_frequency=12,
                                                         n_frequency_pattern={"v_proj": 7}, scaling=90.0,
                                                         random_loc_seed=3)),
    "gpt2-fourierft": ("gpt2", lambda: FourierFTConfig(target_modules=["c_attn", "c_fc"], n_frequency=20,
                                                       fan_in_fan_out=True)),
    "llama-vblora": ("llama", lambda: VBLoRAConfig(target_modules=["q_proj", "v_proj", "up_proj"], r=3, num_vectors=10,
                                                   vector_length=8, topk=3)),
    "llama-vblora-topk": ("llama", lambda: VBLoRAConfig(target_modules=["q_proj", "down_proj"], r=2, num_vectors=12,
                                                        vector_length=8, topk=3, save_only_topk_weights=True)),
    "gpt2-vblora": ("gpt2", lambda: VBLoRAConfig(target_modules=["c_attn", "c_fc"], r=2, num_vectors=6, vector_length=16,
                                                 fan_in_fan_out=True)),
    "llama-randlora": ("llama", lambda: RandLoraConfig(target_modules=["q_proj", "v_proj", "up_proj"], r=3,
                                                       randlora_alpha=12, projection_prng_key=5)),
    "gpt2-randlora": ("gpt2", lambda: RandLoraConfig(target_modules=["c_attn", "c_proj"], r=4, randlora_alpha=8,
                                                     fan_in_fan_out=True)),
    "llama-c3a": ("llama", lambda: C3AConfig(target_modules=["q_proj", "v_proj", "down_proj"], block_size=4,
                                             block_size_pattern={"down_proj": 8})),
    "gpt2-c3a-head": ("gpt2", lambda: C3AConfig(target_modules=["lm_head"], block_size=8)),
    "llama-miss": ("llama", lambda: MissConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=4,
                                               init_weights=False)),
    "llama-miss-mini": ("llama", lambda: MissConfig(target_modules=["q_proj", "up_proj"], r=4, mini_r=4,
                                                    init_weights="mini")),
    "llama-miss-bat": ("llama", lambda: MissConfig(target_modules=["q_proj", "down_proj"], r=4, init_weights="bat")),
    "llama-miss-r3": ("llama", lambda: MissConfig(target_modules=["o_proj", "up_proj"], r=3)),
}
TIED = {"gpt2-shira-head", "gpt2-c3a-head"}
"""GPT-2's head shares its weight with the input embedding: merging into it changes both (as in PEFT)."""
CONFIG_KEYS = ("peft_type", "r", "target_modules", "modules_to_save", "n_frequency", "n_frequency_pattern", "scaling",
               "random_loc_seed", "fan_in_fan_out", "topk", "num_vectors", "vector_length", "randlora_alpha",
               "block_size", "block_size_pattern", "init_weights", "mini_r", "random_seed")


def _base_checkpoint(c, tmp_path):
    ckpt = tmp_path / "base.safetensors"
    save_model(c.base, str(ckpt))
    return ckpt


def _quiet(*args: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return invoke(*args)


@pytest.mark.parametrize("name", sorted(CASES))
def test_peft_structured_round_trip(tmp_path, name):
    model_name, make = CASES[name]
    c = case(tmp_path, model_name, make())
    out = tmp_path / "a.safetensors"
    r = _quiet("convert", str(c.folder), str(out), "--base", str(_base_checkpoint(c, tmp_path)))
    assert r.exit_code == 0, r.output
    adapter = af.load(out)

    model = c.base
    plain = logits(model, c.ids)
    af.attach(model, adapter, name="x")
    got = logits(model, c.ids)
    torch.testing.assert_close(got, c.expected, atol=ATOL, rtol=0)
    assert (got - plain).abs().max() > 1e-3, "the adapter must change the output"
    if name not in TIED:
        af.merge_into(model, "x")
        torch.testing.assert_close(logits(model, c.ids), c.expected, atol=ATOL, rtol=0)
        af.unmerge(model, "x")
    af.detach(model)
    torch.testing.assert_close(logits(model, c.ids), plain, atol=1e-6, rtol=0)

    back = tmp_path / "back"
    r = _quiet("convert", str(out), str(back), "--to", "peft")
    assert r.exit_code == 0, r.output
    src, got_t = load_file(c.folder / "adapter_model.safetensors"), load_file(back / "adapter_model.safetensors")
    dropped = {k for k in src if k.endswith(".base_layer.weight")}  # a head's base weight equal to the base's
    assert sorted(got_t) == sorted(set(src) - dropped)
    assert [n for n in adapter.manifest["provenance"][0].get("notes", []) if "equals the base weight" in n] == \
        [f"{k} equals the base weight: dropped" for k in sorted(dropped)]
    for k in got_t:
        assert got_t[k].dtype == src[k].dtype and torch.equal(got_t[k], src[k]), k
    src_cfg = json.loads((c.folder / "adapter_config.json").read_text())
    out_cfg = json.loads((back / "adapter_config.json").read_text())
    for key in CONFIG_KEYS:
        if key in src_cfg:
            assert out_cfg.get(key) == src_cfg[key], key
    pm, missing, unexpected = load_peft(model_name, back)
    assert [k for k in missing if ".vblora_vector_bank." not in k] == [] and unexpected == []  # (per-layer views)
    torch.testing.assert_close(logits(pm, c.ids), c.expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_synthesised_peft_config(tmp_path, name):
    """Without the source's config (provenance dropped), the written config still gives PEFT the same function."""
    model_name, make = CASES[name]
    c = case(tmp_path, model_name, make())
    adapter = af.read_foreign(c.folder, base=_base_checkpoint(c, tmp_path))
    adapter.manifest["provenance"] = []
    back = af.to_peft(adapter, tmp_path / "synth")
    pm, missing, unexpected = load_peft(model_name, back)
    assert [k for k in missing if ".vblora_vector_bank." not in k] == [] and unexpected == []
    torch.testing.assert_close(logits(pm, c.ids), c.expected, atol=ATOL, rtol=0)


@pytest.mark.filterwarnings("ignore:Specified to not save basis_A")
@pytest.mark.parametrize("model_name,extra", [
    ("llama", {"target_modules": ["q_proj", "v_proj", "up_proj"], "r": 3, "projection_prng_key": 7}),
    ("gpt2", {"target_modules": ["c_attn", "c_proj"], "r": 4, "fan_in_fan_out": True, "sparse": True}),
    ("llama", {"target_modules": ["k_proj", "down_proj"], "r": 5, "very_sparse": True}),
])
def test_randlora_without_saved_projections(tmp_path, model_name, extra):
    """A file saved with save_projection=False holds no bases: convert draws PEFT's again (needing the base's
    shapes, and saying so without them), stores them, and gives PEFT's logits; --to peft writes them out."""
    c = case(tmp_path, model_name, RandLoraConfig(save_projection=False, randlora_alpha=9, **extra))
    assert not any("randlora_A" in k for k in load_file(c.folder / "adapter_model.safetensors"))
    out = tmp_path / "a.safetensors"
    r = _quiet("convert", str(c.folder), str(out))
    assert r.exit_code == 1 and "save_projection=false" in r.output and "--base" in r.output, r.output
    assert r.output.strip().count("\n") == 0 and not out.exists()
    r = _quiet("convert", str(c.folder), str(out), "--base", str(_base_checkpoint(c, tmp_path)))
    assert r.exit_code == 0, r.output
    adapter = af.load(out)
    assert {"basis_A", "basis_B"} <= set(adapter.tensors())
    model = c.base
    af.attach(model, adapter, name="x")
    torch.testing.assert_close(logits(model, c.ids), c.expected, atol=ATOL, rtol=0)
    af.merge_into(model, "x")
    torch.testing.assert_close(logits(model, c.ids), c.expected, atol=ATOL, rtol=0)
    af.detach(model)

    back = tmp_path / "back"
    r = _quiet("convert", str(out), str(back), "--to", "peft")
    assert r.exit_code == 0, r.output
    assert json.loads((back / "adapter_config.json").read_text())["save_projection"] is True
    pm, missing, unexpected = load_peft(model_name, back)
    assert missing == [] and unexpected == []
    torch.testing.assert_close(logits(pm, c.ids), c.expected, atol=ATOL, rtol=0)
