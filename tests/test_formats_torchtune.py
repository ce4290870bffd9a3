"""torchtune codec: torchtune-named LoRA tensors (layers.0.attn.q_proj.lora_a.weight ...) + adapter_config.json.

The dense reference follows torchtune: dW = lora_alpha / r * lora_b @ lora_a in torchtune's layout, whose q/k
rows are in Meta's interleaved RoPE order; they are brought back to Hugging Face order with the reshape of
torchtune's ``tune_to_hf`` (view(n_heads, head_dim // 2, 2, -1).transpose(1, 2)), written out here.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers_formats import assert_same_tensors, check_function, llama, llama_modules, lora_adapter
from safetensors.torch import load_file
from test_cli_paths import assert_refused, cli

import adapterfmt as af
from adapterfmt.verbs.conversion import detect_format

HEADS = {"q_proj": 2, "k_proj": 1}
TO_HF = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
         "attn.output_proj": "self_attn.o_proj", "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj",
         "mlp.w2": "mlp.down_proj"}


def _tune_dense(cfg, t):
    out = {}
    for key in t:
        if not key.endswith(".lora_a.weight"):
            continue
        stem = key.removesuffix(".lora_a.weight")
        a, b = t[key], t[f"{stem}.lora_b.weight"]
        dw = cfg["lora_alpha"] / a.shape[0] * b @ a
        if stem == "output":
            out["lm_head"] = dw
            continue
        _, i, rel = stem.split(".", 2)
        hf = f"model.layers.{i}.{TO_HF[rel]}"
        heads = HEADS.get(hf.rsplit(".", 1)[-1])
        if heads:
            hd = dw.shape[0] // heads
            dw = dw.view(heads, hd // 2, 2, -1).transpose(1, 2).reshape(dw.shape)
        out[hf] = dw
    return out


def test_write_read_function_and_round_trip(tmp_path):
    model = llama()
    mods = llama_modules() + ["lm_head"]
    adapter = lora_adapter(model, mods, r=4, scale=2.0)
    folder = af.write_foreign(adapter, tmp_path / "tt", "torchtune", base=model)
    t = load_file(folder / "adapter_model.safetensors")
    assert t["layers.0.attn.output_proj.lora_a.weight"].shape == (4, 16)
    assert t["layers.1.mlp.w2.lora_b.weight"].shape == (16, 4) and "output.lora_b.weight" in t
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["peft_type"] == "LORA"
    from adapterfmt.verbs.conversion import detect_format

    assert detect_format(folder) == "torchtune"
    peft_dir = af.write_foreign(adapter, tmp_path / "peft", "peft")
    assert detect_format(peft_dir) == "peft"

    back = af.read_foreign(folder, base=model)
    check_function(model, back, _tune_dense(cfg, t))
    assert_same_tensors(back.tensors(), adapter.tensors())
    af.convert(folder, tmp_path / "a.safetensors", base=model)
    again = af.write_foreign(af.load(tmp_path / "a.safetensors"), tmp_path / "tt2", "torchtune", n_heads=2,
                             n_kv_heads=1)
    assert_same_tensors(load_file(again / "adapter_model.safetensors"), t)
    assert json.loads((again / "adapter_config.json").read_text()) == cfg


def test_pickle_only_folder(tmp_path):
    model = llama()
    adapter = lora_adapter(model, llama_modules((1,), ("v_proj", "up_proj")), r=2, scale=1.0)
    folder = af.write_foreign(adapter, tmp_path / "tt", "torchtune")
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.pt")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(af.UnsupportedError, match="allow_pickle"):
        af.read_foreign(folder)
    assert_same_tensors(af.read_foreign(folder, allow_pickle=True).tensors(), adapter.tensors())


def test_refusals_name_what_is_in_the_way(tmp_path):
    model = llama()
    mods = llama_modules((0,), ("q_proj", "v_proj"))
    with pytest.raises(af.UnsupportedError, match=r"one LoRA rank.*q_proj=2.*v_proj=4"):
        af.write_foreign(lora_adapter(model, mods, r={mods[0]: 2, mods[1]: 4}), tmp_path / "x", "torchtune",
                         base=model)
    with pytest.raises(af.UnsupportedError, match="no torchtune Llama name: model.embed_tokens"):
        af.write_foreign(lora_adapter(model, ["model.embed_tokens", mods[1]]), tmp_path / "x", "torchtune")
    with pytest.raises(af.UnsupportedError, match="number of attention heads"):
        af.write_foreign(lora_adapter(model, mods), tmp_path / "x", "torchtune")
    assert not (tmp_path / "x").exists()
    folder = af.write_foreign(lora_adapter(model, mods[1:]), tmp_path / "tt", "torchtune")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True, "rank_pattern": {"v": 2}}))
    with pytest.raises(af.UnsupportedError, match=r"use_dora=True, rank_pattern=\{'v': 2\}"):
        af.read_foreign(folder)


def _epoch_folder(tmp_path, model, adapter):
    """A folder as torchtune 0.6's Hugging Face checkpointer leaves it with safe_serialization=False
    (torchtune/training/checkpointing/_checkpointer.py): adapter_model.pt (torchtune names), adapter_model.bin
    (PEFT names), adapter_config.json as tune_to_peft_adapter_config writes it, the base's config.json copied."""
    folder = af.write_foreign(adapter, tmp_path / "epoch_0", "torchtune", base=model)
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.pt")
    (folder / "adapter_model.safetensors").unlink()
    peft = af.write_foreign(adapter, tmp_path / "peft", "peft")
    torch.save(load_file(peft / "adapter_model.safetensors"), folder / "adapter_model.bin")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(
        {k: cfg[k] for k in ("r", "lora_alpha", "target_modules")} | {"peft_type": "LORA",
                                                                       "base_model_name_or_path": "org/tiny-llama"}))
    model.config.to_json_file(folder / "config.json")
    return folder


def test_epoch_folder_head_counts_from_its_config_json(tmp_path):
    model = llama()
    folder = _epoch_folder(tmp_path, model, lora_adapter(model, llama_modules(), r=4, scale=2.0))
    assert detect_format(folder) == "torchtune"
    r = cli("convert", folder, tmp_path / "a.safetensors", "--allow-pickle")  # no --n-heads, no --base
    assert r.exit_code == 0, r.output
    back = af.load(tmp_path / "a.safetensors")
    assert back.base["name"] == "org/tiny-llama"
    cfg = json.loads((folder / "adapter_config.json").read_text())
    check_function(model, back, _tune_dense(cfg, torch.load(folder / "adapter_model.pt", weights_only=True)))


def test_head_count_errors_name_the_cli_flags_and_the_config(tmp_path):
    model = llama()
    folder = _epoch_folder(tmp_path, model, lora_adapter(model, llama_modules((0,), ("q_proj", "k_proj")), r=2))
    config = folder / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_key_value_heads": 2}))
    out = tmp_path / "a.safetensors"
    assert_refused(cli("convert", folder, out, "--allow-pickle"), str(config), "num_key_value_heads=2",
                   "layers.0.attn.k_proj has 8")
    assert cli("convert", folder, out, "--allow-pickle", "--n-heads", "2", "--n-kv-heads", "1").exit_code == 0
    config.unlink()
    line = assert_refused(cli("convert", folder, out, "--overwrite", "--allow-pickle"), str(folder),
                          "pass --n-heads/--n-kv-heads (n_heads= / n_kv_heads= in Python)", "no config.json beside")
    assert "n_heads= (and" not in line
