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

from helpers_formats import assert_same_tensors, check_function, llama, llama_modules, lora_adapter  # noqa: E402

import adapterfmt as af  # noqa: E402

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


def _llama_cpp_dense(path, permuted=True):
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
        if permuted and parts[-1] in ("attn_q", "attn_k"):
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
    path = af.write_foreign(adapter, tmp_path / "a.gguf", "gguf", arch="llama", n_heads=N_HEADS, n_kv_heads=N_KV)
    back = af.read_foreign(path, n_heads=N_HEADS, n_kv_heads=N_KV)
    assert_same_tensors(back.tensors(), adapter.tensors())
    assert back.base["fingerprint"] is None
    with pytest.raises(af.UnsupportedError, match="number of attention heads"):
        af.read_foreign(path)
    # without q/k no head count is needed
    up = lora_adapter(model, llama_modules((1,), ("up_proj",)))
    p2 = af.write_foreign(up, tmp_path / "up.gguf", "gguf", arch="llama")
    assert_same_tensors(af.read_foreign(p2).tensors(), up.tensors())


def test_f16_round_trip_and_alpha_zero(tmp_path):
    model = llama()
    mods = llama_modules((0,), ("v_proj", "down_proj"))
    adapter = lora_adapter(model, mods, r={mods[0]: 2, mods[1]: 5}, scale=1.0)
    half = af.Adapter(adapter.manifest, {k: v.half() for k, v in adapter.tensors().items()})
    path = af.write_foreign(half, tmp_path / "a.gguf", "gguf", arch="llama")
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
        af.write_foreign(adapter, tmp_path / "x.gguf", "gguf", arch="llama")
    odd = lora_adapter(model, mods)
    odd.manifest["modules"]["model.layers.0.mlp.extra_proj"] = odd.manifest["modules"].pop(mods[0])
    renamed = af.Adapter(odd.manifest, {k.replace(mods[0], "model.layers.0.mlp.extra_proj"): v for k, v in odd.tensors().items()})
    with pytest.raises(af.UnsupportedError, match="llama.cpp tensor name.*extra_proj"):
        af.write_foreign(renamed, tmp_path / "x.gguf", "gguf", arch="qwen2")
    with pytest.raises(af.UnsupportedError, match="'gpt2'.*not verified"):
        af.write_foreign(lora_adapter(model, mods), tmp_path / "x.gguf", "gguf", arch="gpt2")
    assert not (tmp_path / "x.gguf").exists()


def _hand_written(path, tensors, *, alpha=4.0, gtype="adapter", kv=None):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type(gtype)
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    for key, value in (kv or {}).items():
        w.add_key_value(key, value, gguf.GGUFValueType.get_type(value), gguf.GGUFValueType.INT32
                        if isinstance(value, list) else None)
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
    from adapterfmt.cli.main import app
    from typer.testing import CliRunner

    adapter = lora_adapter(llama(), llama_modules((0,), ("q_proj", "k_proj")))
    src = af.save(adapter, tmp_path / "a.safetensors")
    run = CliRunner().invoke
    r = run(app, ["convert", str(src), str(tmp_path / "a.gguf"), "--to", "gguf", "--arch", "llama"])
    assert r.exit_code != 0 and "number of attention heads" in r.output
    r = run(app, ["convert", str(src), str(tmp_path / "a.gguf"), "--to", "gguf", "--arch", "llama", "--n-heads", "2",
                  "--n-kv-heads", "1"])
    assert r.exit_code == 0, r.output
    r = run(app, ["convert", str(tmp_path / "a.gguf"), str(tmp_path / "b.safetensors"), "--n-heads", "2",
                  "--n-kv-heads", "1"])
    assert r.exit_code == 0, r.output
    assert_same_tensors(af.load(tmp_path / "b.safetensors").tensors(), adapter.tensors())


def _cli(*args):
    from adapterfmt.cli.main import app
    from typer.testing import CliRunner

    return CliRunner().invoke(app, [str(a) for a in args])


def _pair(rng, r=2, fin=32, fout=16):
    a, b = rng.standard_normal((r, fin), dtype=np.float32), rng.standard_normal((fout, r), dtype=np.float32)
    return (a, None), (b, None)


def test_alora_is_refused(tmp_path):
    """An activated LoRA only acts after its invocation tokens; read as a plain LoRA it would act everywhere."""
    a, b = _pair(np.random.default_rng(0))
    p = _hand_written(tmp_path / "alora.gguf", {"blk.0.ffn_down.weight.lora_a": a, "blk.0.ffn_down.weight.lora_b": b},
                      kv={"adapter.alora.invocation_tokens": [5, 9, 2]})
    with pytest.raises(af.UnsupportedError, match="adapter.alora.invocation_tokens"):
        af.read_foreign(p)
    r = _cli("convert", p, tmp_path / "out.safetensors")
    assert r.exit_code == 1 and "adapter.alora.invocation_tokens" in r.output
    assert not (tmp_path / "out.safetensors").exists()


def test_token_embd_is_an_embedding_without_a_base(tmp_path):
    """A LoRA on token_embd converted to PEFT with head counts but no base: PEFT must apply it (as
    lora_embedding_A/B), giving llama.cpp's function."""
    from helpers_formats import ids
    from helpers_peft import logits
    from peft import PeftModel
    from safetensors.torch import load_file

    model = llama()
    adapter = lora_adapter(model, ["model.embed_tokens", *llama_modules((0,), ("q_proj", "k_proj", "up_proj"))], r=3)
    path = af.write_foreign(adapter, tmp_path / "a.gguf", "gguf", base=model)
    r = _cli("convert", path, tmp_path / "peft", "--to", "peft", "--n-heads", N_HEADS, "--n-kv-heads", N_KV)
    assert r.exit_code == 0, r.output
    keys = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    ref = llama()
    with torch.no_grad():
        for m, dw in _llama_cpp_dense(path).items():
            ref.get_submodule(m).weight += dw
    got = logits(PeftModel.from_pretrained(llama(), tmp_path / "peft").eval(), ids())
    assert (logits(ref, ids()) - logits(llama(), ids())).abs().max() > 1e-3
    torch.testing.assert_close(got, logits(ref, ids()), atol=1e-5, rtol=0)


def _qwen2(folder=None):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=48,
                                         max_position_embeddings=64, tie_word_embeddings=False)).float().eval()
    if folder is not None:
        model.save_pretrained(folder)
    return model


def test_architecture_from_the_base_and_arch_option(tmp_path):
    """A Qwen2 adapter is written as qwen2 (llama.cpp's converter does not permute Qwen2's q/k rows);
    --arch names it without a base; an unknown architecture is refused in one line."""
    model = _qwen2(tmp_path / "qwen")
    adapter = lora_adapter(model, llama_modules((0, 1), ("q_proj", "k_proj", "v_proj", "down_proj")), r=2)
    src = af.save(adapter, tmp_path / "a.safetensors")
    for extra in (["--base", tmp_path / "qwen"], ["--arch", "qwen2"]):
        out = tmp_path / "q.gguf"
        r = _cli("convert", src, out, "--to", "gguf", "--overwrite", *extra)
        assert r.exit_code == 0, r.output
        kv, t = _read(out)
        assert kv["general.architecture"] == "qwen2"
        assert torch.equal(t["blk.0.attn_q.weight.lora_b"], adapter.tensor("model.layers.0.self_attn.q_proj.lora_B"))
        check_function(model, af.read_foreign(out), _llama_cpp_dense(out, permuted=False))
    # a llama base still gets llama's permutation
    llama().save_pretrained(tmp_path / "llama")
    r = _cli("convert", src, tmp_path / "l.gguf", "--to", "gguf", "--base", tmp_path / "llama")
    assert r.exit_code == 0, r.output
    assert _read(tmp_path / "l.gguf")[0]["general.architecture"] == "llama"
    cfg = tmp_path / "qwen" / "config.json"
    cfg.write_text(cfg.read_text().replace('"model_type": "qwen2"', '"model_type": "gpt_neox"'))
    refusals = ((["--base", tmp_path / "qwen"], "model_type 'gpt_neox'"), (["--arch", "gpt2"], "'gpt2'"), ([], "--arch"))
    for extra, msg in refusals:
        r = _cli("convert", src, tmp_path / "x.gguf", "--to", "gguf", *extra)
        assert r.exit_code == 1 and msg in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert not (tmp_path / "x.gguf").exists()


def test_truncated_files_give_one_line_errors(tmp_path):
    model = llama()
    adapter = lora_adapter(model, ["model.embed_tokens", *llama_modules((0,), ("q_proj", "up_proj"))], r=2)
    path = af.write_foreign(adapter, tmp_path / "a.gguf", "gguf", base=model)
    data = path.read_bytes()
    reader = gguf.GGUFReader(path)
    data_end = max(t.data_offset + t.n_bytes for t in reader.tensors)
    cuts = sorted({*range(0, data_end, 13), *range(0, 40), data_end - 1})
    for cut in cuts:
        cut_path = tmp_path / f"cut{cut}.gguf"
        cut_path.write_bytes(data[:cut])
        r = _cli("convert", cut_path, tmp_path / "out.safetensors", "--n-heads", N_HEADS, "--n-kv-heads", N_KV)
        assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (cut, r.output, r.exception)
        assert str(cut_path) in r.output.replace("\n", "") and "Traceback" not in r.output, (cut, r.output)
        assert not (tmp_path / "out.safetensors").exists()
    assert len(cuts) > 50


def test_bf16_is_read_exactly_and_written_as_bf16(tmp_path):
    model = llama()
    mods = llama_modules((0,), ("v_proj", "down_proj"))
    adapter = lora_adapter(model, mods, r=2)
    bf = af.Adapter(adapter.manifest, {k: v.bfloat16() for k, v in adapter.tensors().items()})
    path = af.write_foreign(bf, tmp_path / "a.gguf", "gguf", arch="llama")
    assert {t.tensor_type for t in gguf.GGUFReader(path).tensors} == {gguf.GGMLQuantizationType.BF16}
    assert_same_tensors(af.read_foreign(path, base=model).tensors(), bf.tensors())
    # a file written by gguf itself (bf16 as llama.cpp stores it): the exact float values
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 32), dtype=np.float32), rng.standard_normal((16, 2), dtype=np.float32)
    qa, qb = (gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16) for x in (a, b))
    p = _hand_written(tmp_path / "h.gguf", {"blk.0.ffn_down.weight.lora_a": (qa, gguf.GGMLQuantizationType.BF16),
                                            "blk.0.ffn_down.weight.lora_b": (qb, gguf.GGMLQuantizationType.BF16)})
    got = af.read_foreign(p).tensors()
    want_a = gguf.quants.dequantize(qa, gguf.GGMLQuantizationType.BF16)
    assert got["model.layers.0.mlp.down_proj.lora_A"].dtype == torch.bfloat16
    assert np.array_equal(got["model.layers.0.mlp.down_proj.lora_A"].float().numpy(), want_a)
    assert np.array_equal(got["model.layers.0.mlp.down_proj.lora_B"].float().numpy(),
                          gguf.quants.dequantize(qb, gguf.GGMLQuantizationType.BF16))


def test_adapter_name_and_base_model_keys(tmp_path):
    """general.name names the adapter; the base is general.base_model.0.* (gguf.Keys.General)."""
    G = gguf.Keys.General
    a, b = _pair(np.random.default_rng(2))
    p = _hand_written(tmp_path / "n.gguf", {"blk.0.ffn_down.weight.lora_a": a, "blk.0.ffn_down.weight.lora_b": b},
                      kv={G.NAME: "My Adapter", G.BASE_MODEL_COUNT: 1, "adapter.lora.task_name": "summarize",
                          G.BASE_MODEL_NAME.format(id=0): "Llama 3 8B",
                          G.BASE_MODEL_ORGANIZATION.format(id=0): "Meta Llama",
                          G.BASE_MODEL_REPO_URL.format(id=0): "https://huggingface.co/meta-llama/Meta-Llama-3-8B"})
    adapter = af.read_foreign(p)
    assert adapter.base["name"] == "meta-llama/Meta-Llama-3-8B"
    out = af.write_foreign(adapter, tmp_path / "o.gguf", "gguf")
    assert _read(out)[0] == _read(p)[0]
    # another base: its name under general.base_model.0.name, no adapter name
    adapter.manifest["base"]["name"] = "org/other-model"
    kv, _ = _read(af.write_foreign(adapter, tmp_path / "o2.gguf", "gguf"))
    assert kv[G.NAME] == "My Adapter" and kv[G.BASE_MODEL_COUNT] == 1
    assert kv[G.BASE_MODEL_NAME.format(id=0)] == "org/other-model" and G.BASE_MODEL_REPO_URL.format(id=0) not in kv
    assert af.read_foreign(tmp_path / "o2.gguf").base["name"] == "org/other-model"
    plain = lora_adapter(llama(), llama_modules((0,), ("up_proj",)))
    plain.manifest["base"]["name"] = "org/base"
    kv, _ = _read(af.write_foreign(plain, tmp_path / "o3.gguf", "gguf", arch="llama"))
    assert G.NAME not in kv and kv[G.BASE_MODEL_NAME.format(id=0)] == "org/base"
