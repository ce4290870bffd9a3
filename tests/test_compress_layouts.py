"""Stored compressed layouts: the ternary delta kind (bitmap / gaps) and the int8 / int4 / ternary codecs.
Round trips through real files at odd sizes and densities 0 and 1, the exact values each layout stands
for, the stored size, and refusal of corrupt data."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from torch import nn

import adapterfmt as af
from adapterfmt.format import bitpack
from adapterfmt.format.codecs import encode, get_codec
from adapterfmt.format.ternary import ternary_decode, ternary_encode, top_k_mask

SHAPES = [(1,), (3, 5), (7, 13), (2, 3, 4), (1, 257)]
DENSITIES = [0.0, 0.05, 0.5, 1.0]


def ramp(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def expected_ternary(t: torch.Tensor, keep: torch.Tensor, group_size: int | None, rule: str) -> torch.Tensor:
    """The dense tensor a ternary encoding must stand for, computed element by element."""
    flat, n = t.reshape(-1).double(), t.numel()
    g = group_size or max(n, 1)
    out = torch.zeros(n, dtype=torch.float64)
    for start in range(0, n, g):
        sl = slice(start, min(start + g, n))
        kept = keep[sl]
        if rule == "mean":
            s = flat[sl][kept].abs().mean() if kept.any() else 0.0
        else:
            s = 2.0 * flat[sl].std() if flat[sl].numel() > 1 else 0.0
        out[sl] = torch.where(kept, torch.sign(flat[sl]) * s, torch.zeros(()))
    return out.reshape(t.shape)


def data_region_bytes(path) -> int:
    """Bytes of tensor data in a safetensors file: its size less the 8-byte length and the header."""
    raw = open(path, "rb").read(8)
    return path.stat().st_size - 8 - struct.unpack("<Q", raw)[0]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("layout", ["bitmap", "gaps"])
def test_ternary_layouts_round_trip_at_odd_sizes_and_densities(shape, density, layout):
    t = ramp(*shape, seed=len(shape))
    keep = top_k_mask(t, math.ceil(density * t.numel()))
    assert int(keep.sum()) == math.ceil(density * t.numel())
    for group_size, rule in [(None, "mean"), (4, "mean"), (3, "std")]:
        parts, params = ternary_encode(t, keep, scale=rule, factor=2.0, group_size=group_size, layout=layout)
        assert params["layout"] == layout and params["count"] == int(keep.sum())
        got = ternary_decode(parts, params, shape)
        assert torch.allclose(got.double(), expected_ternary(t, keep, group_size, rule), atol=1e-6)
        k, n = params["count"], t.numel()
        assert parts["signs"].numel() == (k + 7) // 8
        assert parts[{"bitmap": "mask", "gaps": "gaps"}[layout]].numel() == (
            (n + 7) // 8 if layout == "bitmap" else bitpack.gaps_size(keep.nonzero().flatten()))


@pytest.mark.parametrize("density", [0.0, 0.01, 0.1, 0.2, 1.0])
def test_the_automatic_layout_is_the_smaller_one(density):
    t = ramp(50, 40, seed=3)
    keep = top_k_mask(t, math.ceil(density * t.numel()))
    sizes = {lay: ternary_encode(t, keep, layout=lay)[0][{"bitmap": "mask", "gaps": "gaps"}[lay]].numel()
             for lay in ("bitmap", "gaps")}
    parts, params = ternary_encode(t, keep)
    assert sizes[params["layout"]] == min(sizes.values())


def ternary_adapter(shape=(6, 11), density=0.3, **options) -> tuple[af.Adapter, torch.Tensor]:
    t = ramp(*shape, seed=7)
    parts, params = ternary_encode(t, top_k_mask(t, math.ceil(density * t.numel())), **options)
    entry = {"kind": "ternary", "shape": list(shape), "params": {**params, "scale": 0.5}}
    adapter = af.Adapter(af.new_manifest("task_vector", {"lin": entry}), {f"lin.{r}": v for r, v in parts.items()})
    return adapter, 0.5 * ternary_decode(parts, params, shape)


@pytest.mark.parametrize("density", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("layout", ["bitmap", "gaps"])
def test_a_ternary_adapter_file_round_trips_and_its_size_is_the_stored_parts(tmp_path, density, layout):
    adapter, dw = ternary_adapter(density=density, layout=layout, group_size=5)
    path = af.save(adapter, tmp_path / "t.safetensors")
    loaded = af.validate(path)
    assert loaded.modules["lin"]["params"]["layout"] == layout
    kind = af.registry.get_kind("ternary")
    assert torch.equal(kind.delta(loaded.modules["lin"], loaded.module_tensors("lin")), dw)
    n, k = 66, math.ceil(density * 66)
    where = (n + 7) // 8 if layout == "bitmap" else loaded.shape("lin.gaps")[0]
    assert loaded.nbytes() == data_region_bytes(path) == where + (k + 7) // 8 + 4 * math.ceil(n / 5)


@pytest.mark.parametrize(("group_size", "packed"), [(None, True), (11, True), (5, False)])
def test_the_ternary_kind_applies_merges_and_unmerges_like_its_dense_delta(group_size, packed):
    adapter, dw = ternary_adapter(density=0.2, group_size=group_size)
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(11, 6))
    x = ramp(3, 11, seed=9)
    with torch.no_grad():
        ref = model(x) + x @ dw.t()
        w0 = model.lin.weight.clone()
        af.attach(model, adapter, name="t")
        bound = model.__dict__["_adapterfmt_state"].slots["lin"].bound["t"].tensors
        assert ("pos" in bound) is packed  # per-tensor / per-row scales: the packed kernel path
        assert torch.allclose(model(x), ref, atol=1e-5)
        af.merge_into(model, "t")
        assert torch.allclose(model.lin.weight, w0 + dw, atol=1e-6)
        af.detach(model)
        assert torch.allclose(model.lin.weight, w0, atol=1e-6)


def test_a_ternary_kind_on_a_transposed_layer_uses_the_stored_layout():
    t = ramp(10, 4, seed=2)  # nn.Embedding(10, 4) stores its weight [vocab, dim]
    parts, params = ternary_encode(t, top_k_mask(t, 12))
    entry = {"kind": "ternary", "shape": [10, 4], "params": params}
    adapter = af.Adapter(af.new_manifest("task_vector", {"emb": entry}), {f"emb.{r}": v for r, v in parts.items()})
    model = nn.Sequential()
    model.add_module("emb", nn.Embedding(10, 4))
    ids = torch.tensor([[0, 3, 9]])
    with torch.no_grad():
        ref = nn.functional.embedding(ids, model.emb.weight + ternary_decode(parts, params, (10, 4)))
        af.attach(model, adapter)
        assert torch.allclose(model(ids), ref, atol=1e-6)


@pytest.mark.parametrize("corrupt", ["popcount", "padding", "scales", "gaps"])
def test_validation_refuses_corrupt_ternary_data(tmp_path, corrupt):
    layout = "gaps" if corrupt == "gaps" else "bitmap"
    adapter, _ = ternary_adapter(density=0.3, layout=layout)
    t = adapter.tensors()
    if corrupt == "popcount":
        t["lin.mask"][0] ^= 0b1  # one more or one fewer kept element than params.count
    elif corrupt == "padding":
        t["lin.mask"][-1] |= 0x80  # 66 bits: bits 66..71 of the last byte are padding
    elif corrupt == "scales":
        t["lin.scales"] = torch.zeros(2)
    else:
        t["lin.gaps"][-1] = 0xFF  # the last varint never ends
    bad = af.Adapter(adapter.manifest, t)
    with pytest.raises(af.FormatError, match="module 'lin'"):
        af.validate(af.load(af.save(bad, tmp_path / "bad")))


# ----- codecs -------------------------------------------------------------------------------------------
CODEC_CASES = [("int8", {}), ("int4", {"group_size": 5}), ("int4", {}), ("ternary", {"density": 0.0}),
               ("ternary", {"density": 0.37}), ("ternary", {"density": 1.0, "group_size": 3})]


@pytest.mark.parametrize("shape", [(1,), (3, 5), (7, 13), (4, 3, 2, 2)])
@pytest.mark.parametrize(("codec", "options"), CODEC_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_codecs_round_trip_through_a_file_with_bounded_error(tmp_path, shape, codec, options, dtype):
    t = ramp(*shape, seed=1).to(dtype)
    parts, spec = encode(codec, t, **options)
    entry = {"kind": "dense", "shape": list(shape), "params": {"mode": "add"}, "encoding": {"delta": spec}}
    adapter = af.Adapter(af.new_manifest("task_vector", {"m": entry}), {f"m.delta.{p}": v for p, v in parts.items()})
    path = af.save(adapter, tmp_path / "c.safetensors")
    loaded = af.validate(path)
    got = loaded.module_tensors("m")["delta"]
    assert got.dtype == dtype and got.shape == t.shape
    assert torch.equal(got, get_codec(codec).decode(parts, spec))
    assert loaded.nbytes() == data_region_bytes(path) == sum(p.numel() * p.element_size() for p in parts.values())
    x = t.float()
    if codec == "int8":
        rows = x.reshape(shape[0] if len(shape) > 1 else 1, -1)
        bound = (rows.abs().amax(1, keepdim=True) / 127 / 2).expand_as(rows).reshape(shape)
    elif codec == "int4":
        g = options.get("group_size", 64)
        flat = torch.cat([x.reshape(-1), x.new_zeros((-x.numel()) % g)]).reshape(-1, g)
        bound = (flat.abs().amax(1, keepdim=True) / 7 / 2 * 1.01).expand_as(flat).reshape(-1)[: x.numel()].reshape(shape)
    else:
        keep = top_k_mask(t, math.ceil(options["density"] * t.numel()))
        assert torch.allclose(got.double(), expected_ternary(t, keep, options.get("group_size"), "mean"),
                              atol=1e-3 if dtype == torch.float16 else 1e-6)
        return
    tol = 1e-3 if dtype == torch.float16 else 1e-6
    assert bool(((got.float() - x).abs() <= bound + tol).all())


def test_int4_stores_half_a_byte_per_value_plus_group_scales():
    parts, spec = encode("int4", ramp(33, 7), group_size=16)
    assert parts["q"].numel() == 116 and parts["scale"].numel() == math.ceil(231 / 16)
    assert parts["scale"].dtype == torch.float16 and spec["group_size"] == 16


def test_an_unknown_codec_is_a_clear_format_error(tmp_path):
    entry = {"kind": "dense", "shape": [2], "params": {"mode": "add"}, "encoding": {"delta": {"codec": "zstd9"}}}
    adapter = af.Adapter(af.new_manifest("task_vector", {"m": entry}), {"m.delta.x": torch.zeros(2)})
    with pytest.raises(af.FormatError, match="unknown compression codec 'zstd9'"):
        af.validate(af.load(af.save(adapter, tmp_path / "u")))


class HalfCodec:
    """A third-party codec: stores a tensor as bfloat16 (one part)."""

    name = "test_bf16"

    def encode(self, tensor, **options):
        return {"v": tensor.to(torch.bfloat16)}, {"shape": list(tensor.shape)}

    def decode(self, parts, spec):
        return parts["v"].float().reshape(spec["shape"])

    def parts(self, spec):
        return ("v",)


class CodecPlugin:
    @af.hookimpl
    def adapterfmt_codecs(self):
        return [HalfCodec()]


def test_a_third_party_codec_plugs_in_through_the_hook(tmp_path):
    af.registry.reset()
    try:
        af.registry.plugin_manager().register(CodecPlugin(), name="test_codec_plugin")
        assert isinstance(get_codec("test_bf16"), af.TensorCodec)
        t = ramp(4, 4)
        parts, spec = encode("test_bf16", t)
        entry = {"kind": "dense", "shape": [4, 4], "params": {"mode": "add"}, "encoding": {"delta": spec}}
        adapter = af.Adapter(af.new_manifest("task_vector", {"m": entry}), {f"m.delta.{p}": v for p, v in parts.items()})
        loaded = af.validate(af.save(adapter, tmp_path / "p"))
        assert torch.equal(loaded.module_tensors("m")["delta"], t.to(torch.bfloat16).float())
    finally:
        af.registry.reset()
