"""GGUF codec (llama.cpp LoRA adapters), read back with gguf.GGUFReader as the independent side.

The dense reference applies llama.cpp's math to the GGUF tensors: per pair dW = (alpha / r) * lora_b @ lora_a
(row-major order; ``token_embd``'s lora_a is stored [vocab, r]), on llama.cpp's weight layout, whose q/k
rows are interleaved per head by ``convert_hf_to_gguf.py``'s ``permute``; the test maps those rows back to
Hugging Face's order with its own index arithmetic before comparing against the HF model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import adapterfmt as af  # noqa: E402

from helpers_formats import assert_same_tensors, check_function, llama, llama_modules, lora_adapter  # noqa: E402

N_HEADS, N_KV = 2, 1  # helpers_peft's tiny Llama
HF = {"token_embd": "model.embed_tokens", "output": "lm_head", "attn_q": "self_attn.q_proj",
      "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
      "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def _read(path):
    r = gguf.GGUFReader(path)
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return kv, {t.name: torch.from_numpy(np.array(t.data)) for t in r.tensors}


def _hf_rows(n_rows: int, heads: int) -> torch.Tensor:
    """Index: hf[i] = gguf[idx[i]]; gguf row h*hd + 2j + c holds hf row h*hd + c*hd/2 + j."""
    hd = n_rows // heads
    idx = torch.empty(n_rows, dtype=torch.int64)
    for h in range(heads):
        for j in range(hd // 2):
            for c in range(2):
                idx[h * hd + c * hd // 2 + j] = h * hd + 2 * j + c
    return idx


def _llama_cpp_dense(path):
    kv, t = _read(path)
    alpha = kv["adapter.lora.alpha"]
    out = {}
    for name in t:
        if not name.endswith(".lora_a"):
            continue
        stem = name.removesuffix(".weight.lora_a")
        a, b = t[name].double(), t[f"{stem}.weight.lora_b"].double()
        scale = alpha / b.shape[1] if alpha else 1.0
        if stem == "token_embd":
            out["model.embed_tokens"] = (scale * a @ b.T).float()  # [vocab, dim]
            continue
        dw = scale * b @ a
        parts = stem.split(".")
        if parts[-1] in ("attn_q", "attn_k"):
            dw = dw[_hf_rows(dw.shape[0], N_HEADS if parts[-1] == "attn_q" else N_KV)]
        module = HF[parts[-1]] if len(parts) == 1 else f"model.layers.{parts[1]}.{HF[parts[2]]}"
        out[module] = dw.float()
    return out


def test_write_read_function_and_round_trip(tmp_path):
    model = llama()
    mods = llama_modules() + ["model.embed_tokens", "lm_head"]
    adapter = lora_adapter(model, mods, r=3, scale=2.0)
    path = af.write_foreign(adapter, tmp_path / "a.gguf", "gguf", base=model)

    kv, t = _read(path)
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora" and kv["general.architecture"] == "llama"
    assert kv["adapter.lora.alpha"] == 6.0
    assert t["blk.1.ffn_down.weight.lora_a"].shape == (3, 32) and t["blk.1.ffn_down.weight.lora_b"].shape == (16, 3)
    assert t["token_embd.weight.lora_a"].shape == (48, 3)
    # q/k lora_b rows are reordered for llama.cpp's RoPE, the others are not
    q = "model.layers.0.self_attn.q_proj.lora_B"
    assert not torch.equal(t["blk.0.attn_q.weight.lora_b"], adapter.tensor(q))
    assert torch.equal(t["blk.0.attn_q.weight.lora_b"][_hf_rows(16, N_HEADS)], adapter.tensor(q))
    assert torch.equal(t["blk.0.attn_v.weight.lora_b"], adapter.tensor("model.layers.0.self_attn.v_proj.lora_B"))

    assert af.registry.formats()["gguf"].detect(path)
    back = af.read_foreign(path, base=model)
    check_function(model, back, _llama_cpp_dense(path))
    assert_same_tensors(back.tensors(), adapter.tensors())

    # gguf -> adapterfmt file -> gguf: the same tensors and keys
    af.convert(path, tmp_path / "a.safetensors", base=model)
    again = af.write_foreign(af.load(tmp_path / "a.safetensors"), tmp_path / "b.gguf", "gguf", base=model)
    kv2, t2 = _read(again)
    assert kv2 == kv
    assert_same_tensors(t2, t)


def test_without_base_hf_llama_names_and_explicit_heads(tmp_path):
    model = llama()
    adapter = lora_adapter(model, llama_modules((1,), ("q_proj", "k_proj", "up_proj")), r=2, scale=0.5)
    path = af.write_foreign(adapter, tmp_path / "a.gguf", "gguf", n_heads=N_HEADS, n_kv_heads=N_KV)
    back = af.read_foreign(path, n_heads=N_HEADS, n_kv_heads=N_KV)
    assert_same_tensors(back.tensors(), adapter.tensors())
    assert back.base["fingerprint"] is None
    with pytest.raises(af.UnsupportedError, match="number of attention heads"):
        af.read_foreign(path)
    # without q/k no head count is needed
    up = lora_adapter(model, llama_modules((1,), ("up_proj",)))
    p2 = af.write_foreign(up, tmp_path / "up.gguf", "gguf")
    assert_same_tensors(af.read_foreign(p2).tensors(), up.tensors())


def test_f16_round_trip_and_alpha_zero(tmp_path):
    model = llama()
    mods = llama_modules((0,), ("v_proj", "down_proj"))
    adapter = lora_adapter(model, mods, r={mods[0]: 2, mods[1]: 5}, scale=1.0)
    half = af.Adapter(adapter.manifest, {k: v.half() for k, v in adapter.tensors().items()})
    path = af.write_foreign(half, tmp_path / "a.gguf", "gguf")
    kv, t = _read(path)
    assert kv["adapter.lora.alpha"] == 0.0 and t["blk.0.attn_v.weight.lora_a"].dtype == torch.float16
    back = af.read_foreign(path, base=model)
    assert_same_tensors(back.tensors(), half.tensors())
    assert {e["params"]["scale"] for e in back.modules.values()} == {1.0}


def test_unrepresentable_adapters_are_refused_with_names(tmp_path):
    model = llama()
    mods = llama_modules((0,), ("v_proj", "up_proj"))
    adapter = lora_adapter(model, mods, r=2, scale={mods[0]: 1.0, mods[1]: 3.0})
    with pytest.raises(af.UnsupportedError, match=r"one alpha per file.*up_proj=6.*v_proj=2"):
        af.write_foreign(adapter, tmp_path / "x.gguf", "gguf")
    odd = lora_adapter(model, mods)
    odd.manifest["modules"]["model.layers.0.mlp.extra_proj"] = odd.manifest["modules"].pop(mods[0])
    renamed = af.Adapter(odd.manifest, {k.replace(mods[0], "model.layers.0.mlp.extra_proj"): v for k, v in odd.tensors().items()})
    with pytest.raises(af.UnsupportedError, match="llama.cpp tensor name.*extra_proj"):
        af.write_foreign(renamed, tmp_path / "x.gguf", "gguf", arch="qwen2")
    with pytest.raises(af.UnsupportedError, match="'gpt2'.*not verified"):
        af.write_foreign(lora_adapter(model, mods), tmp_path / "x.gguf", "gguf", arch="gpt2")
    assert not (tmp_path / "x.gguf").exists()


def _hand_written(path, tensors, *, alpha=4.0, gtype="adapter"):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type(gtype)
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    for name, (arr, raw) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unreadable_files_are_refused_with_names(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 32), dtype=np.float32), rng.standard_normal((16, 2), dtype=np.float32)
    q8 = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
    p = _hand_written(tmp_path / "q.gguf", {"blk.0.ffn_down.weight.lora_a": (q8, gguf.GGMLQuantizationType.Q8_0),
                                            "blk.0.ffn_down.weight.lora_b": (b, None)})
    with pytest.raises(af.UnsupportedError, match=r"quantized.*blk.0.ffn_down.weight.lora_a \(Q8_0\)"):
        af.read_foreign(p)
    p = _hand_written(tmp_path / "n.gguf", {"blk.0.ffn_down.weight.lora_a": (a, None),
                                            "blk.0.ffn_down.weight.lora_b": (b, None),
                                            "output_norm.weight": (np.ones(16, np.float32), None),
                                            "blk.0.ffn_up.weight.lora_a": (a[:, :16].copy(), None)})
    with pytest.raises(af.UnsupportedError, match="cannot place") as e:
        af.read_foreign(p)
    assert "output_norm.weight" in str(e.value) and "blk.0.ffn_up.weight (lora_a or lora_b missing)" in str(e.value)
    p = _hand_written(tmp_path / "m.gguf", {"blk.0.ffn_down.weight.lora_a": (a, None),
                                            "blk.0.ffn_down.weight.lora_b": (b, None)})
    with pytest.raises(af.UnsupportedError, match=r"blk.0.ffn_down \(no module\)"):
        af.read_foreign(p, base={"model.layers.0.mlp.up_proj.weight": (32, 16)})
    p = _hand_written(tmp_path / "model.gguf", {}, gtype="model")
    with pytest.raises(af.UnsupportedError, match="not a GGUF LoRA adapter"):
        af.read_foreign(p)


def test_cli_round_trip_with_head_counts(tmp_path):
    from typer.testing import CliRunner

    from adapterfmt.cli.main import app

    adapter = lora_adapter(llama(), llama_modules((0,), ("q_proj", "k_proj")))
    src = af.save(adapter, tmp_path / "a.safetensors")
    run = CliRunner().invoke
    r = run(app, ["convert", str(src), str(tmp_path / "a.gguf"), "--to", "gguf"])
    assert r.exit_code != 0 and "number of attention heads" in r.output
    r = run(app, ["convert", str(src), str(tmp_path / "a.gguf"), "--to", "gguf", "--n-heads", "2", "--n-kv-heads", "1"])
    assert r.exit_code == 0, r.output
    r = run(app, ["convert", str(tmp_path / "a.gguf"), str(tmp_path / "b.safetensors"), "--n-heads", "2",
                  "--n-kv-heads", "1"])
    assert r.exit_code == 0, r.output
    assert_same_tensors(af.load(tmp_path / "b.safetensors").tensors(), adapter.tensors())
