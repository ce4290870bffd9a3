"""LoFiT offsets (all channels, chosen heads), and task vectors / PortLLM patches (extract, task arithmetic)."""

from __future__ import annotations

import pytest
import torch

import adapterfmt as af
from adapterfmt.tiny import build_tiny, save_tiny

from helpers_methods import lm_loss, lm_task, one_thread, train  # noqa: F401 (fixture)
from helpers_port import tuned_copy

pytestmark = pytest.mark.usefixtures("one_thread")
LOFIT = af.registry.get_method("lofit")


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()


def gpt2_loss(model, batch) -> torch.Tensor:
    return lm_loss(lambda x: model(x).logits, batch)


def test_offsets_on_every_channel_train_and_reload(tmp_path) -> None:
    model = build_tiny(seed=0)
    batch = lm_task(rows=8)
    session = LOFIT.train(model, config={"target_modules": ["o_proj", "down_proj"]})
    start, end = train(lambda: lm_loss(model, batch), session.parameters(), steps=30, lr=0.05)
    assert end < 0.9 * start, (start, end)
    with torch.no_grad():
        trained = model(batch[0])
    adapter = session.extract()
    session.remove()
    entry = adapter.modules["model.layers.0.self_attn.o_proj"]
    assert entry["kind"] == "vector" and entry["params"] == {"op": "offset", "side": "output"}
    name = af.attach(model, af.validate(af.save(adapter, tmp_path / "lofit")))
    with torch.no_grad():
        torch.testing.assert_close(model(batch[0]), trained, atol=0, rtol=0)
    with pytest.raises(af.UnsupportedError, match="without a bias"):  # Llama's o_proj has no bias to merge into
        af.merge_into(model, name)


@pytest.mark.parametrize("calibrated", [True, False])
def test_heads_chosen_by_learned_scales_train_and_merge(calibrated: bool) -> None:
    model = tiny_gpt2()
    batch = lm_task(rows=8)
    cfg = {"target_modules": ["attn.c_proj"], "side": "input", "head_dim": 8, "top_k_heads": 3}
    session = LOFIT.train(model, config=cfg, **({"loss_fn": gpt2_loss, "batches": [batch] * 3} if calibrated else {}))
    heads = session.config["heads"]
    assert session.config["selection"] == ("scale" if calibrated else "random")
    assert sum(len(h) for h in heads.values()) == 3 and list(session.layers) == list(heads)
    start, end = train(lambda: gpt2_loss(model, batch), session.parameters(), steps=20, lr=0.05)
    assert end < start
    with torch.no_grad():
        trained = model(batch[0]).logits
    adapter = session.extract()
    session.remove()
    assert adapter.config["candidate_modules"] == ["attn.c_proj"]
    for path, chosen in heads.items():
        v = adapter.tensor(f"{path}.vector").reshape(4, 8)
        assert (v.abs().sum(1) > 0).nonzero().flatten().tolist() == chosen  # only chosen heads moved
    name = af.attach(model, af.validate(adapter))
    with torch.no_grad():
        torch.testing.assert_close(model(batch[0]).logits, trained, atol=1e-6, rtol=1e-6)
        af.merge_into(model, name)  # Conv1D with bias: b + W v
        torch.testing.assert_close(model(batch[0]).logits, trained, atol=1e-5, rtol=1e-5)


def test_given_heads_and_refusals() -> None:
    model = build_tiny()
    session = LOFIT.train(model, config={"target_modules": ["o_proj"], "side": "input", "head_dim": 16,
                                         "heads": {"model.layers.1.self_attn.o_proj": [2, 0]}})
    assert list(session.layers) == ["model.layers.1.self_attn.o_proj"]
    assert session.config["heads"] == {"model.layers.1.self_attn.o_proj": [0, 2]}
    session.remove()
    with pytest.raises(af.FormatError, match="head_dim"):
        LOFIT.train(model, config={"target_modules": ["o_proj"], "top_k_heads": 2})
    with pytest.raises(af.FormatError, match="no head 9"):
        LOFIT.train(model, config={"target_modules": ["o_proj"], "head_dim": 16,
                                   "heads": {"model.layers.1.self_attn.o_proj": [9]}})


# ----- task vectors and PortLLM patches: made by extract, combined by task arithmetic ----------------------
def test_task_vectors_are_not_trained_by_injection() -> None:
    for name in ("task_vector", "portllm"):
        with pytest.raises(af.UnsupportedError, match="adapter extract"):
            af.registry.verb(name, "train")(build_tiny(), config={"target_modules": ["q_proj"]})


def test_extracted_task_vectors_add_and_negate(tmp_path) -> None:
    base = build_tiny(0)
    tuned_a, _ = tuned_copy(base, seed=1)
    tuned_b, _ = tuned_copy(base, seed=2, modules=("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"))
    dirs = {n: save_tiny(m, tmp_path / n) for n, m in (("base", base), ("a", tuned_a), ("b", tuned_b))}
    tv_a, _ = af.extract_adapter(dirs["base"], dirs["a"], form="dense")
    tv_b, _ = af.extract_adapter(dirs["base"], dirs["b"], form="dense")
    assert tv_a.method == tv_b.method == "task_vector"
    tv_a = af.load(af.save(tv_a, tmp_path / "tv_a"))
    x = lm_task(rows=4)[0]
    sa, sb, s0 = tuned_a.state_dict(), tuned_b.state_dict(), base.state_dict()
    expected = build_tiny(0)
    expected.load_state_dict({k: s0[k] + 0.5 * (sa[k] - s0[k]) - (sb[k] - s0[k]) for k in s0})
    arith = af.merge_adapters([tv_a, tv_b], weights=[0.5, -1.0], strategy="linear")
    assert arith.method == "task_vector"
    af.attach(base, arith, merge=True)
    with torch.no_grad():
        torch.testing.assert_close(base(x), expected(x), atol=1e-5, rtol=1e-5)
    negated = af.merge_adapters([tv_a], weights=[-1.0])  # forgetting task a: tuned_a - tv_a == base
    af.attach(tuned_a, negated)
    with torch.no_grad():
        torch.testing.assert_close(tuned_a(x), build_tiny(0)(x), atol=1e-5, rtol=1e-5)
