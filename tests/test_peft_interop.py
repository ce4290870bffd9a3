"""PEFT interop, with the real peft package as the oracle.

For each method and non-trivial config (factors away from their zero init, mixed ranks and alphas,
rsLoRA, bias, modules_to_save ...) on tiny Llama, GPT-2 (Conv1D), BERT and custom modules:
the adapter read by adapterfmt and applied by adapterfmt gives PEFT's logits (fp32, atol 1e-5);
merged equals unmerged; adapterfmt -> PEFT is tensor-identical to the source and PEFT loads it with no
missing or unexpected keys and the same logits; and a PEFT config written without the source's config
(synthesised per-module rank / alpha patterns) still gives PEFT the same function.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

pytest.importorskip("peft")
from helpers_peft import build, case, load_peft, logits  # noqa: E402
from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PromptTuningConfig, VeraConfig  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import adapterfmt as af  # noqa: E402

ATOL = 1e-5
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = {
    "llama-mixed-ranks-alphas-mts": ("llama", lambda: LoraConfig(
        target_modules=LLAMA_ALL, r=4, lora_alpha=8, rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
        alpha_pattern={"v_proj": 3, "o_proj": 5.5}, modules_to_save=["lm_head"])),
    "llama-rslora-lora-bias": ("llama", lambda: LoraConfig(
        target_modules=["q_proj", "v_proj", "down_proj"], r=8, lora_alpha=16, use_rslora=True, lora_bias=True,
        rank_pattern={"down_proj": 3})),
    "llama-dora": ("llama", lambda: LoraConfig(target_modules=["q_proj", "up_proj"], r=4, lora_alpha=6,
                                               use_dora=True)),
    "llama-layers-tokens": ("llama", lambda: LoraConfig(
        target_modules=["k_proj", "o_proj"], layers_to_transform=[1], r=2, lora_alpha=4,
        trainable_token_indices={"embed_tokens": [5, 1, 9]})),
    "gpt2-conv1d": ("gpt2", lambda: LoraConfig(target_modules=["c_attn", "c_proj", "c_fc"], r=4, lora_alpha=12,
                                               fan_in_fan_out=True, rank_pattern={"c_fc": 2})),
    "gpt2-conv1d-dora": ("gpt2", lambda: LoraConfig(target_modules=["c_attn", "c_fc"], r=4, lora_alpha=8,
                                                    fan_in_fan_out=True, use_dora=True)),
    "bert-mts-bias-all": ("bert", lambda: LoraConfig(
        target_modules=["query", "value"], r=4, lora_alpha=8, lora_bias=True, modules_to_save=["classifier"])),
    "custom-emb-mlp-conv": ("custom", lambda: LoraConfig(
        target_modules=["emb", "mlp.0", "mlp.2", "conv"], r=4, lora_alpha=8, rank_pattern={"conv": 2},
        alpha_pattern={"emb": 2}, modules_to_save=["head"])),
    "custom-dora": ("custom", lambda: LoraConfig(target_modules=["emb", "mlp.0", "conv"], r=3, lora_alpha=5,
                                                 use_dora=True)),
    "custom-lora-bias-rslora": ("custom", lambda: LoraConfig(target_modules=["mlp.0", "conv"], r=4, lora_alpha=3,
                                                             lora_bias=True, use_rslora=True)),
    "llama-ia3": ("llama", lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                             feedforward_modules=["down_proj"])),
    "custom-ia3": ("custom", lambda: IA3Config(target_modules=["mlp.0", "mlp.2", "conv"],
                                               feedforward_modules=["mlp.2", "conv"], modules_to_save=["head"])),
    "gpt2-ia3": ("gpt2", lambda: IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"],
                                           fan_in_fan_out=True)),
    "llama-prompt": ("llama", lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    "llama-loha": ("llama", lambda: LoHaConfig(target_modules=["q_proj", "down_proj"], r=4, alpha=6,
                                               rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3})),
    "custom-loha-conv": ("custom", lambda: LoHaConfig(target_modules=["mlp.0", "conv"], r=3, alpha=5)),
    "llama-lokr": ("llama", lambda: LoKrConfig(target_modules=["q_proj", "up_proj"], r=4, alpha=6)),
    "custom-lokr-conv": ("custom", lambda: LoKrConfig(target_modules=["mlp.2", "conv"], r=2, alpha=3,
                                                      decompose_both=True)),
    "llama-vera": ("llama", lambda: VeraConfig(target_modules=["q_proj", "v_proj"], r=8)),
    # bias="lora_only" / "all": PEFT trains and saves the base bias of targeted modules (role bias_value)
    "gpt2-conv1d-bias-lora-only": ("gpt2", lambda: LoraConfig(target_modules=["c_attn", "c_fc"], r=4, lora_alpha=8,
                                                              fan_in_fan_out=True, bias="lora_only")),
    "gpt2-conv1d-dora-bias-all": ("gpt2", lambda: LoraConfig(target_modules=["c_attn", "c_proj"], r=2, lora_alpha=3,
                                                             fan_in_fan_out=True, use_dora=True, bias="all")),
    "llama-bias-lora-only-lora-bias": ("llama-bias", lambda: LoraConfig(
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], r=4, lora_alpha=8, bias="lora_only",
        lora_bias=True)),
    "custom-bias-all": ("custom", lambda: LoraConfig(target_modules=["emb", "mlp.0", "conv"], r=3, lora_alpha=5,
                                                     bias="all")),
}
FUNCTION_ONLY = {
    "llama-adalora": ("llama", lambda: AdaLoraConfig(target_modules=["q_proj", "v_proj"], init_r=4, lora_alpha=6,
                                                     total_step=10)),
}
"""AdaLoRA's E is folded into A: the round trip keeps the function, not the tensors (written back as LoRA)."""


def _peft_tensors(folder):
    return load_file(folder / "adapter_model.safetensors")


def _check_applied(c, adapter):
    model = c.base
    plain = logits(model, c.ids)
    af.attach(model, adapter, name="x")
    got = logits(model, c.ids)
    torch.testing.assert_close(got, c.expected, atol=ATOL, rtol=0)
    assert got.shape != plain.shape or (got - plain).abs().max() > 1e-3, "the adapter must change the output"
    if all(e["kind"] != "prompt" for e in adapter.modules.values()):
        try:
            af.merge_into(model, "x")
        except af.UnsupportedError as e:  # a LoRA bias on a module without a bias stays unmerged
            assert "LoRA bias" in str(e)
        else:
            torch.testing.assert_close(logits(model, c.ids), got, atol=ATOL, rtol=0)
            af.unmerge(model, "x")
    af.detach(model)
    torch.testing.assert_close(logits(model, c.ids), plain, atol=1e-6, rtol=0)


def _check_peft_loads(model_name, folder, c):
    """PEFT loads ``folder`` with no missing or unexpected adapter keys and computes the expected logits."""
    pm, missing, unexpected = load_peft(model_name, folder)
    assert missing == [] and unexpected == []
    torch.testing.assert_close(logits(pm, c.ids), c.expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_peft_to_adapterfmt_to_peft(tmp_path, name):
    model_name, make = CASES[name]
    c = case(tmp_path, model_name, make())
    adapter = af.read_foreign(c.folder, base=c.base)
    _check_applied(c, adapter)

    saved = af.save(adapter, tmp_path / "af.safetensors")
    back = af.write_foreign(af.load(saved), tmp_path / "back", "peft")
    src, out = _peft_tensors(c.folder), _peft_tensors(back)
    assert sorted(out) == sorted(src)
    for k in src:
        assert out[k].dtype == src[k].dtype and torch.equal(out[k], src[k]), k
    src_cfg = json.loads((c.folder / "adapter_config.json").read_text())
    out_cfg = json.loads((back / "adapter_config.json").read_text())
    for key in ("peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
                "lora_bias", "bias", "target_modules", "layers_to_transform", "modules_to_save",
                "trainable_token_indices", "feedforward_modules", "num_virtual_tokens"):
        if key in src_cfg:
            assert out_cfg.get(key) == src_cfg[key], key
    _check_peft_loads(model_name, back, c)


@pytest.mark.parametrize("name", sorted(n for n in CASES if "prompt" not in n and "tokens" not in n))
def test_synthesised_peft_config(tmp_path, name):
    """Without the source's config (an adapter made elsewhere), per-module ranks and scales still reach PEFT."""
    model_name, make = CASES[name]
    c = case(tmp_path, model_name, make())
    adapter = af.read_foreign(c.folder, base=c.base)
    adapter.manifest["provenance"] = []
    back = af.to_peft(adapter, tmp_path / "synth")
    _check_peft_loads(model_name, back, c)


@pytest.mark.parametrize("name", sorted(FUNCTION_ONLY))
def test_function_only_round_trip(tmp_path, name):
    model_name, make = FUNCTION_ONLY[name]
    c = case(tmp_path, model_name, make())
    adapter = af.read_foreign(c.folder, base=c.base)
    _check_applied(c, adapter)
    back = af.to_peft(adapter, tmp_path / "back")
    _check_peft_loads(model_name, back, c)


def test_records_base_and_config(tmp_path):
    c = case(tmp_path, "llama", CASES["llama-rslora-lora-bias"][1]())
    cfg_path = c.folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(base_model_name_or_path="org/tiny-llama", revision="abc123")
    cfg_path.write_text(json.dumps(cfg))
    adapter = af.read_foreign(c.folder, base=c.base)
    assert adapter.base["name"] == "org/tiny-llama" and adapter.base["revision"] == "abc123"
    assert adapter.base["fingerprint"] == af.fingerprint_module(build("llama"))
    q = adapter.modules["model.layers.0.self_attn.q_proj"]
    assert q["params"]["scale"] == 16 / 8 ** 0.5
    d = adapter.modules["model.layers.1.mlp.down_proj"]
    assert d["params"]["scale"] == 16 / 3 ** 0.5 and adapter.shape("model.layers.1.mlp.down_proj.lora_A")[0] == 3
    back = af.to_peft(adapter, tmp_path / "back")
    out = json.loads((back / "adapter_config.json").read_text())
    assert out["base_model_name_or_path"] == "org/tiny-llama" and out["revision"] == "abc123"


@pytest.mark.parametrize(("field", "value"), [("layer_replication", [[0, 1]]), ("use_qalora", True),
                                                ("alora_invocation_tokens", [1, 2]), ("target_parameters", ["w"])])
def test_unrepresentable_field_is_an_error_naming_it(tmp_path, field, value):
    c = case(tmp_path, "llama", CASES["llama-dora"][1]())
    cfg_path = c.folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[field] = value
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(af.UnsupportedError, match=field):
        af.read_foreign(c.folder, base=c.base)


def test_base_bias_of_targeted_module_is_bias_value(tmp_path):
    """bias="lora_only": the trained base bias is the lowrank entry's bias_value; it replaces the module's bias
    (merged and unmerged), unmerge restores weights and biases, and delta-space merges refuse it."""
    c = case(tmp_path, "llama-bias", CASES["llama-bias-lora-only-lora-bias"][1]())
    adapter = af.read_foreign(c.folder, base=c.base)
    q = "model.layers.0.self_attn.q_proj"
    assert set(adapter.roles(q)) == {"lora_A", "lora_B", "bias", "bias_value"}
    src = _peft_tensors(c.folder)
    assert torch.equal(adapter.module_tensors(q)["bias_value"], src[f"base_model.model.{q}.base_layer.bias"])
    assert not torch.equal(adapter.module_tensors(q)["bias_value"], c.base.get_submodule(q).bias)
    before = {k: v.clone() for k, v in c.base.state_dict().items()}
    af.attach(c.base, adapter, name="x")
    af.merge_into(c.base, "x")
    lin = c.base.get_submodule(q)
    scale = adapter.modules[q]["params"]["scale"]
    want = adapter.module_tensors(q)["bias_value"] + scale * adapter.module_tensors(q)["bias"]
    torch.testing.assert_close(lin.bias.detach(), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(c.base, c.ids), c.expected, atol=ATOL, rtol=0)
    af.unmerge(c.base, "x")
    after = c.base.state_dict()
    for k, v in before.items():
        if k.endswith(".bias"):
            assert torch.equal(after[k], v), k
        else:
            torch.testing.assert_close(after[k], v, atol=1e-6, rtol=0)
    # per-row adapters fall back to grouping rows by adapter
    with af.adapter_ids(c.base, ["x", None]):
        rows = logits(c.base, c.ids)
    torch.testing.assert_close(rows[0], c.expected[0], atol=ATOL, rtol=0)
    af.detach(c.base)
    torch.testing.assert_close(rows[1], logits(c.base, c.ids)[1], atol=ATOL, rtol=0)
    with pytest.raises(af.UnsupportedError, match=rf"{q} \(lowrank, bias_value\)"):
        af.merge_adapters([adapter, adapter])


def test_bias_value_on_module_without_bias_is_refused(tmp_path):
    c = case(tmp_path, "llama", CASES["llama-dora"][1]())
    adapter = af.read_foreign(c.folder, base=c.base)
    q = "model.layers.0.self_attn.q_proj"
    adapter = af.Adapter(adapter.manifest, {**adapter.tensors(),
                                            f"{q}.bias_value": torch.zeros(adapter.modules[q]["shape"][0])})
    with pytest.raises(af.UnsupportedError, match="bias_value replaces the module's bias"):
        af.attach(c.base, adapter, name="x")


def test_wrong_rank_against_config_is_an_error(tmp_path):
    c = case(tmp_path, "custom", CASES["custom-dora"][1]())
    cfg_path = c.folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["r"] = 5
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(af.FormatError, match="rank 3, the config says 5"):
        af.read_foreign(c.folder, base=c.base)


def test_pickle_needs_explicit_flag(tmp_path):
    c = case(tmp_path, "custom", CASES["custom-lora-bias-rslora"][1]())
    tensors = _peft_tensors(c.folder)
    (c.folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, c.folder / "adapter_model.bin")
    with pytest.raises(af.UnsupportedError, match="allow_pickle"):
        af.read_foreign(c.folder)
    adapter = af.read_foreign(c.folder, allow_pickle=True)
    _check_applied(c, adapter)


@pytest.mark.parametrize("name", ["llama-ia3", "custom-ia3", "gpt2-ia3"])
def test_ia3_needs_no_base(tmp_path, name):
    """An ia3_l tensor gives its module's ndim and the dimension it scales; the rest stays 0 (spec 6.6)."""
    model_name, config = CASES[name]
    c = case(tmp_path, model_name, config())
    adapter = af.read_foreign(c.folder)
    vectors = [e for e in adapter.modules.values() if e["kind"] == "vector"]
    assert vectors and all(0 in e["shape"] for e in vectors)
    _check_applied(c, adapter)
    out = af.convert(c.folder, tmp_path / "a")  # the CLI path writes it, and it loads and validates
    assert out.modules == len(adapter.modules)
    af.validate(tmp_path / "a")
    ckpt = tmp_path / "base.safetensors"
    from safetensors.torch import save_model

    save_model(c.base, str(ckpt))  # (GPT-2 ties its head to its embedding: stored once)
    with_base = af.read_foreign(c.folder, base=ckpt)  # with the base, the whole shapes and its fingerprint
    assert with_base.base["fingerprint"] == af.fingerprint_checkpoint(ckpt)
    assert all(0 not in e["shape"] for e in with_base.modules.values())


def test_vector_shape_must_know_the_spanned_dimension():
    entry = {"kind": "vector", "shape": [0, 8], "params": {"op": "scale", "side": "output"}}
    adapter = af.Adapter(af.new_manifest("ia3", {"m": entry}), {"m.vector": torch.ones(8)})
    with pytest.raises(af.FormatError, match="leaves the output dimension the vector spans unknown"):
        af.validate(adapter)


def test_convert_api_and_detection(tmp_path):
    c = case(tmp_path, "custom", CASES["custom-emb-mlp-conv"][1]())
    from adapterfmt.verbs.conversion import detect_format

    assert detect_format(c.folder) == "peft"
    report = af.convert(c.folder, tmp_path / "a")
    assert report.source_format == "peft" and report.target_format == "adapterfmt" and report.modules == 5
    assert detect_format(tmp_path / "a") == "adapterfmt"
    with pytest.raises(af.UnsupportedError, match="--to"):
        af.convert(tmp_path / "a", tmp_path / "b")
    with pytest.raises(af.OutputExistsError):
        af.convert(c.folder, tmp_path / "a")
    af.convert(tmp_path / "a", tmp_path / "b", to="peft")
    _check_peft_loads("custom", tmp_path / "b", c)
    (tmp_path / "empty").mkdir()
    with pytest.raises(af.FormatError, match="not an adapter in any known format"):
        detect_format(tmp_path / "empty")


def test_cli_convert(tmp_path):
    from adapterfmt.cli.main import app

    c = case(tmp_path, "custom", CASES["custom-emb-mlp-conv"][1]())
    runner = CliRunner()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = runner.invoke(app, ["convert", str(c.folder), str(tmp_path / "a.safetensors"), "--json"])
        assert r.exit_code == 0, r.output
        info = json.loads(r.stdout)
        assert info["source_format"] == "peft" and info["modules"] == 5
        assert af.load(tmp_path / "a.safetensors").method == "lora"
        r = runner.invoke(app, ["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "p"), "--to", "peft"])
        assert r.exit_code == 0, r.output
        assert (tmp_path / "p" / "adapter_config.json").is_file()
        r = runner.invoke(app, ["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "p"), "--to", "peft"])
        assert r.exit_code == 1 and "exists" in r.output
        r = runner.invoke(app, ["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "q"), "--to", "nope"])
        assert r.exit_code == 1 and "unknown adapter format" in r.output
