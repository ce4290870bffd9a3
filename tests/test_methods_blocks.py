"""The ``block`` kind (spec 6.10.6) against a dense reference written from the spec text, and the methods that
store dense sub-blocks: S2FT (kind ``block``) and HFT (kind ``dense``)."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from adapterfmt.plugins.methods import blocks as bk
from helpers_methods import lm_loss, lm_task, one_thread, train  # noqa: F401 (fixture)
from torch import nn

import adapterfmt as af
from adapterfmt.tiny import build_tiny

pytestmark = pytest.mark.usefixtures("one_thread")
BLOCK = af.registry.get_kind("block")
OUT, IN = 12, 20


class Conv1D(nn.Module):
    """GPT-2's Conv1D: weight stored [in, out]."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(n_out, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def _case(axis: str, transposed: bool, seed: int = 0) -> tuple[nn.Module, dict, dict]:
    g = torch.Generator().manual_seed(seed)
    module = Conv1D(IN, OUT) if transposed else nn.Linear(IN, OUT, dtype=torch.float64)
    entry = af.module_entry("block", module, {"axis": axis, "scale": 0.5})
    n = 5
    idx = torch.sort(torch.randperm(OUT if axis == "rows" else IN, generator=g)[:n]).values
    blk = torch.randn((n, IN) if axis == "rows" else (OUT, n), generator=g, dtype=torch.float64)
    return module, entry, {"indices": idx, "block": blk}


def _spec_delta(axis: str, transposed: bool, t: dict, scale: float = 0.5) -> torch.Tensor:
    """dW written element by element from the spec text (function layout, then transposed)."""
    d = torch.zeros(OUT, IN, dtype=torch.float64)
    for j, i in enumerate(t["indices"].tolist()):
        for c in range(IN if axis == "rows" else OUT):
            if axis == "rows":
                d[i, c] = scale * t["block"][j, c]
            else:
                d[c, i] = scale * t["block"][c, j]
    return d.t() if transposed else d


CASES = [("rows", False), ("columns", False), ("rows", True), ("columns", True)]


@pytest.mark.parametrize(("axis", "transposed"), CASES)
def test_block_delta_apply_merge_unmerge_against_the_spec(axis: str, transposed: bool) -> None:
    module, entry, t = _case(axis, transposed)
    BLOCK.check("m", entry, {r: tuple(v.shape) for r, v in t.items()})
    BLOCK.check_data("m", entry, t)
    ref = _spec_delta(axis, transposed, t)
    torch.testing.assert_close(BLOCK.delta(entry, t), ref)
    x = torch.randn(3, 4, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    w = module.weight.detach().clone()
    want = x @ (w + ref) + module.bias if transposed else F.linear(x, w + ref, module.bias)
    torch.testing.assert_close(BLOCK.forward(module, entry, t, x, module(x)), want)
    BLOCK.merge(module, entry, t)
    torch.testing.assert_close(module.weight.detach(), w + ref)
    BLOCK.unmerge(module, entry, t, None)
    torch.testing.assert_close(module.weight.detach(), w)
    module.weight.requires_grad_(False)  # merge writes only the block's rows / columns
    changed = torch.zeros_like(w, dtype=torch.bool)
    BLOCK.merge(module, entry, t)
    changed |= module.weight != w
    assert not changed[ref == 0].any()


def test_block_on_an_embedding_and_through_attach_and_save(tmp_path) -> None:
    model = build_tiny(seed=0)
    emb, q = "model.embed_tokens", "model.layers.0.self_attn.q_proj"
    g = torch.Generator().manual_seed(1)
    modules = {emb: af.module_entry("block", model.get_submodule(emb), {"axis": "columns"}),  # token rows
               q: af.module_entry("block", model.get_submodule(q), {"axis": "rows", "scale": 2.0})}
    tensors = {f"{emb}.indices": torch.tensor([3, 7, 100]), f"{emb}.block": torch.randn(64, 3, generator=g),
               f"{q}.indices": torch.tensor([0, 5, 63]), f"{q}.block": torch.randn(3, 64, generator=g)}
    adapter = af.validate(af.save(af.Adapter(af.new_manifest("s2ft", modules), tensors), tmp_path / "b"))
    ids = torch.tensor([[3, 4, 7, 100, 1]])
    ref = build_tiny(seed=0)
    with torch.no_grad():
        for path in (emb, q):
            ref.get_submodule(path).weight += BLOCK.delta(modules[path], adapter.module_tensors(path))
        want = ref(ids)
        af.attach(model, adapter)
        torch.testing.assert_close(model(ids), want)
        af.merge_into(model, af.attached(model)[0])
        torch.testing.assert_close(model(ids), want)


@pytest.mark.parametrize(("params", "shapes", "data", "msg"), [
    ({"scale": 1.0}, {"indices": (2,), "block": (2, IN)}, None, "params.axis"),
    ({"axis": "rows"}, {"indices": (2,), "block": (3, IN)}, None, r"block with axis rows needs .* \[n, 20\]"),
    ({"axis": "columns"}, {"indices": (2,), "block": (2, IN)}, None, r"\[12, n\]"),
    ({"axis": "rows"}, {"indices": (2,), "block": (2, IN)}, [4, 2], "strictly increasing"),
    ({"axis": "rows"}, {"indices": (2,), "block": (2, IN)}, [4, 12], r"out of range \[0, 12\)"),
])
def test_block_refuses_what_breaks_its_rules(params: dict, shapes: dict, data: list | None, msg: str) -> None:
    entry = {"kind": "block", "shape": [OUT, IN], "params": params}
    with pytest.raises(af.FormatError, match=msg):
        BLOCK.check("m", entry, shapes)
        BLOCK.check_data("m", entry, {"indices": torch.tensor(data), "block": torch.zeros(shapes["block"])})


def test_block_stores_about_a_third_of_the_sparse_bytes() -> None:
    _, entry, t = _case("rows", False)
    t = {"indices": t["indices"], "block": t["block"].float()}
    flat = BLOCK.delta(entry, t).reshape(-1)
    idx = flat.nonzero().reshape(-1)
    block_bytes = t["block"].numel() * 4 + t["indices"].numel() * 8
    sparse_bytes = idx.numel() * (4 + 8)
    assert 2.7 < sparse_bytes / block_bytes < 3  # 12 bytes per value against 4 (+ 8 per row of 20)
    sparse = af.registry.get_kind("sparse").delta({"shape": [OUT, IN], "params": {}}, {"indices": idx, "values": flat[idx]})
    torch.testing.assert_close(sparse, BLOCK.delta(entry, t))


# ----- S2FT -------------------------------------------------------------------------------------------------
def test_s2ft_draw_is_the_authors_draw_over_all_layers() -> None:
    got = bk.s2ft_draw(4, 10, 0.3, random.Random(7))
    picked = sorted(random.Random(7).sample(range(40), 12))
    assert sum(len(v) for v in got.values()) == 12
    assert got == {i: [u % 10 for u in picked if u // 10 == i] for i in range(4)}


def test_s2ft_default_is_the_authors_recipe_and_coupling_shares_the_units() -> None:
    model = build_tiny(seed=0)  # 2 layers, 4 heads of 16, 128 FFN channels
    s = af.registry.get_method("s2ft").train(model, config={})
    a = s.extract()
    s.remove()
    assert a.config == {"v_ratio": 0.0, "o_ratio": 0.0, "u_ratio": 0.0, "d_ratio": 0.03, "coupled": False, "seed": 0}
    assert {p.rsplit(".", 1)[-1] for p in a.modules} == {"down_proj"}
    assert sum(a.tensor(f"{p}.indices").numel() for p in a.modules) == int(128 * 2 * 0.03)
    s = af.registry.get_method("s2ft").train(model, config={"v_ratio": 0.5, "o_ratio": 0.5, "u_ratio": 0.1,
                                                            "d_ratio": 0.1, "coupled": True, "seed": 3})
    a = s.extract()
    s.remove()
    for layer in (0, 1):
        pre = f"model.layers.{layer}"
        for first, second in (("self_attn.v_proj", "self_attn.o_proj"), ("mlp.up_proj", "mlp.down_proj")):
            if f"{pre}.{first}" in a.modules:
                assert torch.equal(a.tensor(f"{pre}.{first}.indices"), a.tensor(f"{pre}.{second}.indices"))
                assert a.modules[f"{pre}.{first}"]["params"]["axis"] == "rows"
                assert a.modules[f"{pre}.{second}"]["params"]["axis"] == "columns"
    heads = [a.tensor(f"model.layers.{i}.self_attn.v_proj.indices") for i in (0, 1)
             if f"model.layers.{i}.self_attn.v_proj" in a.modules]
    assert sum(h.numel() for h in heads) == 4 * 16  # half of 2 x 4 heads, 16 channels each
    assert all(torch.equal(h.reshape(-1, 16), h.reshape(-1, 16)[:, :1] + torch.arange(16)) for h in heads)
    with pytest.raises(af.FormatError, match="coupled needs v_ratio == o_ratio"):
        af.registry.get_method("s2ft").train(model, config={"v_ratio": 0.5, "o_ratio": 0.25, "coupled": True})
    with pytest.raises(af.FormatError, match="'d_ration' \\(did you mean 'd_ratio'"):
        af.registry.get_method("s2ft").train(model, config={"d_ration": 0.1})


def test_s2ft_trains_and_reloads_exactly(tmp_path) -> None:
    model = build_tiny(seed=0)
    batch = lm_task()
    session = af.registry.get_method("s2ft").train(model, config={"v_ratio": 0.25, "o_ratio": 0.25,
                                                                  "u_ratio": 0.1, "d_ratio": 0.1})
    start, end = train(lambda: lm_loss(model, batch), session.parameters(), steps=30, lr=0.02)
    assert end < 0.8 * start
    with torch.no_grad():
        trained = model(batch[0])
    adapter = session.extract()
    session.remove()
    af.attach(model, af.validate(af.save(adapter, tmp_path / "s2ft.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(model(batch[0]), trained)


# ----- HFT --------------------------------------------------------------------------------------------------
def test_hft_trains_half_of_each_block_fully() -> None:
    model = build_tiny(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    session = af.registry.get_method("hft").train(model, config={"seed": 1})
    chosen = {p.split(".")[2]: [] for p in session.layers}
    for p in session.layers:
        chosen[p.split(".")[2]].append(p.rsplit(".", 1)[-1])
    assert {b: sorted(v) for b, v in chosen.items()} == {str(b): bk.hft_choice(b, 1, 0, 0.5) for b in (0, 1)}
    for b, names in chosen.items():
        assert len(set(names) & set(bk.ATTN)) == 2 and len(set(names) & set(bk.FFN)) == (1 if b == "0" else 2)
    batch = lm_task()
    start, end = train(lambda: lm_loss(model, batch), session.parameters(), steps=15, lr=0.01)
    assert end < 0.8 * start
    adapter = session.extract()
    session.remove()
    assert all(e["kind"] == "dense" and e["params"]["mode"] == "add" for e in adapter.modules.values())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert bk.hft_choice(0, 1, 1, 0.5) != bk.hft_choice(0, 1, 0, 0.5) or bk.hft_choice(1, 1, 1, 0.5) != \
        bk.hft_choice(1, 1, 0, 0.5)  # a new stage re-draws
    assert math.isclose(sum(len(bk.hft_choice(b, 0, 0, 0.5)) for b in range(4)) / (4 * 7), 0.5)
