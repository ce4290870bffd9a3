"""diffusers LoRA codec: unet./text_encoder. keys, lora_A/lora_B (or legacy lora.down/lora.up), optional alpha.

The dense reference uses diffusers' (PEFT's) math on the written tensors: dW = alpha / r * B @ A (conv: over the
flattened input dims), alpha = r where no ``.alpha`` key is present.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapterfmt as af

from helpers_formats import Pipe, assert_same_tensors, check_function, llama, llama_modules, lora_adapter


def _adapter(scale_conv=0.5):
    g = torch.Generator().manual_seed(2)
    modules = {"unet.down_blocks.0": af.lowrank_entry([6, 4, 3, 3], scale_conv),
               "unet.proj_out": af.lowrank_entry([8, 24], 1.0),
               "text_encoder.text_model.1": af.lowrank_entry([16, 16], 3.0)}
    shapes = {"unet.down_blocks.0": ((2, 4, 3, 3), (6, 2, 1, 1)), "unet.proj_out": ((3, 24), (8, 3)),
              "text_encoder.text_model.1": ((2, 16), (16, 2))}
    tensors = {f"{m}.{role}": 0.3 * torch.randn(*s, generator=g)
               for m, (sa, sb) in shapes.items() for role, s in (("lora_A", sa), ("lora_B", sb))}
    return af.Adapter(af.new_manifest("lora", modules), tensors)


def _dense(path):
    t = load_file(path)
    out = {}
    for key in t:
        for down, up in ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight")):
            if key.endswith(down):
                m = key.removesuffix(down)
                a, b = t[key], t[m + up]
                r = a.shape[0]
                alpha = float(t[f"{m}.alpha"]) if f"{m}.alpha" in t else r
                out[m] = alpha / r * (b.reshape(b.shape[0], r) @ a.reshape(r, -1)).reshape(b.shape[0], *a.shape[1:])
    return out


def test_write_read_function_and_round_trip(tmp_path):
    model = Pipe()
    adapter = _adapter()
    path = af.write_foreign(adapter, tmp_path / "pytorch_lora_weights.safetensors", "diffusers")
    t = load_file(path)
    assert sorted(t) == sorted(["unet.down_blocks.0.lora_A.weight", "unet.down_blocks.0.lora_B.weight",
                                "unet.down_blocks.0.alpha", "unet.proj_out.lora_A.weight", "unet.proj_out.lora_B.weight",
                                "text_encoder.text_model.1.lora_A.weight", "text_encoder.text_model.1.lora_B.weight",
                                "text_encoder.text_model.1.alpha"])  # no alpha where the scale is 1 (alpha = r)
    from adapterfmt.conversion import detect_format

    assert detect_format(path) == "diffusers"
    back = af.read_foreign(path, base=model)
    check_function(model, back, _dense(path))
    assert_same_tensors(back.tensors(), adapter.tensors())
    af.convert(path, tmp_path / "a.safetensors")
    again = af.write_foreign(af.load(tmp_path / "a.safetensors"), tmp_path / "d2.safetensors", "diffusers")
    assert_same_tensors(load_file(again), t)


def test_legacy_keys_and_alpha_keys_survive(tmp_path):
    model = Pipe()
    t = load_file(af.write_foreign(_adapter(), tmp_path / "d.safetensors", "diffusers"))
    legacy = {k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight"): v
              for k, v in t.items()}
    legacy["unet.proj_out.alpha"] = torch.tensor(3.0)  # an explicit alpha = r
    save_file(legacy, tmp_path / "legacy.safetensors")
    back = af.read_foreign(tmp_path / "legacy.safetensors", base=model)
    check_function(model, back, _dense(tmp_path / "legacy.safetensors"))
    out = af.write_foreign(back, tmp_path / "l2.safetensors", "diffusers")
    assert_same_tensors(load_file(out), legacy)


def test_refusals_name_what_is_in_the_way(tmp_path):
    model = llama()
    with pytest.raises(af.UnsupportedError, match="outside them: model.layers.0.self_attn.q_proj"):
        af.write_foreign(lora_adapter(model, llama_modules((0,), ("q_proj",))), tmp_path / "x.safetensors", "diffusers")
    t = load_file(af.write_foreign(_adapter(), tmp_path / "d.safetensors", "diffusers"))
    t["unet.proj_out.lora_magnitude_vector"] = torch.ones(8)
    t["vae.decoder.lora_A.weight"] = torch.ones(2, 4)
    del t["text_encoder.text_model.1.lora_B.weight"]
    save_file(t, tmp_path / "odd.safetensors")
    with pytest.raises(af.UnsupportedError, match="cannot place") as e:
        af.read_foreign(tmp_path / "odd.safetensors", "diffusers")
    for name in ("unet.proj_out.lora_magnitude_vector", "vae.decoder.lora_A.weight", "text_encoder.text_model.1 ("):
        assert name in str(e.value)
