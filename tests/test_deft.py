"""DEFT (plugins/methods/density.py): the density term is the reference's ``compute_l0_penalty`` (transcribed in
numpy here), the eval density its ``compute_eval_sparsity``; through ``adapter train`` a zero weight is plain
LoRA bit for bit and a positive one lowers the density; strict config, one-line refusals, hooks removed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_methods import one_thread  # noqa: F401 (fixture)
from helpers_spec import invoke

import adapterfmt as af
from adapterfmt.plugin.registry import get_method
from adapterfmt.plugins.methods.density import activation_density
from adapterfmt.verbs.trainer import TrainOptions, train_adapter


pytestmark = pytest.mark.usefixtures("one_thread")


def relu_llama(vocab: int = 40) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, hidden_act="relu")
    return LlamaForCausalLM(cfg)


def reference_penalty(outputs: list[np.ndarray], eps: float) -> float:
    """IBM/DEFT's compute_l0_penalty(...).mean(), in numpy."""
    cols = [(o ** 2 / (o ** 2 + eps)).mean(axis=(1, 2)).reshape(o.shape[0], 1) for o in outputs]
    return float(np.concatenate(cols, axis=1).mean())


def test_density_term_and_eval_density_are_the_references():
    model = relu_llama()
    session = get_method("deft").train(model, config={"target_modules": ["q_proj", "up_proj"], "r": 2,
                                                      "density_weight": 0.5, "eps": 1e-3})
    with torch.no_grad():
        for layer in session.layers.values():
            layer.weights.lora_B.normal_()
    seen: list[np.ndarray] = []
    hooks = [model.model.layers[i].mlp.act_fn.register_forward_hook(
        lambda m, a, o: seen.append(o.detach().double().numpy())) for i in range(2)]
    ids = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(1))
    model(ids).logits.sum()
    term = session.regularization()
    assert term.requires_grad and len(seen) == 2
    assert term.item() == pytest.approx(0.5 * reference_penalty(seen, 1e-3), rel=1e-6)
    assert session.regularization().item() == 0.0  # taken: nothing is held until the next training pass
    with torch.no_grad():
        model(ids[:1])  # an eval pass is not watched
    assert session.regularization().item() == 0.0
    seen.clear()
    dens = activation_density(model, ids)
    nonzero = np.concatenate([(np.count_nonzero(o, axis=(1, 2)) / (o.shape[1] * o.shape[2])).reshape(-1, 1)
                              for o in seen], axis=1)
    assert dens == pytest.approx(float(nonzero.mean()), rel=1e-6) and 0.2 < dens < 0.8  # ReLU: about half
    for h in hooks:
        h.remove()
    session.remove()
    assert not model._forward_pre_hooks and not model.model.layers[0].mlp.act_fn._forward_hooks


def write_data(path: Path) -> Path:
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "it"]
    lines = [json.dumps({"text": " ".join(words[(i * 3 + j) % len(words)] for j in range(4 + i % 5))})
             for i in range(12)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_adapter_train_deft(tmp_path: Path):
    """`adapter train --method deft` on a ReLU Llama: weight 0 trains plain LoRA's adapter bit for bit (same
    seed, same LoRA options); weight 5 trains one whose MLP activations are less dense (the paper's metric)."""
    data = write_data(tmp_path / "d.jsonl")
    relu_llama(vocab=128).save_pretrained(tmp_path / "base")
    lora_cfg = {"target_modules": "all-linear", "r": 4, "alpha": 8}
    common = {"data": data, "base": tmp_path / "base", "max_steps": 6, "batch_size": 4, "lr": 2e-2, "cpu": True}
    lora = train_adapter(TrainOptions(method="lora", out=tmp_path / "lora.safetensors", config=lora_cfg, **common))
    zero = train_adapter(TrainOptions(method="deft", out=tmp_path / "zero.safetensors", **common,
                                      config={**lora_cfg, "density_weight": 0.0}))
    a, b = af.load(lora.out), af.load(zero.out)
    assert all(torch.equal(a.tensor(n), b.tensor(n)) for n in a.tensors()) and b.manifest["method"]["name"] == "deft"
    (tmp_path / "cfg.yaml").write_text("target_modules: all-linear\nr: 4\nalpha: 8\ndensity_weight: 5\n")
    r = invoke("train", "--method", "deft", "--base", str(tmp_path / "base"), "--data", str(data), "--out",
               str(tmp_path / "deft.safetensors"), "--config", str(tmp_path / "cfg.yaml"), "--max-steps", "6",
               "--batch-size", "4", "--lr", "2e-2", "--cpu", "--json")
    assert r.exit_code == 0, r.stderr
    deft = af.load(tmp_path / "deft.safetensors")
    assert deft.manifest["method"]["config"]["density_weight"] == 5
    ids = torch.tensor([list(b"the cat sat on a mat and it ran to the dog")])

    def density(adapter: af.Adapter) -> float:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        af.attach(model, adapter)
        return activation_density(model, ids)

    assert density(deft) < density(b) - 0.05


@pytest.mark.parametrize("config, message", [
    ({"density": 1.0}, "deft config has unknown key(s): 'density'"),
    ({"capture": "both"}, "deft config field capture"),
    ({"density_weight": -1}, "deft config field density_weight"),
    ({}, "deft: no module named '*.mlp.act_fn' in the model (config field activations)"),
])
def test_config_is_strict(config: dict, message: str):
    from adapterfmt.tiny import build_tiny

    model = build_tiny(seed=0)
    with pytest.raises(af.FormatError) as e:
        get_method("deft").train(model, config={"target_modules": ["q_proj"], **config})
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not any(n.endswith("adapterfmt_delta") for n, _ in model.named_modules())  # nothing injected
