"""Spec 1.2's lowrank middle factor and base-derived part (spec 6.2, 6.2.1): the recipes' test vector, the
must-understand rule, the derived form's base check, and merge / compress / port on the new forms."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers_spec import EXAMPLES

import adapterfmt as af
from adapterfmt.deltas.base_part import RECIPES, ldu_rows, product, recipe_factors
from adapterfmt.format import golden
from adapterfmt.format.manifest import FEATURE_BASE, FEATURE_MID
from adapterfmt.verbs.explicit import make_explicit
from adapterfmt.verbs.port import port_record

UP = "model.layers.0.mlp.up_proj"
VECTOR = {  # spec 6.2.1's test vector: (Frobenius norm, sum, row 0) of P on the golden up_proj, r0 = 2
    "svd_top": (2.468622819, 0.431436578, [0.355356575, -0.183704307, -0.197583152, 0.267046045, 0.107846820,
                                           -0.295231404, -0.041857481, 0.366137891]),
    "svd_bottom": (0.319020180, -0.936903214, [-0.052716243, -0.052601459, -0.058992651, -0.020901430,
                                               -0.035234247, -0.034907939, -0.030036363, -0.013021394]),
    "qr": (2.249114284, 0.168271503, [0.25, -0.5, 0.103231333, 0.240614662, -0.080443644, -0.153827977,
                                      0.181895380, 0.259776701]),
    "ldu": (2.561338580, 0.082031250, [0.25, -0.5, -0.1875, 0.125, 0.4375, -0.3125, 0.0, 0.3125]),
    "nystrom": (0.737581759, 0.025390625, [0.09765625, -0.1328125, -0.064453125, 0.00390625, 0.138671875,
                                           -0.091796875, -0.0234375, 0.111328125]),
}


def up_weight() -> torch.Tensor:
    return golden.golden_base().get_submodule(UP).weight.detach()


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_test_vector(recipe):
    w = up_weight()
    rows = ldu_rows(w, 2) if recipe == "ldu" else None
    p = product(*recipe_factors(recipe, w, 2, rows))
    fro, total, row0 = VECTOR[recipe]
    assert abs(p.norm().item() - fro) < 1e-8 and abs(p.sum().item() - total) < 1e-8
    torch.testing.assert_close(p[0], torch.tensor(row0, dtype=torch.float64), atol=1e-8, rtol=0)


def test_spec_prints_the_test_vector():
    text = (EXAMPLES.parent / "adapterfmt-1.md").read_text("utf-8")
    for recipe, (fro, total, _) in VECTOR.items():
        assert f"| `{recipe}`" in text and f"{fro:.9f}" in text and f"{total:.9f}".replace("-", "−") in text


def test_ldu_rows_break_ties_to_the_first_row():
    w = up_weight()
    assert w[1, 0] == -w[9, 0] == -0.4375 and sm_abs_max(w[:, 0]) == 0.4375
    assert ldu_rows(w, 2) == [1, 0]
    b0, m0, _ = recipe_factors("ldu", w, 2, [1, 0])
    torch.testing.assert_close(b0[[1, 0]], torch.tensor([[1.0, 0.0], [-4 / 7, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(m0, torch.tensor([-0.4375, -4 / 7], dtype=torch.float64))


def sm_abs_max(v: torch.Tensor) -> float:
    return v.abs().max().item()


def test_golden_ldu_rows_are_the_writers_rows():
    v = golden.golden_base().model.layers[0].self_attn.v_proj.weight.detach()
    assert golden.example("lowrank_svd").modules[golden.V]["params"]["base_part"]["rows"] == ldu_rows(v, 2)


def test_recipes_refuse_ill_defined_parts():
    q1, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    w = (q1[:, :8] * torch.tensor([5.0, 4.0, 3.0, 3.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)) @ q2.t()
    recipe_factors("svd_top", w, 2)
    with pytest.raises(af.UnsupportedError, match="relative gap"):
        recipe_factors("svd_top", w, 3)  # sigma_3 == sigma_4
    with pytest.raises(af.UnsupportedError, match="outside"):
        recipe_factors("svd_bottom", w, 8)
    dep = up_weight().clone()
    dep[:, 1] = 2 * dep[:, 0]
    with pytest.raises(af.UnsupportedError, match="singular"):
        recipe_factors("ldu", dep, 2, [1, 0])
    with pytest.raises(af.UnsupportedError, match="dependent"):
        recipe_factors("qr", dep, 2)
    with pytest.raises(af.UnsupportedError, match="distinct"):
        recipe_factors("ldu", up_weight(), 2, [1, 1])


# ----- the must-understand rule and the structure checks --------------------------------------------------
def test_writer_lists_the_features_and_readers_require_them(tmp_path):
    adapter = af.load(EXAMPLES / "lowrank_svd")
    assert adapter.manifest["spec_version"] == "1.2"
    assert sorted(adapter.manifest["must_understand"]) == [FEATURE_BASE, FEATURE_MID]
    folder = tmp_path / "a"
    shutil.copytree(EXAMPLES / "lowrank_svd", folder)
    manifest = json.loads((folder / "adapter.json").read_text())
    del manifest["must_understand"]  # as a writer that forgot the rule
    (folder / "adapter.json").write_text(json.dumps(manifest))
    with pytest.raises(af.FormatError, match="must_understand does not list adapterfmt.lowrank_base"):
        af.load(folder)
    # an older reader knows neither name: it refuses the file (unknown must_understand) instead of misreading it
    manifest["must_understand"] = ["adapterfmt.lowrank_mid", "adapterfmt.lowrank_next"]
    (folder / "adapter.json").write_text(json.dumps(manifest))
    with pytest.raises(af.UnknownExtensionError, match="adapterfmt.lowrank_next"):
        af.load(folder)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["modules"][UP]["params"]["base_part"].update(rows=[0, 1]), "rows is required with recipe ldu"),
    (lambda m: m["modules"][UP]["params"]["base_part"].update(rank=9), "outside"),
    (lambda m: m["modules"][UP]["params"]["base_part"].update(colour=1), "base_part"),
    (lambda m: m["modules"][UP]["params"]["base_part"].pop("rank"), "rank"),
    (lambda m: m["base"].update(fingerprint=None), "needs base.fingerprint"),
])
def test_bad_base_parts_are_refused(tmp_path, edit, match):
    folder = tmp_path / "a"
    shutil.copytree(EXAMPLES / "lowrank_svd", folder)
    manifest = json.loads((folder / "adapter.json").read_text())
    edit(manifest)
    (folder / "adapter.json").write_text(json.dumps(manifest))
    with pytest.raises(af.FormatError, match=match):
        af.load(folder)


def test_init_roles_are_refused_with_a_recipe(tmp_path):
    adapter = golden.example("lowrank_svd")
    adapter.manifest["modules"][UP]["params"]["base_part"] = {"scale": 1.0, "recipe": "svd_top", "rank": 2}
    tensors = {**adapter.tensors(), f"{UP}.init_A": torch.zeros(2, 8), f"{UP}.init_B": torch.zeros(12, 2)}
    with pytest.raises(af.FormatError, match="not described by the manifest"):
        af.save(af.Adapter(adapter.manifest, tensors), tmp_path / "x.safetensors")


# ----- the derived form: base check, explicit form, merge / compress / port -----------------------------
def test_derived_part_needs_the_recorded_base():
    adapter = af.load(EXAMPLES / "lowrank_svd.safetensors")
    other = golden.golden_base()
    with torch.no_grad():
        other.get_submodule(UP).weight.mul_(1.5)
    with pytest.raises(af.BaseMismatchError, match="derived params.base_part"):
        af.attach(other, adapter)
    with pytest.raises(af.BaseMismatchError, match="derived params.base_part"):
        make_explicit(adapter, other)
    with pytest.raises(af.UnsupportedError, match="give the base"):
        af.merge_adapters([adapter])


def outputs(model: torch.nn.Module, adapter: af.Adapter) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = {m: torch.randn(3, n, generator=g) for m, n in ((golden.Q, 8), (golden.V, 8), (UP, 8), (golden.DOWN, 12))}
    name = af.attach(model, adapter)
    try:
        return {m: model.get_submodule(m)(x[m]) for m in x if m in adapter.modules}
    finally:
        af.detach(model, name)


def test_explicit_form_computes_what_the_derived_form_does(tmp_path):
    base = golden.golden_base()
    derived = af.load(EXAMPLES / "lowrank_svd.safetensors")
    explicit = make_explicit(derived, base)
    assert not any("recipe" in e["params"].get("base_part", {}) for e in explicit.modules.values())
    assert "base_part" not in explicit.modules[golden.Q]["params"]  # IntTune: scale 0, dropped
    assert set(explicit.roles(golden.V)) == {"lora_A", "lora_B", "lora_mid", "init_A", "init_B", "init_mid"}
    saved = af.load(af.save(explicit, tmp_path / "e.safetensors"))
    a, b = outputs(base, derived), outputs(base, saved)
    for m in a:
        torch.testing.assert_close(a[m], b[m], atol=1e-6, rtol=0)
    for m, entry in saved.modules.items():  # the delta equals the spec's formula on the bound tensors
        torch.testing.assert_close(af.registry.get_kind("lowrank").delta(entry, saved.module_tensors(m)),
                                   merged_delta(base, derived, m), atol=1e-6, rtol=0)


def merged_delta(base: torch.nn.Module, adapter: af.Adapter, module: str) -> torch.Tensor:
    before = base.get_submodule(module).weight.detach().clone()
    name = af.attach(base, adapter, merge=True)
    after = base.get_submodule(module).weight.detach().clone()
    af.detach(base, name)
    torch.testing.assert_close(base.get_submodule(module).weight.detach(), before, atol=1e-7, rtol=0)
    return after - before


def test_merge_and_compress_use_the_complete_delta():
    base = golden.golden_base()
    derived = af.load(EXAMPLES / "lowrank_svd.safetensors")
    merged = af.merge_adapters([derived, derived], weights=[0.5, 0.25], strategy="cat", base=base)
    for m in derived.modules:
        torch.testing.assert_close(af.registry.get_kind("lowrank").delta(merged.modules[m], merged.module_tensors(m)),
                                   0.75 * merged_delta(base, derived, m), atol=1e-6, rtol=0)
    with pytest.raises(af.UnsupportedError, match="resize of module .*: .* derived base_part"):
        af.compress_adapter(derived, steps=[{"method": "resize", "rank": 64}])
    full = af.compress_adapter(make_explicit(derived, base), steps=[{"method": "resize", "rank": 64}])
    for m in derived.modules:
        assert set(full.roles(m)) == {"lora_A", "lora_B"}
        torch.testing.assert_close(af.registry.get_kind("lowrank").delta(full.modules[m], full.module_tensors(m)),
                                   merged_delta(base, derived, m), atol=1e-6, rtol=0)
    q8 = af.compress_adapter(make_explicit(derived, base), steps=[{"method": "quantize", "bits": 8}])
    assert q8.modules[golden.DOWN]["encoding"].keys() >= {"init_A", "init_B", "lora_A", "lora_B"}
    assert q8.manifest["compression"]["dW_rel_error_max"] < 0.02


def test_port_keeps_recipes_and_checks_them_on_the_new_base():
    derived = af.load(EXAMPLES / "lowrank_svd.safetensors")
    new = golden.golden_base()
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    ported = af.port_adapter(derived, new_base=new)
    assert ported.modules[UP]["params"]["base_part"]["recipe"] == "svd_top"
    assert port_record(ported)["actions"]["recomputed"] == sorted(
        m for m, e in derived.modules.items() if "recipe" in e["params"]["base_part"])
    af.attach(new, ported)  # the recorded base is now the new one
    af.detach(new)
    bad = golden.golden_base()
    with torch.no_grad():
        bad.get_submodule(golden.V).weight[:, :2] = 0  # the ldu pivot block becomes singular
    with pytest.raises(af.UnsupportedError, match="singular"):
        af.port_adapter(derived, new_base=bad)
