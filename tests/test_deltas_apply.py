"""Each core delta kind, attached unmerged and merged, against a plain reference computed by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import adapterfmt as af

TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 3e-2}


def mlp(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6)).to(dtype)


def adapter_for(kind: str, entry_params: dict, tensors: dict, shape: list[int], module: str = "0") -> af.Adapter:
    entry = {"kind": kind, "shape": shape, "params": entry_params}
    return af.Adapter(af.new_manifest("test", {module: entry}), {f"{module}.{k}": v for k, v in tensors.items()})


def reference(model: nn.Sequential, new_w: torch.Tensor | None = None, new_b: torch.Tensor | None = None,
              x: torch.Tensor | None = None) -> torch.Tensor:
    ref = copy.deepcopy(model)
    with torch.no_grad():
        if new_w is not None:
            ref[0].weight.copy_(new_w)
        if new_b is not None:
            ref[0].bias.copy_(new_b)
    return ref(x)


CASES = {
    "lowrank": lambda g: ("lowrank", {"scale": 1.5}, {"lora_A": torch.randn(3, 12, generator=g),
                                                       "lora_B": torch.randn(10, 3, generator=g)}),
    "lowrank_bias": lambda g: ("lowrank", {"scale": 0.5}, {"lora_A": torch.randn(2, 12, generator=g),
                                                           "lora_B": torch.randn(10, 2, generator=g),
                                                           "bias": torch.randn(10, generator=g)}),
    "dense": lambda g: ("dense", {"mode": "add", "scale": 2.0}, {"delta": torch.randn(10, 12, generator=g)}),
    "dense_replace": lambda g: ("dense", {"mode": "replace"}, {"value": torch.randn(10, 12, generator=g),
                                                                "bias_value": torch.randn(10, generator=g)}),
    "sparse": lambda g: ("sparse", {"scale": 0.7}, {"indices": torch.tensor([0, 5, 17, 60, 119]),
                                                     "values": torch.randn(5, generator=g)}),
    "vector_scale_out": lambda g: ("vector", {"op": "scale", "side": "output"}, {"vector": torch.rand(10, generator=g) + 0.5}),
    "vector_scale_in": lambda g: ("vector", {"op": "scale", "side": "input"}, {"vector": torch.rand(12, generator=g) + 0.5}),
    "vector_offset_out": lambda g: ("vector", {"op": "offset", "side": "output"}, {"vector": torch.randn(10, generator=g)}),
    "vector_offset_in": lambda g: ("vector", {"op": "offset", "side": "input"}, {"vector": torch.randn(12, generator=g)}),
}


def expected_weights(case: str, kind: str, params: dict, t: dict, w: torch.Tensor, b: torch.Tensor):
    if kind == "lowrank":
        nb = b + params["scale"] * t["bias"] if "bias" in t else b
        return w + params["scale"] * t["lora_B"] @ t["lora_A"], nb
    if kind == "dense":
        if params["mode"] == "replace":
            return t["value"], t["bias_value"]
        return w + params["scale"] * t["delta"], b
    if kind == "sparse":
        dw = torch.zeros(w.numel())
        dw[t["indices"]] = params["scale"] * t["values"]
        return w + dw.reshape(w.shape), b
    v = t["vector"]
    if params["op"] == "scale":
        return (w * v[:, None], b * v) if params["side"] == "output" else (w * v[None, :], b)
    return (w, b + v) if params["side"] == "output" else (w, b + w @ v)


@pytest.mark.parametrize("case", sorted(CASES))
def test_unmerged_merged_and_unmerge_match_reference(case: str) -> None:
    g = torch.Generator().manual_seed(7)
    kind, params, tensors = CASES[case](g)
    model = mlp()
    x = torch.randn(4, 12, generator=g)
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    ew, eb = expected_weights(case, kind, params, tensors, w0, b0)
    want = reference(model, ew, eb, x)
    adapter = adapter_for(kind, params, tensors, [10, 12])
    name = af.attach(model, adapter, name="a")
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
    af.merge_into(model, name)
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
    af.unmerge(model, name)
    torch.testing.assert_close(model[0].weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(model[0].bias, b0, atol=1e-6, rtol=0)
    af.detach(model)
    torch.testing.assert_close(model(x), reference(model, None, None, x))
    assert af.attached(model) == []


def test_prompt_prepends_virtual_tokens() -> None:
    emb = nn.Embedding(20, 8)
    g = torch.Generator().manual_seed(0)
    e = torch.randn(3, 8, generator=g)
    adapter = adapter_for("prompt", {"position": "prefix"}, {"embeddings": e}, [20, 8], module="emb")
    model = nn.Sequential()
    model.add_module("emb", emb)
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    plain = emb(ids)
    af.attach(model, adapter)
    out = model(ids)
    assert out.shape == (2, 7, 8)
    torch.testing.assert_close(out[:, :3], e.expand(2, 3, 8))
    torch.testing.assert_close(out[:, 3:], plain)
    with pytest.raises(af.UnsupportedError):
        af.merge_into(model, "test")


def test_switch_disable_and_per_row_ids_for_generic_kinds() -> None:
    g = torch.Generator().manual_seed(3)
    model = mlp()
    x = torch.randn(5, 12, generator=g)
    adapters = {}
    outs = {}
    for case in ("dense", "vector_scale_out", "sparse"):
        kind, params, tensors = CASES[case](g)
        adapters[case] = adapter_for(kind, params, tensors, [10, 12])
        af.attach(model, adapters[case], name=case, activate=False)
    base = model(x)
    for case in adapters:
        af.activate(model, case)
        outs[case] = model(x)
        assert not torch.allclose(outs[case], base)
    af.activate(model, None)
    torch.testing.assert_close(model(x), base)
    rows = ["dense", None, "sparse", "vector_scale_out", "dense"]
    with af.adapter_ids(model, rows):
        mixed = model(x)
    for i, r in enumerate(rows):
        torch.testing.assert_close(mixed[i], (outs[r] if r else base)[i], atol=1e-5, rtol=1e-5)


def test_attach_names_missing_modules_and_shape_mismatch() -> None:
    model = mlp()
    bad = adapter_for("dense", {"mode": "add"}, {"delta": torch.zeros(10, 12)}, [10, 12], module="7")
    with pytest.raises(af.BaseMismatchError, match="no module '7'"):
        af.attach(model, bad)
    wrong = adapter_for("dense", {"mode": "add"}, {"delta": torch.zeros(10, 13)}, [10, 13])
    with pytest.raises(af.BaseMismatchError, match=r"shape \[10, 13\]"):
        af.attach(model, wrong)
    assert af.attached(model) == []
    assert "_adapterfmt_state" not in model.__dict__, "a failed attach must leave the model untouched"
    assert not model[0]._forward_hooks


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_lowrank_other_dtypes(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    kind, params, tensors = CASES["lowrank"](g)
    model = mlp(dtype)
    x = torch.randn(4, 12, generator=g).to(dtype)
    w0 = model[0].weight.detach().clone()
    t64 = {k: v.double() for k, v in tensors.items()}
    ew, eb = expected_weights("lowrank", kind, params, t64, w0.double(), model[0].bias.detach().double())
    want = reference(model.double(), ew, eb, x.double())
    model = model.to(dtype)
    af.attach(model, adapter_for(kind, params, tensors, [10, 12]))
    torch.testing.assert_close(model(x).double(), want, atol=TOL[dtype] * 10, rtol=TOL[dtype])


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_weight_deltas_on_embedding_take_integer_ids(kind: str) -> None:
    """Integer token ids must not decide the dtype of the delta (a float delta on an int input)."""
    g = torch.Generator().manual_seed(11)
    model = nn.Sequential(nn.Embedding(9, 4))
    ids = torch.tensor([[0, 3, 8], [1, 1, 2]])
    if kind == "sparse":
        tensors = {"indices": torch.tensor([1, 6, 13, 30]), "values": torch.randn(4, generator=g) * 0.3}
        params = {"scale": 1.0}
    else:
        tensors = {"delta": torch.randn(9, 4, generator=g) * 0.3}
        params = {"mode": "add"}
    adapter = adapter_for(kind, params, tensors, [9, 4])
    af.attach(model, adapter, name="e")
    unmerged = model(ids)
    af.merge_into(model, "e")
    merged = model(ids)
    af.detach(model)
    torch.testing.assert_close(unmerged, merged, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(unmerged, model(ids))


def test_plugin_weight_kinds_on_embedding_take_integer_ids() -> None:
    """LoHa and VeRA deltas on an nn.Embedding: unmerged equals merged (integer ids never set the dtype)."""
    g = torch.Generator().manual_seed(12)
    cases = {
        "hadamard": ({"hada_w1_a": torch.randn(4, 2, generator=g), "hada_w1_b": torch.randn(2, 9, generator=g),
                      "hada_w2_a": torch.randn(4, 2, generator=g), "hada_w2_b": torch.randn(2, 9, generator=g)},
                     {"scale": 0.3, "transposed": True}),
        "vera": ({"lambda_b": torch.randn(4, generator=g), "lambda_d": torch.randn(3, generator=g),
                  "vera_A": torch.randn(3, 9, generator=g), "vera_B": torch.randn(4, 3, generator=g)},
                 {"transposed": True, "shared": {"vera_A": "vera_A", "vera_B": "vera_B"}}),
    }
    ids = torch.tensor([[0, 3, 8], [1, 1, 2]])
    for kind, (tensors, params) in cases.items():
        model = nn.Sequential(nn.Embedding(9, 4))
        shared = params.get("shared", {})
        stored = {(n if n in shared else f"0.{n}"): v for n, v in tensors.items()}
        adapter = af.Adapter(af.new_manifest("test", {"0": {"kind": kind, "shape": [9, 4], "params": params}}), stored)
        base = model(ids)
        af.attach(model, adapter, name="e")
        unmerged = model(ids)
        af.merge_into(model, "e")
        merged = model(ids)
        af.detach(model)
        torch.testing.assert_close(unmerged, merged, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(unmerged, base), kind


def test_input_offset_is_refused_on_a_convolution() -> None:
    entry = {"kind": "vector", "shape": [4, 3, 3, 3], "params": {"op": "offset", "side": "input"}}
    adapter = af.Adapter(af.new_manifest("test", {"0": entry}), {"0.vector": torch.ones(3)})
    with pytest.raises(af.FormatError, match="input-side offset is defined for linear maps"):
        af.validate(adapter)
