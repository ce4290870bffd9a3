"""EPT (method ``ept``): trained through its prompt fusion and multi-space projection, stored exactly as the
DePT adapter it computes (kind ``dept``); the stored prompt is the plugin docstring's formula recomputed in
numpy from the trained parameters; strict config; what a checkpoint saves besides the adapter; the conformance kit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import adapterfmt as af
from adapterfmt.authoring.conformance import check_method
from adapterfmt.tiny import TinyConfig, build_tiny

CONFIG = {"num_virtual_tokens": 3, "r": 2, "max_length": 8, "num_spaces": 3, "space_rank": 2}


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ept_prompt(w: dict[str, np.ndarray], scale: float) -> np.ndarray:
    """The docstring: K = V = concat(P, scale A B); F = P + softmax(P K^T / sqrt(d)) V;
    g = softmax(mean_rows(F) G); E = F + sum_k g_k F U_k W_k."""
    p = w["prompt"]
    kv = np.concatenate([p, scale * w["offset_A"] @ w["offset_B"]])
    f = p + softmax(p @ kv.T / np.sqrt(p.shape[1])) @ kv
    g = softmax(f.mean(0) @ w["gate"])
    return f + sum(g[k] * f @ w["space_U"][k] @ w["space_W"][k] for k in range(len(g)))


def test_ept_trains_and_stores_the_dept_adapter_it_computes(tmp_path):
    model = build_tiny(0, TinyConfig(vocab_size=32, hidden=16, layers=1, heads=2, intermediate=32))
    ids = torch.randint(0, 32, (4, 6), generator=torch.Generator().manual_seed(0))
    session = af.registry.get_method("ept").train(model, config=CONFIG)
    opt = torch.optim.AdamW(session.parameters(), lr=5e-2)
    for _ in range(5):  # moves every parameter off its init (W and the gate start at zero)
        loss = torch.nn.functional.cross_entropy(model(ids)[:, -6:].reshape(-1, 32), ids.roll(-1, 1).reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not session.has_schedule  # a checkpoint saves the reparameterisation (TrainSession.unstored)
    assert {role for role, _ in session.unstored(next(iter(session.layers.values())))} == {
        "prompt", "space_U", "space_W", "gate"}
    (layer,) = session.layers.values()
    w = {role: p.detach().double().numpy() for role, p in layer.weights.items()}
    assert np.abs(w["space_W"]).min() > 0 and np.abs(w["gate"]).max() > 0
    with torch.no_grad():
        live = model(ids)
    adapter = session.extract()
    session.remove()
    ((path, entry),) = adapter.modules.items()
    assert entry["kind"] == "dept" and set(adapter.roles(path)) == {"embeddings", "offset_A", "offset_B"}
    stored = adapter.tensor(f"{path}.embeddings").double().numpy()
    assert np.abs(stored - ept_prompt(w, entry["params"]["scale"])).max() < 1e-5
    assert np.abs(stored - w["prompt"]).max() > 1e-3  # fusion and projection changed the short prompt
    af.save(adapter, tmp_path / "ept.safetensors")
    af.attach(model, af.load(tmp_path / "ept.safetensors"))
    with torch.no_grad():
        assert torch.equal(model(ids), live)


def test_ept_config_is_strict():
    model = build_tiny(0, TinyConfig(vocab_size=32, hidden=16, layers=1, heads=2, intermediate=32))
    with pytest.raises(af.AdapterError, match="unknown key.*'num_space'.*num_spaces"):
        af.registry.get_method("ept").train(model, config={"num_space": 2})


def test_ept_conformance():
    report = check_method("ept", train_config=CONFIG)
    assert report.by_status("fail") == {}, report.to_dict()
    assert set(report.by_status("skip")) == {"per_row_ids", "merge_verb", "merge_equals_unmerged", "unmerge_restores"}
