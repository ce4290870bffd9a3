"""`adapter extract`: patches from full fine-tunes, checked against known changes and independent SVDs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapterfmt.cli.main import app
from helpers_port import CHANGED, TRUE_RANK, lowrank_change, rel, tiny_pair, tuned_copy
from safetensors.torch import load_file
from typer.testing import CliRunner

import adapterfmt as af
from adapterfmt.tiny import build_tiny
from adapterfmt.verbs import extract as ex


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    return tiny_pair(tmp_path)


def checkpoint_diff(base: Path, tuned: Path) -> dict[str, torch.Tensor]:
    b, t = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    return {n.removesuffix(".weight"): t[n].double() - b[n].double() for n in b}


def stored_delta(adapter: af.Adapter, module: str) -> torch.Tensor:
    entry = adapter.modules[module]
    return af.registry.get_kind(entry["kind"]).delta(entry, adapter.module_tensors(module))


@pytest.mark.parametrize("opts", [{"energy": 0.999999}, {"rank": TRUE_RANK}, {"rank": 8}])
def test_lowrank_recovers_known_change(pair, opts, tmp_path):
    base, tuned, changes = pair
    adapter, report = ex.extract_adapter(base, tuned, form="lowrank", **opts)
    assert sorted(adapter.modules) == sorted(CHANGED)  # unchanged modules left out
    assert report.unchanged == 21 - len(CHANGED)
    for m, true in changes.items():
        assert rel(stored_delta(adapter, m), true) < 1e-5
    ranks = adapter.config["ranks"]
    if "energy" in opts:
        assert set(ranks.values()) == {TRUE_RANK}
    else:
        assert set(ranks.values()) == {opts["rank"]}
    assert adapter.manifest["provenance"][0]["tool"] == "adapterfmt extract"
    assert adapter.base["fingerprint"] == af.fingerprint_checkpoint(base)
    af.validate(af.save(adapter, tmp_path / "patch"))


def test_embedding_is_stored_transposed_and_attaches(pair):
    base, tuned, _ = pair
    adapter, _ = ex.extract_adapter(base, tuned, form="lowrank", energy=0.999999)
    emb = adapter.modules["model.embed_tokens"]
    assert emb["params"]["transposed"] is True
    assert list(adapter.shape("model.embed_tokens.lora_A")) == [TRUE_RANK, 128]  # [r, vocab], as PEFT
    model = build_tiny(0)
    tuned_model, _ = tuned_copy(build_tiny(0))
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        af.attach(model, adapter)
        assert torch.allclose(model(ids), tuned_model(ids), atol=1e-5)


def test_captured_fraction_matches_independent_svd(pair):
    base, tuned, _ = pair
    adapter, report = ex.extract_adapter(base, tuned, form="lowrank", rank=2)
    diffs = checkpoint_diff(base, tuned)
    for m in report.modules:
        s = torch.linalg.svdvals(diffs[m.module])
        expected = float((s[:2] ** 2).sum() / (s**2).sum())
        assert m.captured == pytest.approx(expected, abs=1e-6)
        assert expected < 0.95  # rank 2 of a rank-3 change really loses something
        assert m.rel_error == pytest.approx((1 - expected) ** 0.5, rel=1e-4)
        assert m.captured == pytest.approx(1 - rel(stored_delta(adapter, m.module), diffs[m.module]) ** 2, abs=1e-6)


def test_cli_prints_the_captured_fraction(pair, tmp_path):
    base, tuned, _ = pair
    res = CliRunner().invoke(app, ["extract", "--base", str(base), "--finetuned", str(tuned), "--out",
                                   str(tmp_path / "p"), "--rank", "2", "--json"])
    assert res.exit_code == 0, res.output
    printed = {m["module"]: m["captured"] for m in json.loads(res.stdout)["modules"]}
    diffs = checkpoint_diff(base, tuned)
    for module, captured in printed.items():
        s = torch.linalg.svdvals(diffs[module])
        assert captured == pytest.approx(float((s[:2] ** 2).sum() / (s**2).sum()), abs=1e-6)
    saved = af.validate(tmp_path / "p")
    assert saved.config["ranks"] == dict.fromkeys(printed, 2)
    table = CliRunner().invoke(app, ["extract", "--base", str(base), "--finetuned", str(tuned), "--out",
                                     str(tmp_path / "q"), "--energy", "0.999999"])
    assert table.exit_code == 0 and "1.000000" in table.output and "captured" in table.output


def test_randomized_svd_path(pair, monkeypatch):
    base, tuned, changes = pair
    monkeypatch.setattr(ex, "RANDOMIZED_MIN_DIM", 8)
    for opts in ({"energy": 0.999999}, {"rank": TRUE_RANK}):
        adapter, report = ex.extract_adapter(base, tuned, form="lowrank", **opts)
        assert {m.rank for m in report.modules} == {TRUE_RANK}
        for m, true in changes.items():
            assert rel(stored_delta(adapter, m), true) < 1e-5


def test_randomized_energy_grows_rank_past_its_first_guess():
    gen = torch.Generator().manual_seed(3)
    d = lowrank_change((300, 200), gen, rank=40)
    u, s, v = ex.truncated_svd(d, rank=None, energy=0.9999999)
    assert s.numel() == 40
    assert rel(u @ torch.diag(s) @ v.T, d) < 1e-4


def test_energy_threshold_picks_smallest_rank():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert ex.choose_rank(s, rank=None, energy=16 / 22, max_rank=None) == 1
    assert ex.choose_rank(s, rank=None, energy=0.8, max_rank=None) == 2
    assert ex.choose_rank(s, rank=None, energy=0.99, max_rank=None) == 4
    assert ex.choose_rank(s, rank=None, energy=0.99, max_rank=3) == 3


def test_sparse_keeps_top_k(pair):
    base, tuned, _ = pair
    adapter, report = ex.extract_adapter(base, tuned, form="sparse", top_k=50)
    diffs = checkpoint_diff(base, tuned)
    for m in report.modules:
        d = diffs[m.module].reshape(-1)
        idx = adapter.tensor(f"{m.module}.indices")
        assert torch.equal(idx, d.abs().topk(50).indices.sort().values)
        assert m.captured == pytest.approx(float(d[idx].square().sum() / d.square().sum()), abs=1e-6)
    assert adapter.method == "sparse_ft"
    by_density, _ = ex.extract_adapter(base, tuned, form="sparse", density=0.01)
    assert by_density.shape("model.embed_tokens.values") == (82,)  # ceil(0.01 * 128 * 64)
    af.validate(by_density)


def test_dense_with_biases_and_norms_merges_to_the_finetune(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    base = GPT2LMHeadModel(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    tuned = GPT2LMHeadModel(cfg).eval()
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        tuned.transformer.h[0].attn.c_attn.weight.add_(0.01 * torch.randn(16, 48))
        tuned.transformer.h[0].attn.c_attn.bias.add_(0.01 * torch.randn(48))
        tuned.transformer.h[1].ln_2.weight.add_(0.1)
        tuned.transformer.h[1].mlp.c_proj.bias.add_(0.05)  # bias only: its own dense entry
    tuned.save_pretrained(tmp_path / "tuned")
    ids = torch.randint(0, 50, (2, 7))
    for form, opts in (("dense", {}), ("lowrank", {"energy": 1.0})):
        adapter, report = ex.extract_adapter(tmp_path / "base", tmp_path / "tuned", form=form, **opts)
        assert sorted(adapter.modules) == ["transformer.h.0.attn.c_attn", "transformer.h.1.ln_2",
                                           "transformer.h.1.mlp.c_proj"]
        assert adapter.modules["transformer.h.1.mlp.c_proj"]["parameter"] == "bias"
        assert report.unplaced == []
        if form == "lowrank":  # a full-rank 16 x 48 change: rank-16 factors (1024 values) would outgrow it
            assert adapter.modules["transformer.h.0.attn.c_attn"]["kind"] == "dense"
            assert report.stored_dense == ["transformer.h.0.attn.c_attn (rank 16: 1,024 values, dense 768)"]
        model = GPT2LMHeadModel(cfg).eval()
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            af.attach(model, adapter)
            assert torch.allclose(model(ids).logits, tuned(ids).logits, atol=1e-5)
            af.detach(model)
            af.attach(model, adapter, merge=True)
        for (n, p), q in zip(model.state_dict().items(), tuned.state_dict().values()):
            assert torch.allclose(p, q, atol=1e-6), n
    adapter, report = ex.extract_adapter(tmp_path / "base", tmp_path / "tuned", form="lowrank", rank=2)
    assert report.stored_dense == []  # config.json says gpt2: Conv1D layers are stored [in, out]
    assert adapter.modules["transformer.h.0.attn.c_attn"]["params"]["transposed"] is True


def test_sparse_cannot_hold_a_bias_beside_its_weight_and_says_so(tmp_path):
    from torch import nn

    from adapterfmt.format.safetensors_io import write_file

    lin = nn.Linear(4, 3)
    state = {f"lin.{k}": v.detach().clone() for k, v in lin.state_dict().items()}
    write_file(tmp_path / "b.safetensors", state)
    write_file(tmp_path / "t.safetensors", {k: v + 1 for k, v in state.items()})
    adapter, report = ex.extract_adapter(tmp_path / "b.safetensors", tmp_path / "t.safetensors",
                                         form="sparse", density=1.0)
    assert report.unplaced == ["lin.bias"]
    assert adapter.manifest["provenance"][0]["unplaced"] == ["lin.bias"]


def test_stored_dtype(pair):
    base, tuned, changes = pair
    adapter, _ = ex.extract_adapter(base, tuned, form="lowrank", rank=TRUE_RANK, dtype="BF16")
    assert adapter.stored_dtype("model.embed_tokens.lora_A") == "BF16"
    assert rel(stored_delta(adapter, "model.embed_tokens"), changes["model.embed_tokens"]) < 2e-2


def test_refuses_another_architecture(tmp_path):
    from adapterfmt.tiny import TinyConfig, save_tiny

    save_tiny(build_tiny(0), tmp_path / "a")
    save_tiny(build_tiny(0, TinyConfig(hidden=32, intermediate=64)), tmp_path / "b")
    with pytest.raises(af.BaseMismatchError, match=r"model.embed_tokens.weight: base \[128, 64\], fine-tuned \[128, 32\]"):
        ex.extract_adapter(tmp_path / "a", tmp_path / "b", form="dense")
    res = CliRunner().invoke(app, ["extract", "--base", str(tmp_path / "a"), "--finetuned", str(tmp_path / "b"),
                                   "--out", str(tmp_path / "out"), "--form", "dense"])
    assert res.exit_code == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("opts", "msg"), [
    ({"form": "lowrank"}, "exactly one of rank or energy"),
    ({"form": "lowrank", "rank": 2, "energy": 0.9}, "exactly one of rank or energy"),
    ({"form": "lowrank", "energy": 1.5}, "energy must be in"),
    ({"form": "sparse"}, "exactly one of density or top_k"),
    ({"form": "svd"}, "unknown extract form"),
    ({"form": "dense", "dtype": "F12"}, "unknown dtype"),
])
def test_bad_options(pair, opts, msg):
    base, tuned, _ = pair
    with pytest.raises(af.FormatError, match=msg):
        ex.extract_adapter(base, tuned, **opts)
