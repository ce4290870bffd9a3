"""The apply verbs of the lowrank, sparse, block and ternary kinds go through the kernel dispatcher: forcing the
Triton backend (the interpreter on the CPU) gives the same model outputs as the torch path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterfmt as af
from adapterfmt.verbs.compress import compress_adapter


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(33, 17), nn.GELU(), nn.Linear(17, 9))


def _lora(seed: int, r: int) -> af.Adapter:
    g = torch.Generator().manual_seed(seed)
    modules = {"0": af.lowrank_entry([17, 33], 0.7 + seed), "2": af.lowrank_entry([9, 17], 1.3)}
    tensors = {"0.lora_A": torch.randn(r, 33, generator=g), "0.lora_B": torch.randn(17, r, generator=g),
               "2.lora_A": torch.randn(r, 17, generator=g), "2.lora_B": torch.randn(9, r, generator=g)}
    return af.Adapter(af.new_manifest("lora", modules), tensors)


def _outputs(monkeypatch: pytest.MonkeyPatch, backend: str, model: nn.Module, x: torch.Tensor,
             rows: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
    monkeypatch.setenv("ADAPTERFMT_KERNELS", backend)
    with torch.no_grad():
        af.activate(model, "a")
        single = model(x)
        with af.adapter_ids(model, rows):
            mixed = model(x)
    return single, mixed


def test_lowrank_single_and_mixed_batch_match_across_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    af.attach(model, _lora(0, 4), name="a")
    af.attach(model, _lora(1, 2), name="b", activate=False)
    x = torch.randn(5, 3, 33, generator=torch.Generator().manual_seed(9))
    rows = ["a", None, "b", "b", "a"]
    t_single, t_mixed = _outputs(monkeypatch, "torch", model, x, rows)
    k_single, k_mixed = _outputs(monkeypatch, "triton", model, x, rows)
    torch.testing.assert_close(k_single, t_single, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(k_mixed, t_mixed, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(t_mixed[1], t_mixed[0])


def test_sparse_and_ternary_kinds_match_across_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    dense = _lora(2, 3)
    sparse = compress_adapter(dense, steps=[{"method": "compeft", "density": 0.2, "target": "delta"}])
    assert {e["kind"] for e in sparse.modules.values()} == {"ternary"}
    g = torch.Generator().manual_seed(4)
    idx = torch.randperm(17 * 33, generator=g)[:40].sort().values
    sp = af.Adapter(af.new_manifest("sparse_ft", {"0": {"kind": "sparse", "shape": [17, 33], "params": {}}}),
                    {"0.indices": idx, "0.values": torch.randn(40, generator=g)})
    x = torch.randn(4, 33, generator=g)
    for adapter in (sparse, sp):
        af.attach(model, adapter, name="a")
        t_out, _ = _outputs(monkeypatch, "torch", model, x, ["a"] * 4)
        k_out, _ = _outputs(monkeypatch, "triton", model, x, ["a"] * 4)
        af.detach(model)
        torch.testing.assert_close(k_out, t_out, atol=1e-4, rtol=1e-5)
        assert not torch.allclose(t_out, model(x))


@pytest.mark.parametrize("axis", ["rows", "columns"])
def test_block_kind_matches_across_backends_and_its_dense_delta(monkeypatch: pytest.MonkeyPatch, axis: str) -> None:
    model = _model()
    g = torch.Generator().manual_seed(5)
    idx = torch.tensor([0, 3, 7, 16]) if axis == "rows" else torch.tensor([1, 2, 20, 32])
    block = torch.randn((4, 33) if axis == "rows" else (17, 4), generator=g)
    entry = {"kind": "block", "shape": [17, 33], "params": {"axis": axis, "scale": 0.5}}
    ad = af.Adapter(af.new_manifest("s2ft", {"0": entry}), {"0.indices": idx, "0.block": block})
    x = torch.randn(4, 33, generator=g)
    with torch.no_grad():
        delta = af.registry.get_kind("block").delta(entry, {"indices": idx, "block": block})
        ref = model[2](model[1](x @ (model[0].weight + delta).t() + model[0].bias))
    af.attach(model, ad, name="a")
    t_out, _ = _outputs(monkeypatch, "torch", model, x, ["a"] * 4)
    k_out, _ = _outputs(monkeypatch, "triton", model, x, ["a"] * 4)
    torch.testing.assert_close(t_out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_out, t_out, atol=1e-4, rtol=1e-5)
    af.detach(model)
    assert not torch.allclose(t_out, model(x), atol=1e-3)
