"""Skill localisation by grafting (method ``grafting``): the mask update as the authors' loop written out,
the model restored, the fine-tuned weights given as a model or as an additive adapter, budget enforcement."""

from __future__ import annotations

import copy

import pytest
import torch
from adapterfmt.plugins.methods import sparse as sp
from helpers_methods import lm_loss, lm_task, one_thread  # noqa: F401 (fixture)

import adapterfmt as af
from adapterfmt.tiny import build_tiny

pytestmark = pytest.mark.usefixtures("one_thread")
GRAFT = af.registry.get_method("grafting")
TARGETS = {"target_modules": ["q_proj", "up_proj", "down_proj"]}


def _pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    model = build_tiny(seed=0)
    ft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in af.select_targets(ft, TARGETS).values():
            m.weight.add_(0.02 * torch.randn(m.weight.shape, generator=gen))
    return model, ft


def _reference(model, ft, batches, density, epochs, lr, bias=10.0):  # type: ignore[no-untyped-def]
    """The authors' loop with one flat vector over the whole region (the modules concatenated)."""
    model = copy.deepcopy(model)
    mods = af.select_targets(model, TARGETS, supported=sp.SUPPORTED)
    pre = {p: m.weight.detach().clone() for p, m in mods.items()}
    tau = torch.cat([(dict(ft.named_modules())[p].weight - pre[p]).detach().reshape(-1) for p in mods])
    k = int(density * tau.numel())
    gamma = torch.zeros_like(tau)
    gamma[tau.abs().topk(k).indices] = 1
    gen = torch.Generator().manual_seed(0)
    s = torch.cat([torch.rand(pre[p].numel(), generator=gen) for p in mods])
    for p in model.parameters():
        p.requires_grad_(False)
    for _ in range(epochs):
        m = gamma + (1 - 2 * gamma) * torch.sigmoid(s - bias)
        at = 0
        for p, mod in mods.items():
            n = pre[p].numel()
            mod.weight.data = (pre[p].reshape(-1) + m[at:at + n] * tau[at:at + n]).reshape(pre[p].shape)
            mod.weight.requires_grad_(True)
            at += n
        for b in batches:
            lm_loss(model, b).backward()
        g = torch.cat([mod.weight.grad.reshape(-1) for mod in mods.values()]) / len(batches) * lr * tau
        for mod in mods.values():
            mod.weight.grad = None
        sig = torch.sigmoid(s - bias)
        s = s - (1 - 2 * gamma) * g * sig * (1 - sig)
    return torch.round(gamma + (1 - 2 * gamma) * torch.sigmoid(s - bias)).bool(), tau, gamma.bool()


def test_graft_is_the_authors_loop_and_the_model_is_restored() -> None:
    model, ft = _pair()
    batches = [lm_task(seed=2, rows=8), lm_task(seed=3, rows=8)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = {**TARGETS, "density": 0.02, "epochs": 3, "mask_lr": 3e10}
    graft, tau, gamma = _reference(model, ft, batches, 0.02, 3, 3e10)
    session = GRAFT.train(model, config=cfg, finetuned=ft, loss_fn=lm_loss, batches=batches)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert (graft != gamma).any()  # the learning moved the mask: the test can tell a graft from the base patch
    adapter = session.extract()
    session.remove()
    got, at = [], 0
    for p, m in af.select_targets(model, TARGETS, supported=sp.SUPPORTED).items():
        n = m.weight.numel()
        want = graft[at:at + n].nonzero().reshape(-1)
        if p in adapter.modules:
            assert torch.equal(adapter.tensor(f"{p}.indices"), want)
            torch.testing.assert_close(adapter.tensor(f"{p}.values"), tau[at:at + n][want])
            got.append(want.numel())
        else:
            assert want.numel() == 0
        at += n
    assert adapter.config["graft_size"] == sum(got) == int(graft.sum())
    assert adapter.config["base_patch_size"] == int(gamma.sum())
    af.validate(adapter)


def test_base_patch_from_an_adapter_equals_the_one_from_a_model_and_budget_is_kept(tmp_path) -> None:
    model, ft = _pair()
    a = GRAFT.train(model, config={**TARGETS, "density": 0.05, "epochs": 0}, finetuned=ft)
    from_model = a.extract()
    a.remove()
    tv = af.Adapter(af.new_manifest("task_vector", {p: {"kind": "dense", "shape": list(m.weight.shape), "params": {}}
                                                    for p, m in af.select_targets(model, TARGETS).items()}),
                    {f"{p}.delta": (dict(ft.named_modules())[p].weight - m.weight).detach()
                     for p, m in af.select_targets(model, TARGETS).items()})
    path = af.save(tv, tmp_path / "tv.safetensors")
    b = GRAFT.train(model, config={**TARGETS, "density": 0.05, "epochs": 0, "finetuned_from": str(path)})
    from_file = b.extract()
    b.remove()
    assert from_model.tensor_names() == from_file.tensor_names()
    for name in from_model.tensor_names():
        torch.testing.assert_close(from_model.tensor(name), from_file.tensor(name))
    assert from_model.config["graft_size"] == from_model.config["base_patch_size"]
    learned = {**TARGETS, "density": 0.02, "epochs": 3, "mask_lr": 3e10}
    free = GRAFT.train(model, config=learned, finetuned=ft, loss_fn=lm_loss, batches=[lm_task(seed=2)])
    unconstrained = free.extract()
    free.remove()
    c = GRAFT.train(model, config={**learned, "enforce_budget": True}, finetuned=ft, loss_fn=lm_loss,
                    batches=[lm_task(seed=2)])
    budgeted = c.extract()
    c.remove()
    k, size = budgeted.config["base_patch_size"], unconstrained.config["graft_size"]
    assert budgeted.config["graft_size"] == min(k, size)
    for m in budgeted.modules:  # the budget keeps entries of the learned graft, never others
        kept = set(budgeted.tensor(f"{m}.indices").tolist())
        assert kept <= set(unconstrained.tensor(f"{m}.indices").tolist())
    with pytest.raises(af.FormatError, match="fine-tuned weights"):
        GRAFT.train(model, config=dict(TARGETS))
    with pytest.raises(af.FormatError, match="epochs > 0"):
        GRAFT.train(model, config=dict(TARGETS), finetuned=ft)
