"""Sparse fine-tuning (sparse_ft, structured_ft): mask selection, training, reload, merge, composition."""

from __future__ import annotations

import pytest
import torch
from helpers_methods import lm_loss, lm_task, one_thread, train  # noqa: F401 (fixture)
from torch import nn

import adapterfmt as af
from adapterfmt.tiny import build_tiny

pytestmark = pytest.mark.usefixtures("one_thread")
SPARSE = af.registry.get_method("sparse_ft")
STRUCTURED = af.registry.get_method("structured_ft")
MLP = ["gate_proj", "up_proj", "down_proj"]


def test_gradient_selected_mask_trains_reloads_and_merges(tmp_path) -> None:
    model = build_tiny(seed=0)
    batch = lm_task()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    session = SPARSE.train(model, config={"target_modules": MLP + ["o_proj"], "density": 0.05},
                           loss_fn=lm_loss, batches=[batch, lm_task(seed=0, rows=8)])
    assert all(p.grad is None for p in model.parameters())  # calibration left no gradients behind
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{m}.adapterfmt_delta.weights.values" for m in session.layers}
    start, end = train(lambda: lm_loss(model, batch), session.parameters(), steps=30, lr=0.05)
    assert end < 0.7 * start, (start, end)
    with torch.no_grad():
        trained = model(batch[0])
    adapter = session.extract()
    session.remove()
    assert adapter.config["selection"] == "gradient" and adapter.config["calibration_batches"] == 2
    SPARSE.check_config(adapter.config)  # what it records, its own schema accepts
    for m, entry in adapter.modules.items():
        n = adapter.tensor(f"{m}.indices").numel()
        assert entry["kind"] == "sparse" and n == round(0.05 * torch.Size(entry["shape"]).numel())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    loaded = af.validate(af.save(adapter, tmp_path / "sparse.safetensors"))
    af.attach(model, loaded)
    with torch.no_grad():
        torch.testing.assert_close(model(batch[0]), trained, atol=1e-5, rtol=1e-5)  # CSR kernel path vs dense
        af.merge_into(model, af.attached(model)[0])
        torch.testing.assert_close(model(batch[0]), trained, atol=1e-5, rtol=1e-5)


def test_gradient_selection_is_top_k_of_the_accumulated_gradient() -> None:
    model = build_tiny(seed=1)
    batches = [lm_task(seed=3, rows=4), lm_task(seed=4, rows=4)]
    up = model.model.layers[0].mlp.up_proj.weight
    up.requires_grad_(True)
    for b in batches:
        lm_loss(model, b).backward()
    expected = up.grad.abs().reshape(-1).topk(7).indices.sort().values
    up.grad = None
    session = SPARSE.train(model, config={"target_modules": ["layers.0.mlp.up_proj"], "k": 7},
                           loss_fn=lm_loss, batches=batches)
    assert torch.equal(session.extract().tensor("model.layers.0.mlp.up_proj.indices"), expected)
    session.remove()


def test_random_selection_is_seeded_and_recorded() -> None:
    def indices(seed: int) -> torch.Tensor:
        s = SPARSE.train(build_tiny(), config={"target_modules": ["q_proj"], "k": 20, "seed": seed})
        a = s.extract()
        s.remove()
        assert a.config["selection"] == "random" and a.config["seed"] == seed
        return a.tensor("model.layers.1.self_attn.q_proj.indices")

    first = indices(5)
    assert first.numel() == 20 and bool((first[1:] > first[:-1]).all())
    assert torch.equal(first, indices(5)) and not torch.equal(first, indices(6))
    with pytest.raises(af.FormatError, match="calibration"):
        SPARSE.train(build_tiny(), config={"target_modules": ["q_proj"], "selection": "gradient"})


def function_mask(adapter: af.Adapter, module: str, transposed: bool) -> torch.Tensor:
    shape = adapter.modules[module]["shape"]
    flat = torch.zeros(torch.Size(shape).numel(), dtype=torch.bool)
    flat[adapter.tensor(f"{module}.indices")] = True
    m = flat.reshape(shape)
    return m.t() if transposed else m


@pytest.mark.parametrize("structure", ["rows", "columns", "2:4"])
def test_structured_masks_on_gpt2_conv1d_and_linear(structure: str) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16)).eval()
    x = torch.randint(0, 64, (2, 6))
    cfg = {"target_modules": ["c_attn", "c_fc"], "structure": structure, "k": 3}
    session = STRUCTURED.train(model, config=cfg, loss_fn=lambda m, b: m(b).logits.square().mean(), batches=[x])
    start, end = train(lambda: model(x).logits.square().mean(), session.parameters(), steps=5, lr=0.05)
    assert end < start
    with torch.no_grad():
        trained = model(x).logits
    adapter = session.extract()
    session.remove()
    for path in adapter.modules:  # Conv1D stores [in, out]: the structure is on the function layout
        f = function_mask(adapter, path, transposed=True)
        if structure == "rows":
            assert f.all(1).sum() == 3 and f.sum() == 3 * f.shape[1]
        elif structure == "columns":
            assert f.all(0).sum() == 3 and f.sum() == 3 * f.shape[0]
        else:
            assert bool((f.reshape(f.shape[0], -1, 4).sum(2) == 2).all())
    af.attach(model, af.validate(adapter))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, trained, atol=1e-5, rtol=1e-5)


def test_sparse_ft_on_embedding_and_n_m_refusal() -> None:
    model = build_tiny(seed=2)
    batch = lm_task(seed=1)
    session = SPARSE.train(model, config={"target_modules": ["embed_tokens"], "density": 0.1})
    start, end = train(lambda: lm_loss(model, batch), session.parameters(), steps=15, lr=0.1)
    assert end < start
    with torch.no_grad():
        trained = model(batch[0])
    adapter = session.extract()
    session.remove()
    af.attach(model, adapter)
    with torch.no_grad():
        torch.testing.assert_close(model(batch[0]), trained, atol=1e-5, rtol=1e-5)
    with pytest.raises(af.FormatError, match="3:5"):
        STRUCTURED.train(build_tiny(), config={"target_modules": ["q_proj"], "structure": "3:5"})


def sparse_adapter(model: nn.Module, seed: int) -> af.Adapter:
    session = SPARSE.train(model, config={"target_modules": ["up_proj", "o_proj"], "density": 0.1, "seed": seed})
    with torch.no_grad():
        for p in session.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    adapter = session.extract()
    session.remove()
    return adapter


def test_composed_masks_are_the_union_with_overlaps_summed() -> None:
    model = build_tiny(seed=0)
    a, b = sparse_adapter(model, 1), sparse_adapter(model, 2)
    merged = af.merge_adapters([a, b], strategy="linear")
    x = lm_task(rows=4)[0]
    for m in a.modules:
        assert merged.modules[m]["kind"] == "sparse" and merged.method == "sparse_ft"
        ia, ib = a.tensor(f"{m}.indices"), b.tensor(f"{m}.indices")
        union = torch.unique(torch.cat([ia, ib]))
        assert len(union) < len(ia) + len(ib)  # the masks overlap
        assert torch.equal(merged.tensor(f"{m}.indices"), union)
        dense = torch.zeros(union.max() + 1)
        dense.index_add_(0, ia, a.tensor(f"{m}.values")).index_add_(0, ib, b.tensor(f"{m}.values"))
        torch.testing.assert_close(merged.tensor(f"{m}.values"), dense[union])
    af.attach(model, a, name="a")
    af.attach(model, b, name="b")
    with torch.no_grad():
        both = model(x)
        af.detach(model, "a")
        af.detach(model, "b")
        af.attach(model, merged)
        torch.testing.assert_close(model(x), both, atol=1e-5, rtol=1e-5)
