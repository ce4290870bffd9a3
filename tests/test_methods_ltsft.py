"""LT-SFT (method ``lt_sft``): phase 1 full fine-tuning, one global K over the model, reset, phase 2 on those
entries; ``mask_from`` an existing patch; task + language SFTs compose exactly by ``merge`` (linear)."""

from __future__ import annotations

import copy

import pytest
import torch
from adapterfmt.plugins.methods import sparse as sp
from helpers_methods import lm_loss, lm_task, one_thread, train  # noqa: F401 (fixture)

import adapterfmt as af
from adapterfmt.tiny import build_tiny

pytestmark = pytest.mark.usefixtures("one_thread")
LTSFT = af.registry.get_method("lt_sft")
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def test_global_top_k_is_the_top_k_over_all_modules_together() -> None:
    g = torch.Generator().manual_seed(0)
    diffs = {"a": torch.randn(30, 20, generator=g), "b": 3 * torch.randn(10, 5, generator=g), "c": torch.randn(7, generator=g) / 10}
    masks, threshold = sp.global_top_k(diffs, 40)
    flat = torch.cat([d.reshape(-1) for d in diffs.values()]).abs()
    want = flat.topk(40).values
    got = torch.cat([diffs[p].reshape(-1)[m] for p, m in masks.items()]).abs()
    assert torch.equal(got.sort().values, want.sort().values) and threshold == float(want.min())
    assert all(torch.equal(m, m.unique()) for m in masks.values())


def test_phase_one_picks_the_global_top_k_of_the_real_change_and_resets() -> None:
    model = build_tiny(seed=0)
    batches = [lm_task(seed=1, rows=8), lm_task(seed=2, rows=8)]
    ref = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = {"target_modules": TARGETS, "k": 500, "full_ft_steps": 3, "full_ft_lr": 1e-3}
    session = LTSFT.train(model, config=cfg, loss_fn=lm_loss, batches=batches)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # reset to theta_0
    # the reference: three AdamW steps on the whole targeted weights, then the 500 largest |change| overall
    chosen = af.select_targets(ref, cfg, supported=sp.SUPPORTED)
    for p in ref.parameters():
        p.requires_grad_(False)
    ws = [m.weight.requires_grad_(True) for m in chosen.values()]
    opt = torch.optim.AdamW(ws, lr=1e-3, weight_decay=0.0)
    for i in range(3):
        opt.zero_grad()
        lm_loss(ref, batches[i % 2]).backward()
        opt.step()
    diff = {p: (m.weight.detach() - before[f"{p}.weight"]).reshape(-1) for p, m in chosen.items()}
    flat = torch.cat(list(diff.values())).abs()
    threshold = float(flat.topk(500).values.min())
    assert sum(layer.k for layer in session.layers.values()) == 500
    for path, layer in session.layers.items():
        assert set(layer.indices.tolist()) == set((diff[path].abs() >= threshold).nonzero().reshape(-1).tolist())
    batch = batches[0]
    start, end = train(lambda: lm_loss(model, batch), session.parameters(), steps=20, lr=0.02)
    assert end < 0.8 * start
    adapter = session.extract()
    session.remove()
    assert adapter.config["threshold"] == pytest.approx(threshold) and adapter.config["full_ft_steps"] == 3


def test_mask_from_and_composition_by_merge_stays_exact(tmp_path) -> None:
    model = build_tiny(seed=0)
    lang = LTSFT.train(model, config={"target_modules": TARGETS, "density": 0.02, "full_ft_steps": 2},
                       loss_fn=lm_loss, batches=[lm_task(seed=3)])
    train(lambda: lm_loss(model, lm_task(seed=3)), lang.parameters(), steps=5, lr=0.02)
    a_lang = lang.extract()
    lang.remove()
    path = af.save(a_lang, tmp_path / "lang.safetensors")
    task = LTSFT.train(model, config={"mask_from": str(path)})
    assert {p: layer.indices.tolist() for p, layer in task.layers.items()} == {
        p: a_lang.tensor(f"{p}.indices").tolist() for p in a_lang.modules}
    train(lambda: lm_loss(model, lm_task(seed=4)), task.parameters(), steps=5, lr=0.02)
    a_task = task.extract()
    task.remove()
    merged = af.merge_adapters([a_lang, a_task])  # language + task SFT: the sum of the deltas
    ids = lm_task(seed=5)[0]
    ref = build_tiny(seed=0)
    with torch.no_grad():
        for p in set(a_lang.modules) | set(a_task.modules):
            w = ref.get_submodule(p).weight
            for a in (a_lang, a_task):
                w += af.registry.get_kind("sparse").delta(a.modules[p], a.module_tensors(p))
        want = ref(ids)
        af.attach(model, merged)
        torch.testing.assert_close(model(ids), want)
    with pytest.raises(af.FormatError, match="drop target_modules"):
        LTSFT.train(model, config={"mask_from": str(path), "target_modules": ["q_proj"]})
    with pytest.raises(af.FormatError, match="phase 1 data"):
        LTSFT.train(model, config={"target_modules": ["q_proj"]})
    lora = af.registry.get_method("lora").train(build_tiny(seed=0), config={"target_modules": ["q_proj"]})
    bad = af.save(lora.extract(), tmp_path / "lora.safetensors")
    with pytest.raises(af.FormatError, match="is 'lowrank' on 'weight', not a sparse weight entry"):
        LTSFT.train(model, config={"mask_from": str(bad)})
