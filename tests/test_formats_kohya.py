"""kohya / LyCORIS codec: single .safetensors with lora_unet_ / lora_te_ names, LoRA (incl. conv), LoHa, LoKr.

Dense references use sd-scripts / LyCORIS math on the written tensors: LoRA dW = alpha / r * up @ down
(conv: over the flattened input dims), LoHa dW = alpha / r * (w1_a @ w1_b) * (w2_a @ w2_b) with r =
w1_b's rows, LoKr dW = alpha / r * kron(w1, w2_a @ w2_b) with r = w2_a's columns.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import adapterfmt as af

from helpers_formats import Pipe, assert_same_tensors, check_function, llama, llama_modules, lora_adapter


def _kohya_dense(path):
    t = load_file(path)
    out = {}
    for key in t:
        kname, _, role = key.partition(".")
        alpha = float(t[f"{kname}.alpha"]) if f"{kname}.alpha" in t else None
        if role == "lora_down.weight":
            down, up = t[key], t[f"{kname}.lora_up.weight"]
            r = down.shape[0]
            dw = (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).reshape(up.shape[0], *down.shape[1:])
        elif role == "hada_w1_a":
            g = {k: t[f"{kname}.hada_{k}"] for k in ("w1_a", "w1_b", "w2_a", "w2_b")}
            r = g["w1_b"].shape[0]
            dw = (g["w1_a"] @ g["w1_b"]) * (g["w2_a"] @ g["w2_b"])
        elif role == "lokr_w1":
            r = t[f"{kname}.lokr_w2_a"].shape[1]
            dw = torch.kron(t[key], t[f"{kname}.lokr_w2_a"] @ t[f"{kname}.lokr_w2_b"])
        else:
            continue
        out[kname] = (alpha / r if alpha is not None else 1.0) * dw
    return out


def test_llm_lora_names_function_round_trip(tmp_path):
    model = llama()
    adapter = lora_adapter(model, llama_modules(), r=4, scale=1.5)
    path = af.write_foreign(adapter, tmp_path / "k.safetensors", "kohya")
    t = load_file(path)
    assert t["lora_unet_model_layers_0_self_attn_q_proj.lora_down.weight"].shape == (4, 16)
    assert t["lora_unet_model_layers_1_mlp_down_proj.lora_up.weight"].shape == (16, 4)
    assert float(t["lora_unet_model_layers_0_mlp_up_proj.alpha"]) == 6.0
    assert af.registry.formats()["kohya"].detect(path) and not af.registry.formats()["kohya"].detect(
        af.save(adapter, tmp_path / "af.safetensors"))

    # a file from another tool has no adapterfmt metadata: names resolve against the base, or fail by name
    save_file(t, tmp_path / "plain.safetensors")
    with pytest.raises(af.UnsupportedError, match="no base model") as e:
        af.read_foreign(tmp_path / "plain.safetensors")
    assert "lora_unet_model_layers_1_mlp_gate_proj" in str(e.value)
    back = af.read_foreign(tmp_path / "plain.safetensors", base=model)
    dense = {m: _kohya_dense(tmp_path / "plain.safetensors")["lora_unet_" + m.replace(".", "_")]
             for m in adapter.modules}
    check_function(model, back, dense)
    assert_same_tensors(back.tensors(), adapter.tensors())
    # kohya -> adapterfmt -> kohya: the same tensors (the metadata gains the module map)
    af.convert(tmp_path / "plain.safetensors", tmp_path / "a.safetensors", base=model)
    again = af.write_foreign(af.load(tmp_path / "a.safetensors"), tmp_path / "k2.safetensors", "kohya")
    assert_same_tensors(load_file(again), t)
    # our own file reads back without a base, through its metadata
    assert_same_tensors(af.read_foreign(path).tensors(), adapter.tensors())


def _pipe_adapter(model: Pipe) -> af.Adapter:
    g = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return 0.3 * torch.randn(*shape, generator=g)

    modules = {
        "unet.down_blocks.0": af.lowrank_entry([6, 4, 3, 3], 0.75),
        "unet.proj_out": {"kind": "hadamard", "shape": [8, 24], "params": {"scale": 2.0}},
        "text_encoder.text_model.1": {"kind": "kronecker", "shape": [16, 16], "params": {"scale": 0.5}},
    }
    tensors = {"unet.down_blocks.0.lora_A": rnd(2, 4, 3, 3), "unet.down_blocks.0.lora_B": rnd(6, 2, 1, 1),
               "unet.proj_out.hada_w1_a": rnd(8, 3), "unet.proj_out.hada_w1_b": rnd(3, 24),
               "unet.proj_out.hada_w2_a": rnd(8, 3), "unet.proj_out.hada_w2_b": rnd(3, 24),
               "text_encoder.text_model.1.lokr_w1": rnd(4, 2), "text_encoder.text_model.1.lokr_w2_a": rnd(4, 2),
               "text_encoder.text_model.1.lokr_w2_b": rnd(2, 8)}
    return af.Adapter(af.new_manifest("lora", modules), tensors)


def test_unet_text_encoder_conv_loha_lokr(tmp_path):
    model = Pipe()
    adapter = _pipe_adapter(model)
    path = af.write_foreign(adapter, tmp_path / "k.safetensors", "kohya")
    t = load_file(path)
    assert {k.partition(".")[0] for k in t} == {"lora_unet_down_blocks_0", "lora_unet_proj_out",
                                                 "lora_te_text_model_1"}
    assert float(t["lora_unet_down_blocks_0.alpha"]) == 1.5 and float(t["lora_te_text_model_1.alpha"]) == 1.0
    save_file(t, tmp_path / "plain.safetensors")
    back = af.read_foreign(tmp_path / "plain.safetensors", base=model)
    assert {m: e["kind"] for m, e in back.modules.items()} == {m: e["kind"] for m, e in adapter.modules.items()}
    dense = _kohya_dense(tmp_path / "plain.safetensors")
    check_function(model, back, {"unet.down_blocks.0": dense["lora_unet_down_blocks_0"],
                                 "unet.proj_out": dense["lora_unet_proj_out"],
                                 "text_encoder.text_model.1": dense["lora_te_text_model_1"]})
    assert_same_tensors(back.tensors(), adapter.tensors())
    assert_same_tensors(load_file(af.write_foreign(back, tmp_path / "k2.safetensors", "kohya")), t)


def test_ambiguous_and_unknown_names_are_listed(tmp_path):
    model = Pipe()
    model.unet.down = nn.Module()
    model.unet.down.blocks_0 = nn.Conv2d(4, 6, 3)  # flattens to down_blocks_0 as well
    save_file(load_file(af.write_foreign(_pipe_adapter(Pipe()), tmp_path / "k.safetensors", "kohya")),
              tmp_path / "plain.safetensors")
    with pytest.raises(af.UnsupportedError, match=r"lora_unet_down_blocks_0 \(unet.down_blocks.0 or unet.down.blocks_0"):
        af.read_foreign(tmp_path / "plain.safetensors", base=model)
    t = load_file(tmp_path / "plain.safetensors")
    t["lora_unet_proj_out.dora_scale"] = torch.ones(8)
    t["lora_unet_mid_block.lora_down.weight"] = torch.ones(2, 4)
    save_file(t, tmp_path / "odd.safetensors")
    with pytest.raises(af.UnsupportedError, match="cannot place") as e:
        af.read_foreign(tmp_path / "odd.safetensors", base=model)
    assert "lora_unet_proj_out.dora_scale" in str(e.value)
    assert "lora_unet_mid_block (lora_down or lora_up missing)" in str(e.value)


def test_unrepresentable_adapters_are_refused_with_names(tmp_path):
    model = llama()
    plain = lora_adapter(model, llama_modules((0,), ("q_proj", "v_proj")))
    m = "model.layers.0.self_attn.v_proj"
    dora = af.Adapter(plain.manifest, {**plain.tensors(), f"{m}.magnitude": torch.ones(16)})
    with pytest.raises(af.UnsupportedError, match=r"v_proj \(roles lora_A, lora_B, magnitude\)"):
        af.write_foreign(dora, tmp_path / "x.safetensors", "kohya")
    vec = af.Adapter(af.new_manifest("ia3", {m: {"kind": "vector", "shape": [8, 16], "params": {"op": "scale"}}}),
                     {f"{m}.vector": torch.ones(8)})
    with pytest.raises(af.UnsupportedError, match=r"v_proj \(kind vector\)"):
        af.write_foreign(vec, tmp_path / "x.safetensors", "kohya")
    assert not (tmp_path / "x.safetensors").exists()
