"""Honest reports and no slow paths (issue 14): a lossy or capped SVD merge says what it kept per module, an
element-wise merge of LoRAs says it is dense (or re-factors exactly), extract never stores factors larger
than the tensor and refuses two identical checkpoints, and every lowrank resize works on the factors (QR of
B and A^T, SVD of the small core), never on the dense dW. The reference figures come from a plain dense SVD
of the summed dW."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers_cli import MODULES, cli, lora, tiny_setup
from helpers_spec import tree

import adapterfmt as af
from adapterfmt.tiny import build_tiny, save_tiny


def dense_sum(*adapters: af.Adapter) -> dict[str, torch.Tensor]:
    """Each module's summed dW, fp64, written out: scale * B @ A per input."""
    out: dict[str, torch.Tensor] = {}
    for ad in adapters:
        for m, e in ad.modules.items():
            t = ad.module_tensors(m)
            d = e["params"]["scale"] * t["lora_B"].double() @ t["lora_A"].double()
            out[m] = out.get(m, 0) + d
    return out


def merged_delta(ad: af.Adapter, m: str) -> torch.Tensor:
    return af.registry.get_kind(ad.modules[m]["kind"]).delta(ad.modules[m], ad.module_tensors(m)).double()


def merge_record(ad: af.Adapter) -> dict:
    return next(p for p in ad.manifest["provenance"] if p["tool"] == "adapterfmt merge")


def test_svd_below_the_sum_of_ranks_reports_energy_and_error(tmp_path: Path) -> None:
    a, b = lora(1), lora(2)
    merged = af.merge_adapters([a, b], strategy="svd", rank=3)
    exact = dense_sum(a, b)
    record = merge_record(merged)
    for m in MODULES:
        s = torch.linalg.svdvals(exact[m])
        want_energy = float(s[:3].square().sum() / s.square().sum())
        info = record["modules"][m]
        assert info["rank"] == 3 and info["rank_in"] == 8
        assert info["energy"] == pytest.approx(want_energy, abs=1e-8)
        got_err = float((merged_delta(merged, m) - exact[m]).norm() / exact[m].norm())
        assert info["rel_error"] == pytest.approx(got_err, rel=1e-4)
    assert record["notes"][0].startswith("lossy: 4 of 4 module(s) re-factored below their rank; worst ")
    af.save(a, tmp_path / "a")
    af.save(b, tmp_path / "b")
    r = cli("merge", tmp_path / "a", tmp_path / "b", "--strategy", "svd", "--rank", "3", "--out", tmp_path / "ab")
    assert r.exit_code == 0, r.output
    assert "note: lossy: 4 of 4 module(s)" in r.stderr and "re-factored modules (worst first)" in r.stdout
    r = cli("merge", tmp_path / "a", tmp_path / "b", "--strategy", "svd", "--rank", "3", "--out", tmp_path / "j",
            "--json")
    report = json.loads(r.stdout)
    assert report["module_report"] == record["modules"] and report["notes"] == record["notes"]


def test_svd_rank_above_the_sum_is_capped_and_said(tmp_path: Path) -> None:
    a, b = lora(1), lora(2)
    merged = af.merge_adapters([a, b], strategy="svd", rank=20)
    record = merge_record(merged)
    exact = dense_sum(a, b)
    for m in MODULES:
        assert record["modules"][m]["rank"] == 8 and record["modules"][m]["capped_from"] == 20
        assert record["modules"][m]["rel_error"] < 1e-7
        torch.testing.assert_close(merged_delta(merged, m), exact[m], rtol=0, atol=1e-6)
    assert any(n.startswith("--rank 20 is above what the merged dW has in 4 module(s)") for n in record["notes"])
    assert not any(n.startswith("lossy") for n in record["notes"])


def test_elementwise_merges_of_loras_say_dense_or_refactor_exactly() -> None:
    a, b = lora(1), lora(2)
    ties = af.merge_adapters([a, b], strategy="ties", density=0.5)
    assert {e["kind"] for e in ties.modules.values()} == {"dense"}
    note = merge_record(ties)["notes"][0]
    assert note.startswith("ties of lowrank inputs is not lowrank: 4 module(s) stored dense (the sum of the input "
                           "ranks would lose up to ") and note.endswith("; --rank or --energy re-factors them")
    refactored = af.merge_adapters([a, b], strategy="ties", density=0.5, rank=6)
    info = merge_record(refactored)["modules"][MODULES[0]]
    dense = merged_delta(ties, MODULES[0])
    s = torch.linalg.svdvals(dense)
    assert info["rank"] == 6 and info["energy"] == pytest.approx(float(s[:6].square().sum() / s.square().sum()),
                                                                  abs=1e-6)
    # nothing dropped: the element-wise result is the exact sum, so it goes back to rank 4 + 4, said so
    dare = af.merge_adapters([a, b], strategy="dare_linear", density=1.0)
    assert {e["kind"] for e in dare.modules.values()} == {"lowrank"}
    assert {dare.shape(f"{m}.lora_A")[0] for m in MODULES} == {8}
    assert merge_record(dare)["notes"] == ["4 module(s) re-factored to the sum of the input ranks, within 1e-06 of dW"]
    exact = dense_sum(a, b)
    for m in MODULES:
        torch.testing.assert_close(merged_delta(dare, m), exact[m], rtol=0, atol=1e-6)


@pytest.fixture
def checkpoints(tmp_path: Path) -> dict[str, Path]:
    return tiny_setup(tmp_path)


def test_extract_stores_dense_when_factors_would_be_larger(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    model = build_tiny(seed=0)
    noise = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # a full-rank change: 99% of its energy needs far more than rank 32 of a 64 x 64 matrix
        model.get_submodule(MODULES[0]).weight.add_(0.05 * noise)
    full = save_tiny(model, tmp_path / "full")
    adapter, report = af.extract_adapter(checkpoints["base"], full, energy=0.99)
    assert adapter.modules[MODULES[0]]["kind"] == "dense"
    (line,) = report.stored_dense
    rank = int(line.split("(rank ")[1].split(":")[0])
    assert rank * 128 >= 64 * 64 and line == f"{MODULES[0]} (rank {rank}: {rank * 128:,} values, dense 4,096)"
    (m,) = report.modules
    assert m.kind == "dense" and m.captured == 1.0
    r = cli("extract", "--base", checkpoints["base"], "--finetuned", full, "--energy", "0.99", "--out", tmp_path / "p")
    assert r.exit_code == 0 and f"note: stored dense, its lowrank factors would be no smaller: {line}" in r.stderr


def test_extract_of_identical_checkpoints_is_an_error(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(af.UnsupportedError, match="no module differs"):
        af.extract_adapter(checkpoints["base"], checkpoints["base"], rank=2)
    before = tree(tmp_path)
    r = cli("extract", "--base", checkpoints["base"], "--finetuned", checkpoints["base"], "--rank", "2",
            "--out", tmp_path / "empty")
    assert r.exit_code == 1 and "no module differs" in r.stderr
    assert tree(tmp_path) == before


def test_compress_resize_never_runs_a_dense_svd(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    modules = {"m.layers.0.proj": af.lowrank_entry([96, 160], scale=0.5)}
    tensors = {"m.layers.0.proj.lora_A": torch.randn(8, 160, generator=g),
               "m.layers.0.proj.lora_B": torch.randn(96, 8, generator=g) * 0.5 ** torch.arange(8)}
    adapter = af.Adapter(af.new_manifest("lora", modules), tensors)
    shapes = []
    real_svd = torch.linalg.svd

    def spy(x: torch.Tensor, *args, **kwargs):
        shapes.append(tuple(x.shape))
        return real_svd(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    small = af.compress_adapter(adapter, steps=[{"method": "resize", "rank": 3}])
    monkeypatch.undo()
    assert shapes and all(max(s) <= 8 for s in shapes), shapes  # only the 8 x 8 core
    dw = 0.5 * tensors["m.layers.0.proj.lora_B"].double() @ tensors["m.layers.0.proj.lora_A"].double()
    u, s, vh = torch.linalg.svd(dw)
    best = u[:, :3] * s[:3] @ vh[:3]
    got = merged_delta(small, "m.layers.0.proj")
    torch.testing.assert_close(got, best, rtol=0, atol=1e-5)
    err = small.manifest["compression"]["module_errors"]["m.layers.0.proj"]
    assert err == pytest.approx(math.sqrt(float(s[3:].square().sum() / s.square().sum())), rel=1e-5)
