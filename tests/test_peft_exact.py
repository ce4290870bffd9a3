"""PEFT files whose meaning depends on the base, or on config fields beyond the factors, with the real peft
package as the oracle: PiSSA / OLoRA (PEFT rewrites the base when it loads them), the other
``init_lora_weights`` values, embeddings saved whole, LoHa / LoKr without a base, modules the config does
not target, and config values of the wrong type (one error line through the CLI).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
from helpers_peft import VOCAB, build, case, load_peft, logits, randomize  # noqa: E402
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import adapterfmt as af  # noqa: E402

ATOL = 1e-4
IDS = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))

REWRITES = {  # name: (model, config, whether PEFT's own conversion to plain LoRA is right for it)
    "pissa": ("llama", lambda: LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=2, lora_alpha=4,
                                          init_lora_weights="pissa", rank_pattern={"down_proj": 3},
                                          alpha_pattern={"v_proj": 7}), True),
    "olora-rslora": ("llama", lambda: LoraConfig(target_modules=["q_proj", "up_proj"], r=2, lora_alpha=3,
                                                 use_rslora=True, init_lora_weights="olora"), True),
    "pissa-conv1d": ("gpt2", lambda: LoraConfig(target_modules=["c_attn", "c_fc"], r=2, lora_alpha=3,
                                                fan_in_fan_out=True, init_lora_weights="pissa"), True),
    # PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) gets these two wrong (its own
    # reload of the file is the oracle): an embedding LoRA (not rewritten) and DoRA
    "pissa-embedding": ("llama", lambda: LoraConfig(target_modules=["q_proj", "embed_tokens"], r=2, lora_alpha=4,
                                                    init_lora_weights="pissa"), False),
    "pissa-dora": ("llama", lambda: LoraConfig(target_modules=["q_proj", "up_proj"], r=2, lora_alpha=3,
                                               use_dora=True, init_lora_weights="pissa"), False),
}


def _peft_folders(tmp: Path, model_name: str, config: LoraConfig) -> tuple[Path, Path, torch.Tensor]:
    """Train-like PEFT run: init (rewriting the base), perturb the factors, save the file and PEFT's own
    conversion of it to plain LoRA; returns both folders and the trained model's logits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(build(model_name), copy.deepcopy(config))
        init = pm.peft_config["default"].init_lora_weights
        pm.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the initial adapter
        pm.save_pretrained(tmp / "init")
        pm.peft_config["default"].init_lora_weights = init
        randomize(pm, 1)
        pm.eval()
        expected = logits(pm, IDS)
        pm.save_pretrained(tmp / "file")
        pm.save_pretrained(tmp / "converted", path_initial_model_for_weight_conversion=str(tmp / "init"))
    return tmp / "file", tmp / "converted", expected


def _attached(base: torch.nn.Module, adapter: af.Adapter) -> torch.Tensor:
    af.attach(base, adapter, name="x")
    try:
        return logits(base, IDS)
    finally:
        af.detach(base)


def _checkpoint(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, path)
    return path


def _edit_config(folder: Path, **fields) -> None:
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(fields)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("name", sorted(REWRITES))
def test_base_rewriting_init_is_converted_exactly(tmp_path, name):
    model_name, make, peft_conversion_right = REWRITES[name]
    folder, converted, expected = _peft_folders(tmp_path, model_name, make())
    oracle, missing, unexpected = load_peft(model_name, folder)
    assert missing == [] and unexpected == []
    torch.testing.assert_close(logits(oracle, IDS), expected, atol=1e-6, rtol=0)

    base = build(model_name)
    plain = logits(base, IDS)
    adapter = af.read_foreign(folder, base=base)
    got = _attached(base, adapter)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (got - plain).abs().max() > 1e-2
    # a rewritten module keeps PEFT's factors and stores the initial ones: the explicit base part (spec 6.2.1)
    src = load_file(folder / "adapter_model.safetensors")
    for module, entry in adapter.modules.items():
        a = src.get(f"base_model.model.{module}.lora_A.weight")
        if a is not None and "embed" not in module:
            assert torch.equal(adapter.tensor(f"{module}.lora_A"), a)
            assert adapter.shape(f"{module}.init_A") == adapter.shape(f"{module}.lora_A")
            assert entry["params"]["base_part"] == {"scale": entry["params"]["scale"]}
    back = af.to_peft(adapter, tmp_path / "back")  # a plain LoRA of rank 2r: PEFT gives the same on the base
    assert json.loads((back / "adapter_config.json").read_text())["init_lora_weights"] is True
    torch.testing.assert_close(logits(load_peft(model_name, back)[0], IDS), expected, atol=ATOL, rtol=0)
    peft_conv = _attached(base, af.read_foreign(converted, base=base))
    if peft_conversion_right:
        torch.testing.assert_close(got, peft_conv, atol=ATOL, rtol=0)
    else:
        assert (peft_conv - expected).abs().max() > 1e-2

    # the CLI, with the base as a checkpoint; without it, one line naming the field
    ckpt = _checkpoint(base, tmp_path / "base.safetensors")
    from adapterfmt.cli.main import app

    runner = CliRunner()
    r = runner.invoke(app, ["convert", str(folder), str(tmp_path / "a.safetensors"), "--base", str(ckpt)])
    assert r.exit_code == 0, r.output
    torch.testing.assert_close(_attached(base, af.load(tmp_path / "a.safetensors")), expected, atol=ATOL, rtol=0)
    r = runner.invoke(app, ["convert", str(folder), str(tmp_path / "b.safetensors")])
    why = "(save_embedding_layers)" if "embedding" in name else f"init_lora_weights={make().init_lora_weights!r} " \
        "rewrites the base"
    assert r.exit_code == 1 and why in r.output
    assert "--base" in r.output and "Traceback" not in r.output and not (tmp_path / "b.safetensors").exists()


@pytest.mark.parametrize("init", [False, "gaussian", "eva", "orthogonal", "mica"])
def test_init_values_that_leave_the_base_alone(tmp_path, init):
    """PEFT's reload with these values touches only the initial factors, which the file's replace."""
    c = case(tmp_path, "llama", LoraConfig(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=4))
    _edit_config(c.folder, init_lora_weights=init)
    oracle, _, _ = load_peft("llama", c.folder)
    torch.testing.assert_close(logits(oracle, c.ids), c.expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(_attached(c.base, af.read_foreign(c.folder)), c.expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("init", "why"), [("pissa_niter_4", "randomised SVD"), ("corda", "activation statistics"),
                                           ("loftq", "quantised"), ("lora_ga", "gradients"),
                                           ("PISSA", "not an initialisation PEFT can load")])
def test_init_values_that_cannot_be_reproduced_are_refused(tmp_path, init, why):
    c = case(tmp_path, "llama", LoraConfig(target_modules=["q_proj"], r=2, lora_alpha=4))
    _edit_config(c.folder, init_lora_weights=init, **({"loftq_config": {"loftq_bits": 4}} if init == "loftq" else {}))
    with pytest.raises(af.UnsupportedError, match=rf"init_lora_weights={init!r} .*{why}"):
        af.read_foreign(c.folder, base=c.base)


def test_pissa_on_a_convolution_is_refused(tmp_path):
    c = case(tmp_path, "custom", LoraConfig(target_modules=["conv"], r=2, lora_alpha=4))
    _edit_config(c.folder, init_lora_weights="pissa")
    with pytest.raises(af.UnsupportedError, match="convolution 'conv': PEFT cannot load it either"):
        af.read_foreign(c.folder, base=c.base)


# ----- embeddings saved whole ------------------------------------------------------------------------------
def _resave(folder: Path, change) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(("targets", "key"), [(["q_proj", "embed_tokens"], "model.embed_tokens.base_layer.weight"),
                                              (["q_proj"], "lm_head.weight")])
def test_saved_embeddings(tmp_path, targets, key):
    """Equal to the base's: dropped (and said so); different: a dense replacement, as PEFT loads it over the
    base's; without the base: refused naming the key."""
    config = LoraConfig(target_modules=targets, r=2, lora_alpha=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(build("llama"), config)
        randomize(pm, 1)
        pm.eval()
        expected = logits(pm, IDS)
        pm.save_pretrained(tmp_path / "p", save_embedding_layers=True)
    folder, base = tmp_path / "p", build("llama")
    full = f"base_model.model.{key}"
    assert full in load_file(folder / "adapter_model.safetensors")
    adapter = af.read_foreign(folder, base=base)
    assert f"{full} equals the base weight: dropped" in adapter.manifest["provenance"][-1]["notes"]
    assert all(e["kind"] == "lowrank" for e in adapter.modules.values())
    torch.testing.assert_close(_attached(base, adapter), expected, atol=1e-5, rtol=0)
    with pytest.raises(af.UnsupportedError, match=rf"{full}: PEFT saved the base weight .* pass the base model"):
        af.read_foreign(folder)

    gen = torch.Generator().manual_seed(5)
    _resave(folder, lambda t: t.__setitem__(full, t[full] + 0.2 * torch.randn(t[full].shape, generator=gen)))
    oracle, missing, unexpected = load_peft("llama", folder)
    assert missing == [] and unexpected == []
    want = logits(oracle, IDS)
    assert (want - expected).abs().max() > 1e-2
    adapter = af.read_foreign(folder, base=base)
    module = key.removesuffix(".base_layer.weight").removesuffix(".weight")
    assert adapter.modules[module]["kind"] == "dense" and adapter.modules[module]["params"]["mode"] == "replace"
    assert f"{full} differs from the base weight: stored as a dense replacement of {module}.weight" in \
        adapter.manifest["provenance"][-1]["notes"]
    torch.testing.assert_close(_attached(base, adapter), want, atol=1e-5, rtol=0)

    _resave(folder, lambda t: t.__setitem__(full, torch.zeros(VOCAB + 2, 16)))
    with pytest.raises(af.BaseMismatchError, match="a resized embedding"):
        af.read_foreign(folder, base=base)


def test_convert_report_carries_the_notes(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(build("llama"), LoraConfig(target_modules=["embed_tokens"], r=2, lora_alpha=4))
        pm.save_pretrained(tmp_path / "p")
    ckpt = _checkpoint(build("llama"), tmp_path / "base.safetensors")
    report = af.convert(tmp_path / "p", tmp_path / "a", base=ckpt)
    assert report.notes == ["base_model.model.model.embed_tokens.base_layer.weight equals the base weight: dropped"]


# ----- shapes from the factors -------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [LoHaConfig(target_modules=["q_proj", "down_proj"], r=4, alpha=6,
                                               rank_pattern={"down_proj": 2}),
                                    LoKrConfig(target_modules=["q_proj", "up_proj"], r=4, alpha=6),
                                    LoKrConfig(target_modules=["v_proj", "down_proj"], r=2, alpha=3,
                                               decompose_both=True)], ids=["loha", "lokr", "lokr-both"])
def test_loha_lokr_on_linear_need_no_base(tmp_path, config):
    c = case(tmp_path, "llama", config)
    adapter = af.read_foreign(c.folder)
    assert adapter.base["fingerprint"] is None
    torch.testing.assert_close(_attached(c.base, adapter), c.expected, atol=1e-5, rtol=0)


def test_loha_on_conv_without_base_is_refused_at_attach(tmp_path):
    """2-D factors on a conv give its flattened shape; attaching to the conv is refused, never misapplied."""
    c = case(tmp_path, "custom", LoHaConfig(target_modules=["conv"], r=2, alpha=3))
    adapter = af.read_foreign(c.folder)
    assert adapter.modules["conv"]["shape"] == [6, 36]
    with pytest.raises(af.AdapterError, match="shape"):
        af.attach(c.base, adapter, name="x")
    torch.testing.assert_close(_attached(c.base, af.read_foreign(c.folder, base=c.base)), c.expected, atol=1e-5,
                               rtol=0)


# ----- modules the config does not target ---------------------------------------------------------------------
@pytest.mark.parametrize(("fields", "module"), [({"target_modules": ["q_proj"]}, "up_proj"),
                                                ({"layers_to_transform": [1]}, "layers.0."),
                                                ({"exclude_modules": "model\\.layers\\.1\\..*"}, "layers.1."),
                                                ({"target_modules": ".*\\.q_proj"}, "up_proj")])
def test_tensors_of_untargeted_modules_are_refused(tmp_path, fields, module):
    """PEFT ignores them when it loads the file (it wraps only what the config targets)."""
    c = case(tmp_path, "llama", LoraConfig(target_modules=["q_proj", "up_proj"], r=2, lora_alpha=4))
    _edit_config(c.folder, **fields)
    oracle, _, unexpected = load_peft("llama", c.folder)
    assert any(module in k for k in unexpected)
    with pytest.raises(af.UnsupportedError, match=rf"module '[^']*{module}[^']*' has adapter tensors but .* "
                                                  "(do not target it|PEFT ignores)"):
        af.read_foreign(c.folder, base=c.base)


# ----- config values of the wrong type ---------------------------------------------------------------------
BAD_CONFIGS = {
    "rank_pattern-bad-regex": ("lora", {"rank_pattern": {"(q_proj": 2}}, "rank_pattern"),
    "alpha_pattern-string": ("lora", {"alpha_pattern": "q_proj"}, "alpha_pattern"),
    "lora_alpha-string": ("lora", {"lora_alpha": "8"}, "lora_alpha"),
    "pattern-null-value": ("lora", {"rank_pattern": {"q_proj": None}}, "rank_pattern.q_proj"),
    "adalora-on-lora-tensors": ("lora", {"peft_type": "ADALORA", "init_r": 2}, "peft_type"),
    "peft_type-list": ("lora", {"peft_type": ["LORA"]}, "peft_type"),
    "init_r-null": ("lora", {"peft_type": "ADALORA", "init_r": None}, "init_r"),
    "feedforward_modules-int": ("ia3", {"feedforward_modules": 5}, "feedforward_modules"),
    "target_modules-bad-regex": ("lora", {"target_modules": "q_proj)"}, "target_modules"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_config_type_errors_are_one_line(tmp_path, name):
    kind, fields, field = BAD_CONFIGS[name]
    config = (LoraConfig(target_modules=["q_proj"], r=2, lora_alpha=4) if kind == "lora" else
              IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]))
    c = case(tmp_path, "llama", config)
    _edit_config(c.folder, **fields)
    from adapterfmt.cli.main import app

    ckpt = _checkpoint(c.base, tmp_path / "base.safetensors")
    r = CliRunner().invoke(app, ["convert", str(c.folder), str(tmp_path / "out.safetensors"), "--base", str(ckpt)])
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    assert field in lines[0] and str(c.folder) in lines[0], lines[0]
    assert not (tmp_path / "out.safetensors").exists()
