"""`adapter port`: fingerprint comparison, module mapping, refusals, base-dependent recomputation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from adapterfmt.cli.main import app
from helpers_port import CHANGED, rel, tiny_pair
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import adapterfmt as af
from adapterfmt.tiny import TinyConfig, build_tiny, save_tiny
from adapterfmt.verbs.extract import extract_adapter
from adapterfmt.verbs.port import port_adapter, port_record

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def setup(tmp_path: Path) -> dict:
    base, tuned, changes = tiny_pair(tmp_path)
    patch, _ = extract_adapter(base, tuned, form="lowrank", energy=0.999999)
    v2 = build_tiny(0)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in v2.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return {"base": base, "patch": patch, "changes": changes, "v2": v2, "v2_dir": save_tiny(v2, tmp_path / "v2"),
            "tmp": tmp_path}


def renamed_checkpoint(src: Path, dst: Path, old: str, new: str) -> Path:
    dst.mkdir()
    save_file({k.replace(old, new): v for k, v in load_file(src / "model.safetensors").items()},
              dst / "model.safetensors")
    return dst


def test_port_to_evolved_base(setup):
    ported = port_adapter(setup["patch"], new_base=setup["v2_dir"])
    rec = port_record(ported)
    assert rec["change"] == "new-weights" and rec["fingerprint"] == "new-weights"
    assert rec["mapped_by"] == {"name": len(CHANGED)} and rec["renamed"] == {} and rec["actions"] == {}
    assert rec["from_base"]["fingerprint"] == setup["patch"].base["fingerprint"]
    assert ported.base["fingerprint"] == af.fingerprint_checkpoint(setup["v2_dir"])
    assert ported.base["name"] == str(setup["v2_dir"])
    for name in setup["patch"].tensor_names():  # a base-independent patch is carried over as is
        assert torch.equal(ported.tensor(name), setup["patch"].tensor(name))
    out = af.save(ported, setup["tmp"] / "ported")
    again = af.validate(out)
    assert port_record(again)["change"] == "new-weights"
    v2, ref = copy.deepcopy(setup["v2"]), copy.deepcopy(setup["v2"])
    with torch.no_grad():
        for m, d in setup["changes"].items():
            ref.get_submodule(m).weight.add_(d)
        af.attach(v2, again)
        assert torch.allclose(v2(IDS), ref(IDS), atol=1e-4)  # v2 + (v1_ft - v1): PortLLM's patched model


def test_same_base_and_live_module(setup):
    assert port_record(port_adapter(setup["patch"], new_base=setup["base"]))["change"] == "same"
    assert port_record(port_adapter(setup["patch"], new_base=setup["v2"]))["change"] == "new-weights"
    bare = af.Adapter(copy.deepcopy(setup["patch"].manifest), setup["patch"].tensors())
    bare.manifest["base"]["fingerprint"] = None
    assert port_record(port_adapter(bare, new_base=setup["v2_dir"]))["change"] == "unknown"


def test_renamed_modules_by_mapping_file_and_by_position(setup, tmp_path):
    ren = renamed_checkpoint(setup["v2_dir"], tmp_path / "ren", "model.layers.", "model.blocks.")
    with pytest.raises(af.BaseMismatchError, match=r"model.layers.0.self_attn.q_proj: no tensor .*mapping file"):
        port_adapter(setup["patch"], new_base=ren)
    (tmp_path / "map.json").write_text(json.dumps({"model.layers.": "model.blocks."}))
    (tmp_path / "map.yaml").write_text("model.layers.0.self_attn.q_proj: model.blocks.0.self_attn.q_proj\n"
                                       "model.layers.1.mlp.down_proj: model.blocks.1.mlp.down_proj\n")
    expected = {"model.layers.0.self_attn.q_proj": "model.blocks.0.self_attn.q_proj",
                "model.layers.1.mlp.down_proj": "model.blocks.1.mlp.down_proj"}
    results = [port_adapter(setup["patch"], new_base=ren, mapping=tmp_path / "map.json"),
               port_adapter(setup["patch"], new_base=ren, mapping=tmp_path / "map.yaml"),
               port_adapter(setup["patch"], new_base=ren, old_base=setup["base"])]
    for ported, how in zip(results, ("mapping", "mapping", "position")):
        rec = port_record(ported)
        assert rec["change"] == "renamed-modules" and rec["renamed"] == expected
        assert rec["mapped_by"] == {"name": 1, how: 2}  # the embedding kept its name
        assert sorted(ported.modules) == sorted(["model.embed_tokens", *expected.values()])
        for old, new in expected.items():
            assert torch.equal(ported.tensor(f"{new}.lora_A"), setup["patch"].tensor(f"{old}.lora_A"))
        af.validate(ported)


def test_position_mapping_refuses_misaligned_bases(setup, tmp_path):
    ren = renamed_checkpoint(setup["v2_dir"], tmp_path / "ren", "model.layers.", "model.blocks.")
    other = save_tiny(build_tiny(0, TinyConfig(layers=3)), tmp_path / "three")
    with pytest.raises(af.BaseMismatchError, match="old base has 21 tensors, new base 30"):
        port_adapter(setup["patch"], new_base=renamed_checkpoint(other, tmp_path / "ren3", "model.layers.",
                                                                 "model.blocks."), old_base=setup["base"])
    with pytest.raises(af.BaseMismatchError, match="is not the base this adapter records"):
        port_adapter(setup["patch"], new_base=ren, old_base=other)


def test_refuses_another_architecture_listing_modules_and_shapes(setup, tmp_path):
    small = save_tiny(build_tiny(0, TinyConfig(hidden=32, intermediate=64)), tmp_path / "small")
    with pytest.raises(af.BaseMismatchError) as err:
        port_adapter(setup["patch"], new_base=small)
    msg = str(err.value)
    assert "different architecture" in msg and "3 module(s) do not fit" in msg
    assert "model.embed_tokens: patch expects weight of shape [128, 64], the new base has [128, 32]" in msg
    assert "model.layers.0.self_attn.q_proj: patch expects weight of shape [64, 64], the new base has [32, 32]" in msg
    assert "model.layers.1.mlp.down_proj: patch expects weight of shape [64, 128], the new base has [32, 64]" in msg
    src = af.save(setup["patch"], tmp_path / "patch")
    res = CliRunner().invoke(app, ["port", str(src), "--to", str(small), "--out", str(tmp_path / "out")])
    assert res.exit_code == 1 and "model.layers.1.mlp.down_proj" in res.output
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp leftovers either


def test_deeper_base_with_the_same_modules_is_other_structure(setup, tmp_path):
    deeper = save_tiny(build_tiny(0, TinyConfig(layers=3)), tmp_path / "deeper")
    rec = port_record(port_adapter(setup["patch"], new_base=deeper))
    assert rec["change"] == "other-structure" and rec["fingerprint"] == "different"
    rec = port_record(port_adapter(setup["patch"], new_base=deeper, old_base=setup["base"]))
    assert rec["change"] == "other-structure"


def dora(patch: af.Adapter) -> af.Adapter:
    t = patch.tensors()
    gen = torch.Generator().manual_seed(9)
    for m, entry in patch.modules.items():
        out = entry["shape"][1] if entry["params"].get("transposed") else entry["shape"][0]
        t[f"{m}.magnitude"] = torch.rand(out, generator=gen) + 0.5
    return af.Adapter(copy.deepcopy(patch.manifest), t)


def test_dora_magnitude_is_rescaled_with_the_old_base(setup):
    patch = dora(setup["patch"])
    kept = port_adapter(patch, new_base=setup["v2_dir"])
    assert port_record(kept)["actions"] == {"kept-magnitude": sorted(CHANGED)}
    ported = port_adapter(patch, new_base=setup["v2_dir"], old_base=setup["base"])
    assert port_record(ported)["actions"] == {"recomputed": sorted(CHANGED)}
    v1, v2 = build_tiny(0), copy.deepcopy(setup["v2"])
    w1 = {m: v1.get_submodule(m).weight.detach().clone() for m in CHANGED}
    w2 = {m: v2.get_submodule(m).weight.detach().clone() for m in CHANGED}
    with torch.no_grad():
        af.attach(v1, patch, merge=True)
        af.attach(v2, ported, merge=True)
    for m in CHANGED:  # the per-output-row rescaling m / ||W + dW|| carries over to the new base
        d = setup["changes"][m]
        s1 = v1.get_submodule(m).weight / (w1[m] + d)
        s2 = v2.get_submodule(m).weight / (w2[m] + d)
        assert rel(s2, s1) < 1e-4
        assert rel(ported.tensor(f"{m}.magnitude"), patch.tensor(f"{m}.magnitude")) > 1e-3  # it did change


def test_replace_patch_is_recomputed_and_needs_the_old_base(setup, tmp_path):
    base = build_tiny(0)
    m = "model.layers.0.self_attn.q_proj"
    value = base.get_submodule(m).weight.detach() + setup["changes"][m]
    patch = af.Adapter(af.new_manifest("task_vector", {m: {"kind": "dense", "shape": [64, 64],
                                                           "params": {"mode": "replace"}}},
                                       base={"name": "v1", "revision": None,
                                             "fingerprint": af.fingerprint_module(base)}),
                       {f"{m}.value": value})
    with pytest.raises(af.UnsupportedError, match=f"{m}: a dense 'replace' patch stores absolute weights"):
        port_adapter(patch, new_base=setup["v2_dir"])
    ported = port_adapter(patch, new_base=setup["v2_dir"], old_base=base)
    w2 = setup["v2"].get_submodule(m).weight.detach()
    assert rel(ported.tensor(f"{m}.value") - w2, setup["changes"][m]) < 1e-5
    assert port_record(ported)["actions"] == {"recomputed": [m]}
    same = port_adapter(patch, new_base=setup["base"])  # same base: nothing to recompute, no old base needed
    assert torch.equal(same.tensor(f"{m}.value"), value)


def test_prompt_patch_follows_a_grown_vocabulary(tmp_path):
    v1 = build_tiny(0)
    patch = af.Adapter(af.new_manifest("prompt_tuning", {"model.embed_tokens": {
        "kind": "prompt", "shape": [128, 64], "params": {"position": "prefix"}}},
        base={"name": "v1", "revision": None, "fingerprint": af.fingerprint_module(v1)}),
        {"model.embed_tokens.embeddings": torch.randn(3, 64)})
    grown = build_tiny(1, TinyConfig(vocab_size=160))
    ported = port_adapter(patch, new_base=grown)
    assert ported.modules["model.embed_tokens"]["shape"] == [160, 64]
    assert port_record(ported)["change"] == "other-structure"
    with torch.no_grad():
        af.attach(grown, ported)
        assert grown(IDS).shape == (2, 12, 160)


def test_method_port_verb_and_cli(setup, tmp_path):
    ported = af.registry.verb("lora", "port")(setup["patch"], new_base=setup["v2_dir"])
    assert port_record(ported)["change"] == "new-weights"
    src = af.save(setup["patch"], tmp_path / "patch.safetensors")
    res = CliRunner().invoke(app, ["port", str(src), "--to", str(setup["v2_dir"]), "--out", str(tmp_path / "p2"),
                                   "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["change"] == "new-weights" and out["tool"] == "adapterfmt port"
    prov = af.validate(tmp_path / "p2").manifest["provenance"]
    assert [p["tool"] for p in prov] == ["adapterfmt extract", "adapterfmt port"]
    res = CliRunner().invoke(app, ["port", str(src), "--to", str(setup["v2_dir"]), "--out", str(tmp_path / "p2")])
    assert res.exit_code == 1 and "output exists" in res.output
    res = CliRunner().invoke(app, ["port", str(src), "--to", str(setup["v2_dir"]), "--out", str(tmp_path / "p3")])
    assert res.exit_code == 0 and "change: new-weights" in res.output


def test_shared_tensors_are_carried_over(setup):
    patch = setup["patch"]
    m = "model.layers.0.self_attn.q_proj"
    t = {n: v for n, v in patch.tensors().items() if not n.startswith(m + ".lora_A")}
    t["shared.A"] = patch.tensor(f"{m}.lora_A")
    manifest = copy.deepcopy(patch.manifest)
    manifest["modules"][m]["params"]["shared"] = {"lora_A": "shared.A"}
    shared = af.validate(af.Adapter(manifest, t))
    ported = port_adapter(shared, new_base=setup["v2_dir"])
    assert torch.equal(ported.tensor("shared.A"), t["shared.A"]) and f"{m}.lora_A" not in ported.tensor_names()
    af.validate(ported)
