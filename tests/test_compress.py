"""``compress``: resize / compeft / quantize steps, their composition, the errors they report, the bytes on
disk (against the fp16 original), output divergence on a base model, and the ``adapter compress`` CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import adapterfmt as af
from adapterfmt.cli.main import app
from adapterfmt.compress import compress_adapter, resize_rank
from adapterfmt.summary import file_bytes
from adapterfmt.tiny import build_tiny, save_tiny

runner = CliRunner()


def lora(hidden=16, r=4, layers=1, dtype=torch.float32, seed=0, singular=None) -> af.Adapter:
    """A lowrank adapter on q/k/v/o of ``layers`` Llama-shaped layers; ``singular`` fixes dW's singular values."""
    g = torch.Generator().manual_seed(seed)
    modules, t = {}, {}
    for i in range(layers):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            path = f"model.layers.{i}.self_attn.{p}"
            modules[path] = af.lowrank_entry([hidden, hidden], 2.0)
            if singular is None:
                a, b = torch.randn(r, hidden, generator=g), torch.randn(hidden, r, generator=g)
            else:
                u = torch.linalg.qr(torch.randn(hidden, r, generator=g)).Q
                v = torch.linalg.qr(torch.randn(hidden, r, generator=g)).Q
                a, b = (torch.tensor(singular)[:, None] * v.T), u
            t[f"{path}.lora_A"], t[f"{path}.lora_B"] = a.to(dtype), b.to(dtype)
    return af.Adapter(af.new_manifest("lora", modules, config={"r": r}), t)


def dw(adapter: af.Adapter, path: str) -> torch.Tensor:
    entry = adapter.modules[path]
    return af.registry.get_kind(entry["kind"]).delta(entry, adapter.module_tensors(path)).double()


# ----- resize ---------------------------------------------------------------------------------------------
def test_resize_to_the_true_rank_is_exact_and_keeps_the_scale():
    src = lora(r=8, singular=[5.0, 3.0, 1.0, 0, 0, 0, 0, 0])
    out = compress_adapter(src, steps=[{"method": "resize", "rank": 3}])
    for path in src.modules:
        assert out.modules[path]["params"]["scale"] == 2.0
        assert out.shape(f"{path}.lora_A") == (3, 16) and out.shape(f"{path}.lora_B") == (16, 3)
        assert torch.allclose(dw(out, path), dw(src, path), atol=1e-5)
    assert out.manifest["compression"]["dW_rel_error_max"] < 1e-6


@pytest.mark.parametrize("option,value", [("sv_ratio", 5.0), ("sv_fro", 0.9), ("sv_cumulative", 0.8),
                                          ("rank", 2)])
def test_resize_thresholds_pick_the_rank_numpy_gives(option, value):
    s = np.array([8.0, 4.0, 2.0, 1.0, 0.5])
    if option == "sv_ratio":
        want = int((s >= s[0] / value).sum())
    elif option == "sv_fro":
        want = int(np.argmax(np.sqrt(np.cumsum(s**2) / np.sum(s**2)) >= value)) + 1
    elif option == "sv_cumulative":
        want = int(np.argmax(np.cumsum(s) / np.sum(s) >= value)) + 1
    else:
        want = value
    assert resize_rank(torch.tensor(s), **{option: value}) == want
    src = lora(r=5, singular=s.tolist())
    out = compress_adapter(src, steps=[{"method": "resize", option: value}])
    kept = s[:want]
    expect = math.sqrt(float((s**2).sum() - (kept**2).sum()) / float((s**2).sum()))
    for path in src.modules:
        assert out.shape(f"{path}.lora_A")[0] == want
        assert out.manifest["compression"]["module_errors"][path] == pytest.approx(expect, rel=1e-4, abs=1e-6)


# ----- compeft --------------------------------------------------------------------------------------------
def test_compeft_per_tensor_keeps_ceil_density_n_of_each_factor():
    src = lora(hidden=20, r=3)
    out = compress_adapter(src, steps=[{"method": "compeft", "density": 0.1}])
    for path, entry in out.modules.items():
        assert set(entry["encoding"]) == {"lora_A", "lora_B"}
        for spec in entry["encoding"].values():
            assert spec["codec"] == "ternary" and spec["count"] == math.ceil(0.1 * 60)


def test_compeft_over_the_adapter_keeps_the_global_top_magnitudes():
    src = lora(hidden=20, r=3, seed=4)
    out = compress_adapter(src, steps=[{"method": "compeft", "density": 0.2, "scope": "adapter"}])
    kept, dropped, count = [], [], 0
    for path, entry in out.modules.items():
        for role, spec in entry["encoding"].items():
            orig = src.tensor(f"{path}.{role}").abs().reshape(-1)
            mask = out.module_tensors(path)[role].reshape(-1) != 0
            kept.append(orig[mask])
            dropped.append(orig[~mask])
            count += spec["count"]
    assert count == math.ceil(0.2 * 8 * 60)
    assert float(torch.cat(kept).min()) >= float(torch.cat(dropped).max())


def test_compeft_std_scale_is_factor_times_the_tensors_std():
    src = lora(hidden=20, r=3)
    out = compress_adapter(src, steps=[{"method": "compeft", "density": 0.5, "scale": "std", "factor": 2.5}])
    path = "model.layers.0.self_attn.q_proj"
    got = out.module_tensors(path)["lora_A"]
    want = 2.5 * float(src.tensor(f"{path}.lora_A").std(correction=0))
    assert float(got.abs().max()) == pytest.approx(want, rel=1e-6)


def test_compeft_on_dw_stores_ternary_modules_that_apply_like_their_delta():
    model = build_tiny(seed=1)
    src = lora(hidden=64, r=4, layers=2, seed=2)
    out = compress_adapter(src, steps=[{"method": "compeft", "density": 0.05, "target": "delta"}])
    for path, entry in out.modules.items():
        assert entry["kind"] == "ternary" and entry["params"]["count"] == math.ceil(0.05 * 64 * 64)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        af.attach(model, out, name="c")
        unmerged = model(ids)
        af.merge_into(model, "c")
        af.activate(model, [])
        merged = model(ids)
        af.detach(model)
    assert torch.allclose(unmerged, merged, atol=1e-4)


def test_quantize_int8_and_int4_errors_are_small_and_reported():
    src = lora(hidden=32, r=8)
    # per module: A [8, 32] and B [32, 8] in fp32 = 2048 B; int8: 512 codes + (8 + 32) fp32 row scales;
    # int4 (groups of 64): 2 x (128 B of nibbles + 4 fp16 scales)
    for bits, limit, stored in [(8, 0.02, 512 + 40 * 4), (4, 0.25, 2 * (128 + 4 * 2))]:
        out = compress_adapter(src, steps=[{"method": "quantize", "bits": bits}])
        rec = out.manifest["compression"]
        assert 0 < rec["dW_rel_error_max"] < limit
        assert rec["tensor_bytes"] == out.nbytes() == 4 * stored
        assert rec["tensor_ratio"] == round(2048 / stored, 4)


def test_steps_compose_and_later_steps_skip_encoded_roles(tmp_path):
    src = lora(hidden=32, r=8, singular=[4.0, 2.0, 1.0, 0.1, 0.05, 0.02, 0.01, 0.0])
    out = compress_adapter(src, steps=[{"method": "resize", "rank": 3}, {"method": "compeft", "density": 0.3},
                                       {"method": "quantize", "bits": 8}])
    entry = out.modules["model.layers.0.self_attn.q_proj"]
    assert {s["codec"] for s in entry["encoding"].values()} == {"ternary"}
    assert out.shape("model.layers.0.self_attn.q_proj.lora_A.signs")[0] == math.ceil(math.ceil(0.3 * 96) / 8)
    loaded = af.validate(af.save(out, tmp_path / "c"))
    for path in src.modules:  # the reported error is the one the saved file gives
        err = float((dw(loaded, path) - dw(src, path)).norm() / dw(src, path).norm())
        assert loaded.manifest["compression"]["module_errors"][path] == pytest.approx(err, rel=1e-6)


def test_bad_steps_are_refused_with_the_options_named():
    src = lora()
    with pytest.raises(af.UnsupportedError, match="unknown method 'zip'"):
        compress_adapter(src, steps=[{"method": "zip"}])
    with pytest.raises(af.UnsupportedError, match="unknown option 'densty'"):
        compress_adapter(src, steps=[{"method": "compeft", "densty": 0.1}])
    with pytest.raises(af.UnsupportedError, match="bits=8 or bits=4"):
        compress_adapter(src, steps=[{"method": "quantize", "bits": 3}])


def test_the_method_verb_delegates_to_compress_adapter():
    out = af.registry.verb("lora", "compress")(lora(), steps=[{"method": "resize", "rank": 1}])
    assert out.manifest["compression"]["steps"] == [{"method": "resize", "rank": 1}]


def test_output_divergence_on_a_base_is_zero_for_an_exact_step_and_positive_for_a_lossy_one():
    model = build_tiny(seed=0)
    src = lora(hidden=64, r=4, layers=2, seed=1)
    exact = compress_adapter(src, steps=[{"method": "resize", "rank": 4}], base=model)
    lossy = compress_adapter(src, steps=[{"method": "compeft", "density": 0.05}], base=model)
    e, lo = exact.manifest["compression"]["output"], lossy.manifest["compression"]["output"]
    assert e["rel_error"] < 1e-4 and e["top1_agreement"] == 1.0
    assert lo["rel_error"] > 0.05 and lo["kl"] > 0 and lo["top1_agreement"] < 1.0
    assert af.attached(model) == []


# ----- bytes on disk and the CLI ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp16_lora(tmp_path_factory) -> str:
    """A Llama-shaped fp16 LoRA of realistic size per module: hidden 2048, r=16, q/k/v/o of one layer."""
    path = tmp_path_factory.mktemp("src") / "lora.safetensors"
    af.save(lora(hidden=2048, r=16, dtype=torch.float16, seed=3), path)
    return str(path)


@pytest.mark.parametrize("density,least", [(0.1, 12.0), (0.03, 30.0)])
def test_compeft_ratio_on_disk_against_the_fp16_original(tmp_path, fp16_lora, density, least):
    dst = tmp_path / "c.safetensors"
    res = runner.invoke(app, ["compress", fp16_lora, str(dst), "--density", str(density), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    before, after = file_bytes(af.load(fp16_lora)), dst.stat().st_size
    assert report["bytes_before"] == before and report["bytes_after"] == after
    assert report["ratio"] == pytest.approx(before / after) and report["ratio"] >= least
    loaded = af.load(dst)
    assert report["tensor_bytes"] == loaded.nbytes()


def test_cli_prints_sizes_errors_and_output_divergence(tmp_path):
    base = save_tiny(build_tiny(seed=0), tmp_path / "base")
    src = af.save(lora(hidden=64, r=4, layers=2, seed=1), tmp_path / "src")
    dst = tmp_path / "out"
    res = runner.invoke(app, ["compress", str(src), str(dst), "--rank", "2", "--density", "0.2",
                              "--base", str(base)])
    assert res.exit_code == 0, res.output
    before, after = file_bytes(af.load(src)), file_bytes(af.load(dst))
    assert f"{before:,} B" in res.stdout and f"{after:,} B" in res.stdout
    assert "dW relative error: max" in res.stdout and "output divergence" in res.stdout
    inspected = runner.invoke(app, ["inspect", str(dst), "--modules"])
    assert inspected.exit_code == 0 and "lora_A:ternary" in inspected.stdout and "resize(rank=2)" in inspected.stdout
    refused = runner.invoke(app, ["compress", str(src), str(dst), "--bits", "8"])
    assert refused.exit_code == 1 and "exists" in refused.output


def test_cli_steps_json_runs_in_the_given_order(tmp_path):
    src = af.save(lora(hidden=32, r=4), tmp_path / "src")
    steps = json.dumps([{"method": "quantize", "bits": 4, "group_size": 32}, {"method": "resize", "rank": 2}])
    res = runner.invoke(app, ["compress", str(src), str(tmp_path / "o"), "--steps", steps, "--json"])
    assert res.exit_code == 0, res.output
    out = af.load(tmp_path / "o")
    assert [s["method"] for s in json.loads(res.stdout)["steps"]] == ["quantize", "resize"]
    assert "encoding" not in out.modules["model.layers.0.self_attn.q_proj"]  # resize re-wrote the factors
