"""The train verb: target matching, freezing, training any torch module, extraction and reload."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers_methods import one_thread  # noqa: F401 (fixture)
from torch import nn

import adapterfmt as af
from adapterfmt.tiny import build_tiny

LORA = af.registry.get_method("lora")


pytestmark = pytest.mark.usefixtures("one_thread")


def targets(model: nn.Module, spec, **kw) -> list[str]:
    return list(af.select_modules(model, spec, **kw))


def test_target_matching() -> None:
    model = build_tiny()
    assert targets(model, ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert targets(model, ["model.layers.1.mlp.up_proj"]) == ["model.layers.1.mlp.up_proj"]
    with pytest.raises(af.FormatError, match="no module"):  # a suffix matches whole name parts only
        targets(model, ["proj"])
    assert targets(model, r".*\.(k|v)_proj") == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
                                                 "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]
    linear = targets(model, "all-linear")
    assert len(linear) == 14 and "lm_head" not in linear
    assert targets(model, "all-linear", layers=1, exclude_modules=["re:.*mlp.*"]) == [
        f"model.layers.1.self_attn.{p}_proj" for p in "qkvo"]
    assert targets(model, ["o_proj"], layers=[0], layers_pattern="layers") == ["model.layers.0.self_attn.o_proj"]
    with pytest.raises(af.UnsupportedError, match="RMSNorm"):
        targets(model, ["input_layernorm"])
    assert af.pattern_value({"q_proj": 2, "layers.1.self_attn.q_proj": 3}, "model.layers.1.self_attn.q_proj", 8) == 3
    assert af.pattern_value({"q_proj": 2}, "model.layers.1.self_attn.k_proj", 8) == 8


def lm_task(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences following a fixed random next-token table: learnable, and far from the base model."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randint(0, 128, (128,), generator=gen)
    seq = [torch.randint(0, 128, (16,), generator=gen)]
    for _ in range(12):
        seq.append(table[seq[-1]])
    ids = torch.stack(seq, dim=1)
    return ids[:, :-1], ids[:, 1:]


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).reshape(-1, 128), y.reshape(-1))


def test_trained_lora_lowers_loss_and_reloads_identically(tmp_path) -> None:
    model = build_tiny(seed=0)
    x, y = lm_task()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    session = LORA.train(model, config={"target_modules": "all-linear", "r": 4, "alpha": 8, "dropout": 0.1,
                                        "rank_pattern": {"down_proj": 2}, "use_rslora": True})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.adapterfmt_delta.weights.{r}" for n in session.layers for r in ("lora_A", "lora_B")}
    with torch.no_grad():
        start = lm_loss(model, x, y).item()
    model.train()
    opt = torch.optim.AdamW(session.parameters(), lr=1e-2)
    for _ in range(40):
        loss = lm_loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        end = lm_loss(model, x, y).item()
        trained = model(x)
    assert end < 0.7 * start, (start, end)
    adapter = session.extract()
    assert adapter.modules["model.layers.0.mlp.down_proj"]["params"]["scale"] == pytest.approx(8 / 2 ** 0.5)
    assert adapter.tensor("model.layers.0.mlp.down_proj.lora_A").shape == (2, 128)
    session.remove()
    for k, v in model.state_dict().items():  # the base is untouched and its names are back
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in model.parameters())
    loaded = af.validate(af.save(adapter, tmp_path / "trained.safetensors"))
    assert loaded.base["fingerprint"] == af.fingerprint_module(model)
    af.attach(model, loaded)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained, atol=0, rtol=0)


def train_steps(model: nn.Module, session: af.TrainSession, x: torch.Tensor, steps: int = 3) -> None:
    opt = torch.optim.SGD(session.parameters(), lr=0.1)
    for _ in range(steps):
        out = model(x)
        loss = (out.logits if hasattr(out, "logits") else out).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("config", [
    {"target_modules": ["c_attn", "c_fc", "wte"], "r": 2, "alpha": 4},
    {"target_modules": ["c_attn", "c_proj"], "r": 2, "alpha": 4, "lora_bias": True},
    {"target_modules": ["c_attn"], "r": 2, "alpha": 4, "use_dora": True},
])
def test_train_on_gpt2_conv1d_and_embedding(config: dict) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                       bos_token_id=0, eos_token_id=0)).eval()
    x = torch.randint(0, 64, (2, 6))
    session = LORA.train(model, config=config)
    train_steps(model, session, x)
    with torch.no_grad():
        trained = model(x).logits
    adapter = session.extract()
    session.remove()
    af.attach(model, af.validate(adapter))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, trained, atol=1e-6, rtol=1e-6)
        if "wte" not in config["target_modules"]:  # (wte is tied to the head: merging changes both)
            af.merge_into(model, "lora")
            torch.testing.assert_close(model(x).logits, trained, atol=1e-5, rtol=1e-5)


def test_train_on_conv2d_and_extract_twice() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1))
    x = torch.randn(2, 3, 5, 5)
    session = LORA.train(model, config={"target_modules": ["0", "2"], "r": 2, "alpha": 2})
    train_steps(model, session, x)
    first = session.extract()
    train_steps(model, session, x)  # the session keeps training; the first extract is a snapshot
    second = session.extract()
    assert not torch.equal(first.tensor("0.lora_B"), second.tensor("0.lora_B"))
    assert first.tensor("0.lora_B").shape == (6, 2, 1, 1)
    with torch.no_grad():
        trained = model(x)
    session.remove()
    af.attach(model, second)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained, atol=1e-6, rtol=1e-6)


def test_train_config_is_checked() -> None:
    with pytest.raises(af.FormatError, match="r"):
        LORA.train(build_tiny(), config={"target_modules": ["q_proj"], "r": 0})
    with pytest.raises(af.AdapterError, match="target_modules"):
        LORA.train(build_tiny(), config={"r": 2})


def test_training_needs_no_transformers() -> None:
    code = ("import sys, torch, adapterfmt as af\n"
            "from adapterfmt.tiny import build_tiny\n"
            "m = build_tiny()\n"
            "for name in ('lora', 'dora', 'loha', 'lokr', 'vera', 'ia3'):\n"
            "    s = af.registry.get_method(name).train(m, config={'target_modules': ['q_proj', 'v_proj']})\n"
            "    m(torch.randint(0, 128, (1, 4))).sum().backward(); s.extract(); s.remove()\n"
            "assert 'transformers' not in sys.modules and 'peft' not in sys.modules, 'imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_remove_leaves_no_trace() -> None:
    model = build_tiny()
    ref = copy.deepcopy(model)
    session = af.registry.get_method("ia3").train(model, config={"target_modules": ["k_proj", "down_proj"],
                                                                 "feedforward_modules": ["down_proj"]})
    sides = {p: e["params"]["side"] for p, e in session.extract().modules.items()}
    assert sides["model.layers.0.mlp.down_proj"] == "input" and sides["model.layers.0.self_attn.k_proj"] == "output"
    session.remove()
    assert list(model.state_dict()) == list(ref.state_dict())
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(af.AdapterError, match="removed"):
        session.extract()
