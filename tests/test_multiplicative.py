"""The multiplicative kinds (spec 6.10.7: cayley, butterfly, householder) mean what the spec says, and their
merge rules hold.

``G`` is rebuilt with numpy from the spec text alone and compared with the model after ``af.attach``
(unmerged and merged) on a Linear (input side), a GPT-2 Conv1D (input side, transposed) and an embedding
(output side); unmerge restores the weights exactly; delta-space merges refuse; baking applies the adapters
in order.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_spec_examples import _np
from test_spec_plugin_kinds import GEN, function_shape, rnd, tiny

import adapterfmt as af

ATOL = 1e-5


# ----- the spec's math, written out in numpy ---------------------------------------------------------------
def skew(row: np.ndarray, bs: int) -> np.ndarray:
    """6.10.7 cayley: Q[p, q] = row[j], Q[q, p] = -row[j] for the j-th pair p < q in row-major order."""
    q = np.zeros((bs, bs))
    j = 0
    for p in range(bs):
        for c in range(p + 1, bs):
            q[p, c], q[c, p] = row[j], -row[j]
            j += 1
    return q


def cayley_transform(q: np.ndarray, series: list[float] | None) -> np.ndarray:
    eye = np.eye(len(q))
    if series is None:
        return (eye - q) @ np.linalg.inv(eye + q)
    return eye + sum(c * np.linalg.matrix_power(q, j + 1) for j, c in enumerate(series))


def blockdiag(blocks: list[np.ndarray]) -> np.ndarray:
    n = sum(len(b) for b in blocks)
    out, at = np.zeros((n, n)), 0
    for b in blocks:
        out[at:at + len(b), at:at + len(b)] = b
        at += len(b)
    return out


def cayley_g(entry: dict, t: dict[str, np.ndarray], d: int) -> np.ndarray:
    k, n_t = t["skew"].shape
    bs = next(b for b in range(2, d + 1) if b * (b - 1) // 2 == n_t)
    cs = [cayley_transform(skew(t["skew"][i], bs), entry["params"].get("series")) for i in range(k)]
    return blockdiag([cs[0 if k == 1 else i] for i in range(d // bs)])


def butterfly_g(entry: dict, t: dict[str, np.ndarray], d: int) -> np.ndarray:
    """6.10.7 butterfly: G = M_{N-1} ... M_0, M_f = P_f B_f P_f^T, P_f[a, perm_f[a]] = 1."""
    blocks = t["blocks"]
    n, nb, h = blocks.shape[:3]
    g = np.eye(d)
    for f in range(n):
        b = blockdiag([cayley_transform((blocks[f, i] - blocks[f, i].T) / 2, None) for i in range(nb)])
        perm = list(range(d))
        if f:
            length, half = h * 2 ** f, h // 2
            perm = []
            for start in range(0, d, length):
                chunks = [list(range(start + c * half, start + (c + 1) * half)) for c in range(length // half)]
                perm += [i for c in chunks[0::2] + chunks[1::2] for i in c]
        p = np.zeros((d, d))
        for a, src in enumerate(perm):
            p[a, src] = 1
        g = p @ b @ p.T @ g
    return g


def householder_g(entry: dict, t: dict[str, np.ndarray], d: int) -> np.ndarray:
    v = t["vectors"]
    if entry["params"].get("orthogonalize"):
        qs = []
        for i in range(v.shape[1]):
            x = v[:, i].copy()
            for q in qs:
                x = x - (q @ x) * q
            qs.append(x / np.linalg.norm(x))
        q = np.stack(qs, axis=1)
        return np.eye(d) - 2 * q @ q.T
    g = np.eye(d)
    for i in range(v.shape[1]):  # G = H_{r-1} ... H_0
        u = v[:, i] / np.linalg.norm(v[:, i])
        g = (np.eye(d) - 2 * np.outer(u, u)) @ g
    return g


SPEC_G = {"cayley": cayley_g, "butterfly": butterfly_g, "householder": householder_g}


def merged_weight(entry: dict, t: dict[str, np.ndarray], w: np.ndarray) -> np.ndarray:
    """6.10.7 common rules, in function layout: input side W_f G^T (then diag(output_scale)), output side G^T W_f."""
    transposed = entry["params"].get("transposed", False)
    w_f = w.T if transposed else w
    side = entry["params"].get("side", "input")
    out, n_in = function_shape(entry)
    g = SPEC_G[entry["kind"]](entry, t, n_in if side == "input" else out)
    new = w_f @ g.T if side == "input" else g.T @ w_f
    if "output_scale" in t:
        new = t["output_scale"][:, None] * new
    return new.T if transposed else new


# ----- adapters on the modules of test_spec_plugin_kinds.Tiny (lin 6->4, c1d 3->5 Conv1D, emb 10x6) --------
def entry(kind: str, shape: list[int], **params) -> dict:
    return {"kind": kind, "shape": shape, "params": params}


def build(kind: str) -> tuple[dict, dict]:
    if kind == "cayley":  # exact on lin (3 blocks of 2), PEFT's series with a shared block on emb's 6 outputs
        return ({"lin": entry("cayley", [4, 6]),
                 "c1d": entry("cayley", [3, 5], transposed=True, series=[2.0, 2.0, 1.0]),
                 "emb": entry("cayley", [10, 6], side="output", transposed=True, series=[2.0, 2.0, 2.0, 1.0])},
                {"lin.skew": rnd(3, 1), "c1d.skew": 0.5 * rnd(1, 3), "emb.skew": 0.3 * rnd(1, 3)})
    if kind == "butterfly":  # two butterfly factors on a 8-input layer, one on the Conv1D
        return ({"lin": entry("butterfly", [4, 8]), "c1d": entry("butterfly", [3, 5], transposed=True)},
                {"lin.blocks": rnd(2, 4, 2, 2), "lin.output_scale": 1 + 0.2 * rnd(4), "c1d.blocks": rnd(1, 1, 3, 3)})
    assert kind == "householder"
    return ({"lin": entry("householder", [4, 6], orthogonalize=True), "c1d": entry("householder", [3, 5],
                                                                                     transposed=True),
             "emb": entry("householder", [10, 6], side="output", transposed=True)},
            {"lin.vectors": rnd(6, 3), "c1d.vectors": rnd(3, 2), "emb.vectors": rnd(6, 4)})


def model_for(kind: str) -> torch.nn.Module:
    model = tiny()
    if kind == "butterfly":
        model.lin = torch.nn.Linear(8, 4)
        torch.nn.init.normal_(model.lin.weight, generator=torch.Generator().manual_seed(5))
    return model


INPUTS = {"lin": lambda kind: torch.randn(3, 8 if kind == "butterfly" else 6, generator=GEN),
          "c1d": lambda kind: torch.randn(2, 3, 3, generator=GEN),
          "emb": lambda kind: torch.tensor([[0, 3, 9], [2, 2, 7]])}


def saved(tmp_path, kind: str) -> af.Adapter:
    modules, tensors = build(kind)
    return af.validate(af.save(af.Adapter(af.new_manifest(kind, modules), tensors), tmp_path / f"{kind}.safetensors"))


def arrays(adapter: af.Adapter, module: str) -> dict[str, np.ndarray]:
    return {role: _np(t) for role, t in adapter.module_tensors(module).items()}


def module_out(module: torch.nn.Module, x: torch.Tensor, w: np.ndarray) -> np.ndarray:
    """The module's function with stored-layout weight ``w`` and its own bias."""
    if isinstance(module, torch.nn.Embedding):
        return w[x.numpy()]
    w_f = w.T if type(module).__name__ == "Conv1D" else w
    return _np(x) @ w_f.T + _np(module.bias.detach())


@pytest.mark.parametrize("kind", list(SPEC_G))
def test_multiplicative_kinds_follow_the_spec(tmp_path, kind):
    adapter = saved(tmp_path, kind)
    model = model_for(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    want, xs = {}, {}
    for path, e in adapter.modules.items():
        kd = af.registry.get_kind(kind)
        assert not kd.is_additive(e, adapter.roles(path))
        want[path] = merged_weight(e, arrays(adapter, path), _np(before[f"{path}.weight"]))
        xs[path] = INPUTS[path](kind)
    af.attach(model, adapter)  # unmerged
    for path, w in want.items():
        module = model.get_submodule(path)
        np.testing.assert_allclose(_np(module(xs[path]).detach()), module_out(module, xs[path], w), atol=ATOL,
                                   err_msg=path)
    af.merge_into(model, kind)
    for path, w in want.items():
        np.testing.assert_allclose(_np(model.get_submodule(path).weight.detach()), w, atol=ATOL, err_msg=path)
        if getattr(model.get_submodule(path), "bias", None) is not None:
            assert torch.equal(model.get_submodule(path).bias, before[f"{path}.bias"])
    af.detach(model)  # unmerge restores exactly
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_g_is_orthogonal_for_the_exact_forms():
    e = {"kind": "cayley", "shape": [4, 6], "params": {}}
    g = af.registry.get_kind("cayley").rotation(e, {"skew": rnd(3, 1)})
    assert torch.allclose(g @ g.T, torch.eye(6), atol=1e-6)
    e = {"kind": "butterfly", "shape": [4, 16], "params": {}}
    g = af.registry.get_kind("butterfly").rotation(e, {"blocks": rnd(3, 4, 4, 4)})
    assert torch.allclose(g @ g.T, torch.eye(16), atol=1e-5)


# ----- the MUST-refuse rules and the merge rules ------------------------------------------------------------
REFUSED = {
    "skew_not_triangle": ("cayley", lambda m, t: t.update({"lin.skew": rnd(3, 2)})),
    "skew_block_count": ("cayley", lambda m, t: t.update({"lin.skew": rnd(2, 1)})),
    "side": ("cayley", lambda m, t: m["lin"]["params"].update(side="both")),
    "not_2d": ("cayley", lambda m, t: m["lin"].update(shape=[4, 6, 1])),
    "conv_output_side": ("householder", lambda m, t: m["lin"].update(shape=[4, 6, 1, 1],
                                                                   params={"side": "output"})),
    "series_not_numbers": ("cayley", lambda m, t: m["lin"]["params"].update(series=["2"])),
    "butterfly_d": ("butterfly", lambda m, t: t.update({"c1d.blocks": rnd(1, 2, 2, 2)})),
    "butterfly_factors": ("butterfly", lambda m, t: t.update({"lin.blocks": rnd(3, 2, 4, 4)})),
    "scale_shape": ("butterfly", lambda m, t: t.update({"lin.output_scale": rnd(5)})),
    "scale_output_side": ("householder", lambda m, t: t.update({"emb.output_scale": rnd(6)})),
    "vectors_rows": ("householder", lambda m, t: t.update({"lin.vectors": rnd(5, 3)})),
    "vector_zero": ("householder", lambda m, t: t.update({"lin.vectors": torch.zeros(6, 2)})),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_entries_the_spec_says_to_refuse_are_refused(case):
    kind, change = REFUSED[case]
    modules, tensors = build(kind)
    change(modules, tensors)
    with pytest.raises(af.FormatError):
        af.validate(af.Adapter(af.new_manifest(kind, modules), tensors))


def test_input_side_on_an_embedding_is_refused():
    adapter = af.Adapter(af.new_manifest("oft", {"emb": entry("cayley", [10, 6], transposed=True)}),
                         {"emb.skew": rnd(3, 1)})
    with pytest.raises(af.BaseMismatchError, match="needs params.side 'output'"):
        af.attach(tiny(), adapter)


@pytest.mark.parametrize("key", ["coft", "eps"])
def test_oft_training_refuses_constrained_oft(key):
    """The oft train verb does not implement COFT's projection: its keys are refused, not ignored."""
    with pytest.raises(af.FormatError, match=f"oft config has unknown key.*{key}"):
        af.registry.get_method("oft").train(tiny(), config={"target_modules": ["q_proj"], key: 1e-4})


def test_delta_space_merge_is_refused(tmp_path):
    from helpers_spec import invoke

    adapter = saved(tmp_path, "cayley")
    with pytest.raises(af.UnsupportedError, match=r"not W \+ dW.*lin \(cayley\)"):
        af.merge_adapters([adapter, adapter])
    res = invoke("merge", str(adapter.source), str(adapter.source), "--out", str(tmp_path / "m"))
    assert res.exit_code == 1 and "not W + dW" in res.stderr and not (tmp_path / "m").exists()


def test_unmerging_out_of_order_is_refused(tmp_path):
    a, b = saved(tmp_path, "cayley"), saved(tmp_path, "householder")
    model = tiny()
    af.attach(model, a, name="a", merge=True)
    af.attach(model, b, name="b", merge=True)
    with pytest.raises(af.AdapterError, match="last merged, first unmerged"):
        af.unmerge(model, "a")
    af.unmerge(model, "b")
    af.unmerge(model, "a")
    assert torch.equal(model.lin.weight, tiny().lin.weight)


def test_bake_applies_adapters_in_order(tmp_path):
    """merge --base: cayley then householder on the same modules = W_f G1^T G2^T (the spec's order)."""
    from helpers_spec import invoke
    from safetensors.torch import load_file, save_file

    model = tiny()
    base = tmp_path / "base"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, base / "model.safetensors")
    a, b = saved(tmp_path, "cayley"), saved(tmp_path, "householder")
    pa, pb = (str(x.source) for x in (a, b))
    res = invoke("merge", pa, pb, "--base", str(base), "--out", str(tmp_path / "baked"))
    assert res.exit_code == 0, res.stdout + res.stderr
    baked = load_file(tmp_path / "baked" / "model.safetensors")
    for path in ("lin", "c1d", "emb"):
        w = _np(model.state_dict()[f"{path}.weight"])
        want = merged_weight(b.modules[path], arrays(b, path), merged_weight(a.modules[path], arrays(a, path), w))
        np.testing.assert_allclose(_np(baked[f"{path}.weight"]), want, atol=ATOL, err_msg=path)
    assert invoke("merge", pb, pa, "--base", str(base), "--out", str(tmp_path / "other")).exit_code == 0
    assert not torch.allclose(load_file(tmp_path / "other" / "model.safetensors")["lin.weight"], baked["lin.weight"])


def test_demo_step_shows_an_oft_adapter(tmp_path):
    from adapterfmt.demo.rotation import step_rotation
    from adapterfmt.demo.run import run_demo

    (row,) = run_demo(tmp_path, steps=[step_rotation]).report
    assert row["step"] == "rotation" and row["kind"] == "cayley" and row["unmerge_exact"] is True
    assert row["loss_after"] < row["loss_before"]
    assert float(row["orthogonality"]) < 1e-5 and float(row["row_norm_change"]) < 1e-5
    assert float(row["merged_vs_unmerged"]) < 1e-4 and float(row["baked_vs_merged"]) == 0.0
