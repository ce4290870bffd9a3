"""mlx-lm codec: adapters.safetensors (lora_a [in, r], lora_b [r, out]) + adapter_config.json.

The dense reference uses mlx-lm's own math on the written tensors: dW = scale * (lora_a @ lora_b).T for a
linear layer, dW = scale * lora_a @ lora_b for an embedding (mlx_lm/tuner/lora.py, LoRALinear /
LoRAEmbedding ``fuse``).
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers_formats import assert_same_tensors, check_function, llama, llama_modules, lora_adapter
from helpers_peft import logits
from safetensors.torch import load_file, save_file

import adapterfmt as af


def _mlx_dense(folder, embeddings=()):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    s = cfg["lora_parameters"]["scale"]
    t = load_file(folder / "adapters.safetensors")
    out = {}
    for key in t:
        if key.endswith(".lora_a"):
            m = key.removesuffix(".lora_a")
            prod = t[f"{m}.lora_a"] @ t[f"{m}.lora_b"]
            out[m] = s * (prod if m in embeddings else prod.T)
    return out


def test_write_read_function_and_round_trip(tmp_path):
    model = llama()
    mods = llama_modules() + ["model.embed_tokens"]
    adapter = lora_adapter(model, mods, r=3, scale=2.5)
    folder = af.write_foreign(adapter, tmp_path / "mlx", "mlx")

    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["num_layers"] == -1
    assert cfg["lora_parameters"]["rank"] == 3 and cfg["lora_parameters"]["scale"] == 2.5
    assert "self_attn.q_proj" in cfg["lora_parameters"]["keys"] and "model.embed_tokens" in cfg["lora_parameters"]["keys"]
    t = load_file(folder / "adapters.safetensors")
    assert t["model.layers.0.mlp.down_proj.lora_a"].shape == (32, 3)  # [in, r]
    assert t["model.layers.0.mlp.down_proj.lora_b"].shape == (3, 16)  # [r, out]
    assert t["model.embed_tokens.lora_a"].shape == (48, 3)  # [vocab, r]

    assert af.registry.formats()["mlx"].detect(folder)
    back = af.read_foreign(folder, base=model)
    assert back.modules["model.embed_tokens"]["params"]["transposed"] is True
    check_function(model, back, _mlx_dense(folder, embeddings={"model.embed_tokens"}))
    # the factors themselves are adapterfmt's (A = lora_a.T, B = lora_b.T), tensor for tensor
    assert_same_tensors(back.tensors(), adapter.tensors())

    # mlx -> adapterfmt (saved, reloaded) -> mlx: identical tensors and config
    saved = af.convert(folder, tmp_path / "a.safetensors", base=model)
    assert saved.source_format == "mlx" and saved.modules == len(mods)
    again = af.write_foreign(af.load(tmp_path / "a.safetensors"), tmp_path / "mlx2", "mlx")
    assert_same_tensors(load_file(again / "adapters.safetensors"), t)
    assert json.loads((again / "adapter_config.json").read_text()) == cfg


def test_foreign_config_fields_survive(tmp_path):
    """Fields mlx-lm writes that adapterfmt has no use for (training settings) come back on writing."""
    model = llama()
    folder = af.write_foreign(lora_adapter(model, llama_modules((1,), ("q_proj", "v_proj"))), tmp_path / "m", "mlx")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update({"model": "some/llama", "iters": 100, "learning_rate": 1e-5})
    cfg["lora_parameters"]["dropout"] = 0.05
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    out = af.write_foreign(af.read_foreign(folder), tmp_path / "m2", "mlx")
    assert json.loads((out / "adapter_config.json").read_text()) == cfg


def test_unrepresentable_adapters_are_refused_with_names(tmp_path):
    model = llama()
    mods = llama_modules((0,), ("q_proj", "v_proj"))
    mixed = lora_adapter(model, mods, r={mods[0]: 2, mods[1]: 4})
    with pytest.raises(af.UnsupportedError, match=r"one LoRA rank.*q_proj=2.*v_proj=4"):
        af.write_foreign(mixed, tmp_path / "x", "mlx")
    scales = lora_adapter(model, mods, scale={mods[0]: 1.0, mods[1]: 3.0})
    with pytest.raises(af.UnsupportedError, match=r"one LoRA scale.*v_proj=3.0"):
        af.write_foreign(scales, tmp_path / "x", "mlx")
    plain = lora_adapter(model, mods)
    dora = af.Adapter(plain.manifest, {**plain.tensors(), f"{mods[1]}.magnitude": torch.ones(16)})
    with pytest.raises(af.UnsupportedError, match=r"v_proj \(role\(s\) magnitude\)"):
        af.write_foreign(dora, tmp_path / "x", "mlx")
    assert not (tmp_path / "x").exists()


def test_unreadable_files_are_refused_with_names(tmp_path):
    model = llama()
    folder = af.write_foreign(lora_adapter(model, llama_modules((0,), ("q_proj",))), tmp_path / "m", "mlx")
    t = load_file(folder / "adapters.safetensors")
    save_file({**t, "model.norm.weight": torch.ones(16), "model.layers.1.mlp.up_proj.lora_a": torch.ones(16, 4)},
              folder / "adapters.safetensors")
    with pytest.raises(af.UnsupportedError, match=r"model.layers.1.mlp.up_proj \(lora_a or lora_b missing\)") as e:
        af.read_foreign(folder)
    assert "model.norm.weight" in str(e.value)
    save_file(t, folder / "adapters.safetensors")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "fine_tune_type": "dora"}))
    with pytest.raises(af.UnsupportedError, match="fine_tune_type='dora'"):
        af.read_foreign(folder)
    del cfg["lora_parameters"]["scale"]
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(af.FormatError, match="no scale"):
        af.read_foreign(folder)


def test_cli_convert(tmp_path):
    from adapterfmt.cli.main import app
    from typer.testing import CliRunner

    model = llama()
    folder = af.write_foreign(lora_adapter(model, llama_modules((0,), ("k_proj", "o_proj"))), tmp_path / "m", "mlx")
    r = CliRunner().invoke(app, ["convert", str(folder), str(tmp_path / "a.safetensors"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["source_format"] == "mlx"
    r = CliRunner().invoke(app, ["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "m2"), "--to", "mlx"])
    assert r.exit_code == 0, r.output
    assert_same_tensors(load_file(tmp_path / "m2" / "adapters.safetensors"), load_file(folder / "adapters.safetensors"))


# ----- mlx-lm itself as the oracle -------------------------------------------------------------------------
KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj", "model.embed_tokens"]


def _hf_base(folder, *, vocab=48, tie=False):
    """A tiny Llama saved as a Hugging Face checkpoint folder (config.json + safetensors); mlx-lm loads it too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=vocab, max_position_embeddings=64, tie_word_embeddings=tie)
    LlamaForCausalLM(cfg).float().eval().save_pretrained(folder)
    return folder


def _hf_model(folder):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _mlx_adapter(base_folder, out, keys=KEYS):
    """An adapter made by mlx-lm's own tuner (linear_to_lora_layers on the loaded model), random non-zero
    weights, saved as mlx-lm saves it (trainable parameters -> adapters.safetensors, config alongside)."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, _ = load_model(base_folder)
    model.freeze()
    lp = {"rank": 3, "scale": 2.5, "dropout": 0.0, "keys": keys}
    linear_to_lora_layers(model, 2, lp)
    rng = np.random.default_rng(0)
    model.load_weights([(k, mx.array(0.3 * rng.standard_normal(v.shape).astype(np.float32)))
                        for k, v in tree_flatten(model.trainable_parameters())], strict=False)
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (out / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 2,
                                                         "lora_parameters": lp}))
    return out


def _mlx_logits(base_folder, adapter_folder, x):
    """mlx-lm's logits: the base loaded by mlx-lm, the adapter by mlx_lm.tuner.utils.load_adapters."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    model, _ = load_model(base_folder)
    load_adapters(model, str(adapter_folder))
    return torch.from_numpy(np.array(model(mx.array(x.numpy()))))


def _cli(*args):
    from adapterfmt.cli.main import app
    from typer.testing import CliRunner

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("vocab", [48, 16])  # 16 = hidden size: an embedding's factors look like a linear's
def test_embedding_lora_matches_mlx_lm_and_peft(tmp_path, vocab):
    pytest.importorskip("mlx_lm")
    from peft import PeftModel

    base = _hf_base(tmp_path / "base", vocab=vocab)
    src = _mlx_adapter(base, tmp_path / "mlx")
    x = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(3))
    expected = _mlx_logits(base, src, x)
    model = _hf_model(base)
    assert (logits(model, x) - expected).abs().max() > 1e-2  # the adapter, embedding included, matters

    r = _cli("convert", src, tmp_path / "a.safetensors", "--base", base)
    assert r.exit_code == 0, r.output
    adapter = af.load(tmp_path / "a.safetensors")
    assert adapter.modules["model.embed_tokens"]["params"].get("transposed") is True
    af.attach(model, adapter, name="mlx")
    torch.testing.assert_close(logits(model, x), expected, atol=1e-4, rtol=0)
    af.detach(model)

    r = _cli("convert", src, tmp_path / "peft", "--to", "peft", "--base", base)
    assert r.exit_code == 0, r.output
    peft_model = PeftModel.from_pretrained(_hf_model(base), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(peft_model, x), expected, atol=1e-4, rtol=0)

    # and back: adapterfmt -> mlx, read by mlx-lm itself
    r = _cli("convert", tmp_path / "a.safetensors", tmp_path / "mlx2", "--to", "mlx")
    assert r.exit_code == 0, r.output
    torch.testing.assert_close(_mlx_logits(base, tmp_path / "mlx2", x), expected, atol=1e-5, rtol=0)


def test_embedding_lora_needs_to_know_about_tied_heads(tmp_path):
    """mlx-lm applies an embedding LoRA to a tied output head too (LoRAEmbedding.as_linear); PEFT and
    adapterfmt do not: refused in one line, and without a base (tying unknown) too."""
    pytest.importorskip("mlx_lm")
    tied = _hf_base(tmp_path / "tied", tie=True)
    src = _mlx_adapter(tied, tmp_path / "mlx")
    x = torch.randint(0, 48, (2, 7), generator=torch.Generator().manual_seed(3))
    only_input = _mlx_logits(tied, _mlx_adapter(tied, tmp_path / "lin", KEYS[:-1]), x)
    assert (_mlx_logits(tied, src, x) - only_input).abs().max() > 1e-2
    for args in (["--to", "peft", "--base", tied], ["--base", tied], ["--to", "peft"]):
        r = _cli("convert", src, tmp_path / "out", *args)
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert "model.embed_tokens" in r.output and "tie" in r.output, r.output
        assert not (tmp_path / "out").exists()
    with pytest.raises(af.UnsupportedError, match="tie_word_embeddings"):
        af.read_foreign(src, base=_hf_model(tied))
    # without an embedding LoRA the tied base is no obstacle
    r = _cli("convert", tmp_path / "lin", tmp_path / "out", "--to", "peft")
    assert r.exit_code == 0, r.output
