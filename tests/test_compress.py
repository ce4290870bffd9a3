"""``compress``: resize / compeft / quantize steps, their composition, the errors they report, the bytes on
disk (against the fp16 original), output divergence on a base model, and the ``adapter compress`` CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from adapterfmt.cli.main import app
from typer.testing import CliRunner

import adapterfmt as af
from adapterfmt.tiny import build_tiny, save_tiny
from adapterfmt.verbs.compress import compress_adapter, resize_rank
from adapterfmt.verbs.summary import file_bytes

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
def reference_compeft(state_dict: dict[str, torch.Tensor], k: float, replace_factor: float) -> dict[str, torch.Tensor]:
    """ComPEFT's reference code, transcribed: ``get_compressed_lora_weights`` (replace_factor > 0 branch) with
    ``state_dict_to_vector``, ``topk_values_mask`` and ``vector_to_state_dict``, all in
    prateeky2806/ComPEFT ``src/qlora/ties_utils.py``. ``k`` is the density in percent."""
    keys = sorted(state_dict)
    tv = torch.nn.utils.parameters_to_vector([state_dict[key].reshape(-1) for key in keys])
    std = tv.std()
    K = k / 100 if k > 1 else k
    M = tv.unsqueeze(0)
    d = M.shape[1]
    kth_values, _ = M.abs().kthvalue(d - int(d * K), dim=1, keepdim=True)
    mask = (M.abs() >= kth_values).squeeze()
    updated = (replace_factor * std) * (tv * mask).sign()
    return dict(zip(keys, updated.split([state_dict[key].numel() for key in keys]), strict=True))


def peft_state_dict(adapter: af.Adapter) -> dict[str, torch.Tensor]:
    """The adapter's factors under PEFT's state-dict names."""
    return {f"base_model.model.{p}.{r}.weight": adapter.tensor(f"{p}.{r}") for p in adapter.modules
            for r in ("lora_A", "lora_B")}


@pytest.mark.parametrize(("pct", "alpha"), [(5, 1.0), (30, 2.5), (99.5, 0.5)])
def test_compeft_default_is_the_reference_bit_for_bit_one_scale_over_the_whole_lora(pct, alpha):
    src = lora(hidden=8, r=2, layers=12, seed=5)  # 12 layers: "layers.1" < "layers.10" < "layers.2" by name
    tensors = src.tensors()
    tensors["model.layers.3.self_attn.v_proj.lora_B"] = torch.zeros(8, 2)  # zeros: sign 0 when kept (99.5%)
    src = af.Adapter(src.manifest, tensors)
    want = reference_compeft(peft_state_dict(src), pct, alpha)
    out = compress_adapter(src, steps=[{"method": "compeft", "density": pct / 100, "factor": alpha}])
    alpha_std = float(alpha * torch.cat([t.reshape(-1) for _, t in sorted(peft_state_dict(src).items())]).std())
    kept = 0
    for path, entry in out.modules.items():
        assert set(entry["encoding"]) == {"lora_A", "lora_B"}
        for role, spec in entry["encoding"].items():
            got, ref = out.module_tensors(path)[role], want[f"base_model.model.{path}.{role}.weight"]
            assert torch.equal(got, ref.reshape(got.shape))  # signs, mask and the scale, bit for bit
            assert torch.equal(got != 0, ref.reshape(got.shape) != 0)
            assert out.tensor(f"{path}.{role}.scales").tolist() == [alpha_std]  # the one scale, in every tensor
            kept += spec["count"]
    assert kept == sum(int((t != 0).sum()) for t in want.values())


def test_compeft_stc_is_a_named_option_and_mean_its_old_spelling():
    src = lora(hidden=20, r=3, layers=2, seed=4)
    stc = compress_adapter(src, steps=[{"method": "compeft", "density": 0.2, "scale": "stc"}])
    old = compress_adapter(src, steps=[{"method": "compeft", "density": 0.2, "scale": "mean"}])
    flat = torch.cat([t.reshape(-1) for _, t in sorted(src.tensors().items())])
    keep = flat.abs() >= flat.abs().kthvalue(flat.numel() - int(flat.numel() * 0.2)).values
    for path in src.modules:
        for role in ("lora_A", "lora_B"):
            assert torch.equal(stc.tensor(f"{path}.{role}.scales"), old.tensor(f"{path}.{role}.scales"))
            assert float(stc.tensor(f"{path}.{role}.scales")) == pytest.approx(float(flat[keep].abs().mean()))
    with pytest.raises(af.UnsupportedError, match="'std' \\(ComPEFT\\) or 'stc'.*got 'median'"):
        compress_adapter(src, steps=[{"method": "compeft", "density": 0.2, "scale": "median"}])
    with pytest.raises(af.UnsupportedError, match="scope must be 'adapter' or 'tensor'"):
        compress_adapter(src, steps=[{"method": "compeft", "density": 0.2, "scope": "layer"}])


def test_compeft_per_tensor_keeps_the_references_top_k_and_std_of_each_factor():
    src = lora(hidden=20, r=3)
    out = compress_adapter(src, steps=[{"method": "compeft", "density": 0.5, "scope": "tensor", "factor": 2.5}])
    for path, entry in out.modules.items():
        for role, spec in entry["encoding"].items():
            orig = src.tensor(f"{path}.{role}")
            want = reference_compeft({"t": orig}, 50, 2.5)["t"].reshape(orig.shape)
            assert spec["count"] == int(0.5 * 60) + 1  # the reference keeps |x| >= the k-th smallest
            assert torch.equal(out.module_tensors(path)[role], want)


def test_compeft_over_the_adapter_keeps_the_global_top_magnitudes():
    src = lora(hidden=20, r=3, seed=4)
    out = compress_adapter(src, steps=[{"method": "compeft", "density": 0.2}])
    kept, dropped, count = [], [], 0
    for path, entry in out.modules.items():
        for role, spec in entry["encoding"].items():
            orig = src.tensor(f"{path}.{role}").abs().reshape(-1)
            mask = out.module_tensors(path)[role].reshape(-1) != 0
            kept.append(orig[mask])
            dropped.append(orig[~mask])
            count += spec["count"]
    assert count == int(0.2 * 8 * 60) + 1
    assert float(torch.cat(kept).min()) >= float(torch.cat(dropped).max())


def test_compeft_on_dw_stores_ternary_modules_that_apply_like_their_delta():
    model = build_tiny(seed=1)
    src = lora(hidden=64, r=4, layers=2, seed=2)
    out = compress_adapter(src, steps=[{"method": "compeft", "density": 0.05, "target": "delta"}])
    assert {e["kind"] for e in out.modules.values()} == {"ternary"}
    assert sum(e["params"]["count"] for e in out.modules.values()) == int(0.05 * 8 * 64 * 64) + 1
    scales = {float(out.tensor(f"{path}.scales")) for path in out.modules}
    deltas = torch.cat([dw(src, path).float().reshape(-1) for path in sorted(src.modules)])
    assert scales == {float(deltas.std())}  # one alpha * std over every module's dW
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
    count = entry["encoding"]["lora_A"]["count"]
    assert out.shape("model.layers.0.self_attn.q_proj.lora_A.signs")[0] == math.ceil(count / 8)
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
    unknown = runner.invoke(app, ["compress", str(src), str(tmp_path / "u"), "--density", "0.2", "--scale", "median"])
    assert unknown.exit_code == 1 and "got 'median'" in unknown.output and not (tmp_path / "u").exists()
    assert len(unknown.output.strip().splitlines()) == 1
    old = runner.invoke(app, ["compress", str(src), str(tmp_path / "m"), "--density", "0.2", "--scale", "mean",
                              "--scope", "tensor", "--json"])
    assert old.exit_code == 0, old.output
    assert json.loads(old.stdout)["steps"] == [{"method": "compeft", "density": 0.2, "scope": "tensor",
                                                "scale": "mean", "factor": 1.0, "target": "params"}]


def test_cli_steps_json_runs_in_the_given_order(tmp_path):
    src = af.save(lora(hidden=32, r=4), tmp_path / "src")
    steps = json.dumps([{"method": "quantize", "bits": 4, "group_size": 32}, {"method": "resize", "rank": 2}])
    res = runner.invoke(app, ["compress", str(src), str(tmp_path / "o"), "--steps", steps, "--json"])
    assert res.exit_code == 0, res.output
    out = af.load(tmp_path / "o")
    assert [s["method"] for s in json.loads(res.stdout)["steps"]] == ["quantize", "resize"]
    assert "encoding" not in out.modules["model.layers.0.self_attn.q_proj"]  # resize re-wrote the factors
