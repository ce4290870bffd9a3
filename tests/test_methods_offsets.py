"""LoFiT (heads chosen by learned scales, offsets on them); task vectors / PortLLM patches (extract, arithmetic)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from adapterfmt.plugins.methods.vectors import INIT_STD, rank_heads
from helpers_methods import lm_loss, lm_task, one_thread, train  # noqa: F401 (fixture)
from helpers_port import tuned_copy

import adapterfmt as af
from adapterfmt.tiny import TinyConfig, build_tiny, save_tiny

pytestmark = pytest.mark.usefixtures("one_thread")
LOFIT = af.registry.get_method("lofit")


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()


def gpt2_loss(model, batch) -> torch.Tensor:
    return lm_loss(lambda x: model(x).logits, batch)


def o_proj(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if n.endswith(("o_proj", "attn.c_proj"))}


def test_heads_ranked_by_the_l2_norm_of_their_scales() -> None:
    # m: head 0 has |A|_1 = 2.0, |A|_2 = 1.0; head 1 has |A|_1 = |A|_2 = 1.2. L2 ranks head 1 first, L1 head 0.
    scales = {"m": torch.tensor([0.5, -0.5, 0.5, 0.5, 1.2, 0, 0, 0]), "n": torch.tensor([0.1] * 4 + [-0.9, 0.3, 0, 0])}
    assert rank_heads(scales, 4, 1) == {"m": [1]}
    assert rank_heads(scales, 4, 2) == {"m": [0, 1]}
    assert rank_heads(scales, 4, 3) == {"m": [0, 1], "n": [1]}
    # the reference's rule on a (layers x heads) grid: np.linalg.norm of each head's A, argsort descending, top k
    layers, heads, hd, k = 5, 6, 4, 7
    a = torch.randn(layers, heads * hd, generator=torch.Generator().manual_seed(0)) ** 3
    norms = np.array([[np.linalg.norm(a[i, j * hd:(j + 1) * hd].numpy()) for j in range(heads)] for i in range(layers)])
    want: dict[str, list[int]] = {}
    for t in sorted(np.argsort(norms.flatten())[::-1][:k]):
        want.setdefault(f"layer{t // heads}", []).append(int(t % heads))
    assert rank_heads({f"layer{i}": a[i] for i in range(layers)}, hd, k) == want


def test_initial_scales_and_offsets_are_small_gaussians() -> None:
    model = build_tiny(0, TinyConfig(hidden=256, heads=8, layers=4))
    ids = lm_task(rows=2)[0]
    # a loss without gradient: AdamW leaves A exactly where it started
    scales = LOFIT.head_scales(model, o_proj(model), loss_fn=lambda m, b: 0 * m(b).sum(), batches=[ids], l1=0.0,
                               lr=0.1, generator=torch.Generator().manual_seed(3))
    a = torch.cat(list(scales.values()))
    assert a.numel() == 4 * 256 and abs(float(a.mean())) < 4 * INIT_STD / a.numel() ** 0.5
    assert 0.9 < float(a.std()) / INIT_STD < 1.1
    assert not any(n.endswith("adapterfmt_delta") for n, _ in model.named_modules())  # step 1 leaves no trace

    cfg = {"target_modules": ["o_proj"], "head_dim": 32, "selection": "random", "seed": 5, "top_k_heads": 12}
    session = LOFIT.train(model, config=cfg)
    chosen = session.config["heads"]
    v = torch.cat([session.layers[p].weights.vector.detach().reshape(-1, 32)[h] for p, h in chosen.items()])
    assert v.numel() == 12 * 32 and abs(float(v.mean())) < 4 * INIT_STD / v.numel() ** 0.5
    assert 0.85 < float(v.std()) / INIT_STD < 1.15
    for path, layer in session.layers.items():  # every other channel is exactly 0
        rest = [h for h in range(8) if h not in chosen[path]]
        assert not layer.weights.vector.detach().reshape(8, 32)[rest].any()
    again = session.extract()
    session.remove()
    same = LOFIT.train(model, config=cfg)
    assert same.config["heads"] == chosen
    assert all(torch.equal(same.extract().tensor(n), again.tensor(n)) for n in again.tensor_names())
    same.remove()
    other = LOFIT.train(model, config={**cfg, "seed": 6})
    assert other.config["heads"] != chosen
    other.remove()


@pytest.mark.parametrize(("config", "options", "message"), [
    ({"head_dim": 16}, {}, r"calibration data: pass train\(\.\.\., loss_fn=, batches=\)"),
    ({"selection": "random"}, {}, r"needs head_dim .* no num_attention_heads"),
    ({"head_dim": 24, "selection": "random"}, {}, "64 input channels, not a whole number of heads"),
    ({"head_dim": 16, "selection": "random", "top_k_heads": 9}, {}, "top_k_heads is 9; .* 8 heads"),
    ({"head_dim": 16, "selection": "random", "l1": 0.1}, {}, "l1 has no use with selection 'random'"),
    ({"head_dim": 16, "heads": {"model.layers.0.self_attn.o_proj": [0]}, "top_k_heads": 1}, {},
     "top_k_heads has no use"),
    ({"head_dim": 16, "heads": {"model.layers.0.self_attn.o_proj": [0]}, "selection": "random"}, {},
     "heads go with selection 'given' only"),
    ({"head_dim": 16, "selection": "given"}, {}, "heads go with selection 'given' only"),
    ({"head_dim": 16, "heads": {"model.layers.0.self_attn.q_proj": [0]}}, {}, "q_proj', which target_modules"),
    ({"head_dim": 16, "heads": {"model.layers.1.self_attn.o_proj": [9]}}, {}, "has 4 heads; no head 9"),
    ({"head_dim": 16, "side": "output"}, {}, "unknown key"),
    ({"head_dim": 16, "selection": "random"}, {"epochs": 3}, "no option"),
])
def test_refusals_name_what_is_missing(config, options, message) -> None:
    model = build_tiny()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(af.FormatError, match=message) as err:
        LOFIT.train(model, config={"target_modules": ["o_proj"], **config}, **options)
    assert "\n" not in str(err.value)
    assert not any(n.endswith("adapterfmt_delta") for n, _ in model.named_modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())


def test_given_heads_in_module_order_and_no_merge_without_a_bias() -> None:
    model = build_tiny()
    session = LOFIT.train(model, config={"target_modules": ["o_proj"], "head_dim": 16,
                                         "heads": {"model.layers.1.self_attn.o_proj": [2, 0, 2],
                                                   "model.layers.0.self_attn.o_proj": [3]}})
    assert session.config["selection"] == "given"
    assert session.config["heads"] == {"model.layers.0.self_attn.o_proj": [3],
                                       "model.layers.1.self_attn.o_proj": [0, 2]}
    assert list(session.layers) == list(session.config["heads"])
    adapter = session.extract()
    session.remove()
    name = af.attach(model, adapter)
    with pytest.raises(af.UnsupportedError, match="without a bias"):  # Llama's o_proj has no bias to merge into
        af.merge_into(model, name)


def test_two_steps_on_a_tiny_gpt2_then_apply_and_merge_exactly(tmp_path) -> None:
    model = tiny_gpt2()  # 2 layers x 4 heads of 8 channels
    base = copy.deepcopy(model)
    batch = lm_task(rows=8)
    session = LOFIT.train(model, config={"target_modules": ["attn.c_proj"], "top_k_heads": 3},
                          loss_fn=gpt2_loss, batches=[batch] * 5)
    cfg, heads = session.config, session.config["heads"]
    assert cfg["selection"] == "scale" and cfg["head_dim"] == 8  # from GPT-2's config
    assert sum(len(h) for h in heads.values()) == 3 and list(session.layers) == list(heads)
    # step 1 chose the top 3 heads by the L2 norm of the scales it learned (same seed, same data)
    scales = LOFIT.head_scales(base, o_proj(base), loss_fn=gpt2_loss, batches=[batch] * 5, l1=cfg["l1"],
                               lr=cfg["selection_lr"], generator=torch.Generator().manual_seed(0))
    assert rank_heads(scales, 8, 3) == heads
    start, end = train(lambda: gpt2_loss(model, batch), session.parameters(), steps=40, lr=0.1)
    assert end < start - 0.07, (start, end)  # 3 of 8 heads' offsets: about -0.1 in 40 steps
    x = batch[0]
    with torch.no_grad():
        trained = model(x).logits
    adapter = af.load(af.save(session.extract(), tmp_path / "lofit"))
    session.remove()
    assert set(adapter.modules) == set(heads)
    offsets = {p: adapter.tensor(f"{p}.vector") for p in heads}
    for path, v in offsets.items():  # only the chosen heads carry offsets
        assert v.reshape(4, 8).any(1).nonzero().flatten().tolist() == heads[path]
    # the dense reference, written as the reference code does it: v added to the attention output, c_proj's input
    handles = [base.get_submodule(p).register_forward_pre_hook(lambda m, a, v=v: (a[0] + v,))
               for p, v in offsets.items()]
    with torch.no_grad():
        want = base(x).logits
    for h in handles:
        h.remove()
    torch.testing.assert_close(trained, want, atol=1e-6, rtol=1e-6)
    name = af.attach(model, af.validate(adapter))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, want, atol=1e-6, rtol=1e-6)
        af.merge_into(model, name)  # Conv1D with bias: b + W v
        torch.testing.assert_close(model(x).logits, want, atol=1e-5, rtol=1e-5)
    for path, v in offsets.items():
        conv = base.get_submodule(path)  # Conv1D stores W as [in, out]
        want_bias = conv.bias.double() + v.double() @ conv.weight.double()
        torch.testing.assert_close(model.get_submodule(path).bias.double(), want_bias, atol=1e-6, rtol=0)


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
