"""Adapter-level merges in delta space: exactness of linear / cat / svd, best rank-k truncation, and the
element-wise strategies (ties, dare, magnitude_prune) against a plain dense reference, on mixed ranks,
layouts (Linear, Conv1D, Conv2d) and kinds (lowrank, dense, sparse)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from adapterfmt.cli.main import app
from helpers_merge import CONV1D, CONV2D, LINEAR, adapter_delta, dense, lowrank, make, ref_bias, ref_delta, sparse
from peft.utils import merge_utils
from typer.testing import CliRunner

import adapterfmt as af
from adapterfmt.verbs.merge import merge_adapters, module_seed, relative_error

WEIGHTS = [0.7, -1.3, 2.0]


@pytest.fixture
def inputs() -> list[tuple[af.Adapter, dict]]:
    """Three adapters of mixed ranks and scales (one rsLoRA-scaled, one with a LoRA bias); each with its raw parts."""
    gen = torch.Generator().manual_seed(3)
    specs = [
        {LINEAR[0]: lowrank(LINEAR[1], 2, 2.0, gen), CONV1D[0]: lowrank(CONV1D[1], 2, 2.0, gen, transposed=True),
         CONV2D[0]: lowrank(CONV2D[1], 2, 0.5, gen)},
        {LINEAR[0]: lowrank(LINEAR[1], 5, 16 / 5 ** 0.5, gen),  # rsLoRA: alpha / sqrt(r)
         CONV1D[0]: lowrank(CONV1D[1], 4, 1.0, gen, transposed=True)},
        {LINEAR[0]: lowrank(LINEAR[1], 3, 0.25, gen, bias=True), CONV2D[0]: lowrank(CONV2D[1], 1, 3.0, gen)},
    ]
    return [(make(s), s) for s in specs]


def exact_sum(parts: list[dict], weights: list[float], module: str) -> torch.Tensor:
    return sum(w * ref_delta(*p[module]) for w, p in zip(weights, parts, strict=True) if module in p)


@pytest.mark.parametrize("strategy", ["linear", "cat"])
def test_linear_and_cat_are_exact_with_ranks_adding(inputs, strategy, tmp_path):
    adapters, parts = zip(*inputs, strict=True)
    merged = merge_adapters(adapters, weights=WEIGHTS, strategy=strategy)
    for module in (LINEAR[0], CONV1D[0], CONV2D[0]):
        exact = exact_sum(parts, WEIGHTS, module)
        assert relative_error(adapter_delta(merged, module), exact) < 1e-6
        entry = merged.modules[module]
        assert entry["kind"] == "lowrank" and entry["params"]["scale"] == 1.0
        assert merged.tensor(f"{module}.lora_A").shape[0] == sum(p[module][1]["lora_A"].shape[0]
                                                                 for p in parts if module in p)
    assert merged.modules[CONV1D[0]]["params"]["transposed"] is True
    bias = merged.tensor(f"{LINEAR[0]}.bias").double()
    assert torch.allclose(bias, WEIGHTS[2] * ref_bias(*parts[2][LINEAR[0]]), rtol=1e-6, atol=1e-7)
    # the config says alpha = r for every module, so it agrees with the stored scale 1
    cfg = merged.config
    for module in merged.modules:
        r = af.pattern_value(cfg["rank_pattern"], module, cfg["r"])
        assert merged.tensor(f"{module}.lora_A").shape[0] == r
        assert af.pattern_value(cfg["alpha_pattern"], module, cfg["alpha"]) / r == 1.0
    out = af.save(merged, tmp_path / "merged")
    again = af.validate(out)
    assert relative_error(adapter_delta(again, LINEAR[0]), exact_sum(parts, WEIGHTS, LINEAR[0])) < 1e-6


def test_full_rank_svd_is_exact(inputs):
    adapters, parts = zip(*inputs, strict=True)
    merged = merge_adapters(adapters, weights=WEIGHTS, strategy="svd", rank=10)
    for module in (LINEAR[0], CONV1D[0], CONV2D[0]):
        assert relative_error(adapter_delta(merged, module), exact_sum(parts, WEIGHTS, module)) < 1e-6


def test_truncated_svd_is_the_best_rank_k_approximation(inputs):
    adapters, parts = zip(*inputs, strict=True)
    for k in (1, 3, 6):
        merged = merge_adapters(adapters, weights=WEIGHTS, strategy="svd", rank=k)
        for module in (LINEAR[0], CONV1D[0], CONV2D[0]):
            exact = exact_sum(parts, WEIGHTS, module)
            f = exact.T if module == CONV1D[0] else exact.reshape(exact.shape[0], -1)
            u, s, vh = torch.linalg.svd(f, full_matrices=False)
            best = (u[:, :k] * s[:k]) @ vh[:k]
            got = adapter_delta(merged, module)
            got = got.T if module == CONV1D[0] else got.reshape(got.shape[0], -1)
            assert merged.tensor(f"{module}.lora_A").shape[0] == min(k, int((s > 1e-9 * s[0]).sum()))
            assert relative_error(got, best) < 1e-5
            tail = float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())
            assert abs(relative_error(got, f) - tail) < 1e-5


def test_svd_energy_threshold_keeps_the_smallest_sufficient_rank(inputs):
    adapters, parts = zip(*inputs, strict=True)
    merged = merge_adapters(adapters, weights=WEIGHTS, strategy="svd", energy=0.9)
    exact = exact_sum(parts, WEIGHTS, LINEAR[0])
    s = torch.linalg.svdvals(exact)
    frac = (s.square().cumsum(0) / s.square().sum()).tolist()
    want = next(i + 1 for i, f in enumerate(frac) if f >= 0.9)
    assert merged.tensor(f"{LINEAR[0]}.lora_A").shape[0] == want
    err = relative_error(adapter_delta(merged, LINEAR[0]), exact)
    assert err ** 2 <= 0.1 + 1e-9


def test_svd_default_rank_is_the_largest_input_rank(inputs):
    adapters, _ = zip(*inputs, strict=True)
    merged = merge_adapters(adapters, weights=WEIGHTS, strategy="svd")
    assert merged.tensor(f"{LINEAR[0]}.lora_A").shape[0] == 5
    assert merged.tensor(f"{CONV2D[0]}.lora_A").shape[0] == 2


# ----- element-wise strategies against a plain dense reference --------------------------------------------
def ref_combine(deltas: list[torch.Tensor], weights: list[float], strategy: str, density: float, key: str,
                seed: int = 0, sign: str = "total") -> np.ndarray:
    """TIES / DARE / magnitude pruning written out on numpy arrays, one task vector at a time."""
    tasks = [w * d.numpy().astype(np.float64) for w, d in zip(weights, deltas, strict=True)]
    if strategy in ("ties", "magnitude_prune"):
        trimmed = []
        for t in tasks:
            flat = t.reshape(-1)
            keep = np.argsort(-np.abs(flat), kind="stable")[: int(density * flat.size)]
            out = np.zeros_like(flat)
            out[keep] = flat[keep]
            trimmed.append(out.reshape(t.shape))
        tasks = trimmed
    if strategy.startswith("dare"):  # the documented mask rule
        tasks = [t * (torch.rand(t.shape, generator=torch.Generator().manual_seed(module_seed(seed, key, i)))
                      < density).numpy() / density for i, t in enumerate(tasks)]
    if strategy in ("magnitude_prune", "dare_linear"):
        return sum(tasks)
    votes = sum(tasks) if sign == "total" else sum(np.sign(t) for t in tasks)
    elected = np.where(votes >= 0, 1.0, -1.0)
    num = sum(np.where(np.sign(t) == elected, t, 0.0) for t in tasks)
    cnt = sum((np.sign(t) == elected).astype(np.float64) for t in tasks)
    return num / np.maximum(cnt, 1.0)


@pytest.fixture
def mixed() -> tuple[list[af.Adapter], list[dict]]:
    """Four inputs on one Linear module: lowrank r=2, lowrank r=7 (with bias), dense, sparse."""
    gen = torch.Generator().manual_seed(5)
    shape = LINEAR[1]
    parts = [{LINEAR[0]: lowrank(shape, 2, 2.0, gen)}, {LINEAR[0]: lowrank(shape, 7, 0.5, gen, bias=True)},
             {LINEAR[0]: dense(shape, gen)}, {LINEAR[0]: sparse(shape, gen)}]
    return [make(p) for p in parts], parts


MIXED_WEIGHTS = [1.0, -0.6, 0.8, 1.5]


@pytest.mark.parametrize(("strategy", "sign"), [("ties", "total"), ("ties", "frequency"), ("dare_linear", "total"),
                                                 ("dare_ties", "total"), ("dare_ties", "frequency"),
                                                 ("magnitude_prune", "total")])
def test_elementwise_strategies_match_the_dense_reference(mixed, strategy, sign):
    adapters, parts = mixed
    merged = merge_adapters(adapters, weights=MIXED_WEIGHTS, strategy=strategy, density=0.4, seed=9, sign=sign)
    deltas = [ref_delta(*p[LINEAR[0]]) for p in parts]
    want = ref_combine(deltas, MIXED_WEIGHTS, strategy, 0.4, LINEAR[0], seed=9, sign=sign)
    got = adapter_delta(merged, LINEAR[0]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # biases follow the same strategy (only input 2 has one; the others count as zero)
    n = LINEAR[1][0]
    biases = [torch.zeros(n, dtype=torch.float64)] * 4
    biases[1] = ref_bias(*parts[1][LINEAR[0]])
    want_b = ref_combine(biases, MIXED_WEIGHTS, strategy, 0.4, f"{LINEAR[0]}.bias", seed=9, sign=sign)
    role = "bias_delta" if merged.modules[LINEAR[0]]["kind"] == "dense" else "bias"
    np.testing.assert_allclose(merged.tensor(f"{LINEAR[0]}.{role}").double().numpy(), want_b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["ties", "magnitude_prune"])
def test_ties_and_magnitude_prune_agree_with_peft_on_equal_weights(mixed, strategy):
    adapters, parts = mixed
    merged = merge_adapters(adapters[:3], weights=[1.0] * 3, strategy=strategy, density=0.3)
    deltas = [ref_delta(*p[LINEAR[0]]).float() for p in parts[:3]]
    peft_fn = getattr(merge_utils, strategy)
    want = peft_fn(deltas, torch.ones(3), 0.3)
    assert relative_error(adapter_delta(merged, LINEAR[0]), want.double()) < 1e-6


def test_dare_is_seeded_and_unbiased_at_full_density(mixed):
    adapters, parts = mixed
    a = merge_adapters(adapters, weights=MIXED_WEIGHTS, strategy="dare", density=0.5, seed=1)
    b = merge_adapters(adapters, weights=MIXED_WEIGHTS, strategy="dare_linear", density=0.5, seed=1)
    c = merge_adapters(adapters, weights=MIXED_WEIGHTS, strategy="dare_linear", density=0.5, seed=2)
    assert torch.equal(adapter_delta(a, LINEAR[0]), adapter_delta(b, LINEAR[0]))
    assert not torch.equal(adapter_delta(a, LINEAR[0]), adapter_delta(c, LINEAR[0]))
    full = merge_adapters(adapters, weights=MIXED_WEIGHTS, strategy="dare_linear", density=1.0)
    exact = exact_sum(parts, MIXED_WEIGHTS, LINEAR[0])
    assert relative_error(adapter_delta(full, LINEAR[0]), exact) < 1e-6


def test_linear_of_mixed_kinds_is_exact_and_dense(mixed):
    adapters, parts = mixed
    merged = merge_adapters(adapters, weights=MIXED_WEIGHTS)
    assert merged.modules[LINEAR[0]]["kind"] == "dense" and merged.method == "task_vector"
    assert relative_error(adapter_delta(merged, LINEAR[0]), exact_sum(parts, MIXED_WEIGHTS, LINEAR[0])) < 1e-6


def test_sparse_output_when_smaller_and_svd_when_a_rank_is_asked(mixed):
    adapters, parts = mixed
    sparse_out = merge_adapters(adapters[:1], strategy="magnitude_prune", density=0.05)
    assert sparse_out.modules[LINEAR[0]]["kind"] == "sparse" and sparse_out.method == "sparse_ft"
    nnz = int(0.05 * 24 * 16)
    assert sparse_out.tensor(f"{LINEAR[0]}.values").numel() == nnz
    dense_result = adapter_delta(merge_adapters(adapters, weights=MIXED_WEIGHTS, strategy="ties", density=0.5),
                                 LINEAR[0])
    ranked = merge_adapters(adapters, weights=MIXED_WEIGHTS, strategy="ties", density=0.5, rank=4)
    assert ranked.modules[LINEAR[0]]["kind"] == "lowrank"
    u, s, vh = torch.linalg.svd(dense_result, full_matrices=False)
    assert relative_error(adapter_delta(ranked, LINEAR[0]), (u[:, :4] * s[:4]) @ vh[:4]) < 1e-5


def test_output_dtype_follows_the_inputs_or_the_option():
    gen = torch.Generator().manual_seed(0)
    bf = make({LINEAR[0]: lowrank(LINEAR[1], 2, 1.0, gen, dtype=torch.bfloat16)})
    assert merge_adapters([bf, bf]).tensor(f"{LINEAR[0]}.lora_A").dtype == torch.bfloat16
    assert merge_adapters([bf], dtype="F32").tensor(f"{LINEAR[0]}.lora_A").dtype == torch.float32


# ----- refusals ---------------------------------------------------------------------------------------
def test_non_additive_kinds_are_refused_with_their_modules():
    gen = torch.Generator().manual_seed(0)
    entry, t = lowrank(LINEAR[1], 2, 1.0, gen)
    dora = make({LINEAR[0]: (entry, {**t, "magnitude": torch.rand(24, generator=gen) + 0.5})})
    ia3 = make({"m.v": ({"kind": "vector", "shape": [24, 16], "params": {"op": "scale", "side": "output"}},
                        {"vector": torch.rand(24, generator=gen)})}, method="ia3")
    with pytest.raises(af.UnsupportedError, match=r"m\.a \(lowrank, magnitude\).*m\.v \(vector\)"):
        merge_adapters([dora, ia3])


def test_cat_refuses_non_lowrank_inputs(mixed):
    adapters, _ = mixed
    with pytest.raises(af.UnsupportedError, match=r"cat needs every input lowrank.*m\.a.*dense, sparse"):
        merge_adapters(adapters, strategy="cat")


def test_bad_options_and_mismatched_inputs_are_refused(mixed):
    adapters, _ = mixed
    with pytest.raises(af.FormatError, match="density"):
        merge_adapters(adapters, strategy="ties")
    with pytest.raises(af.FormatError, match="unknown merge strategy"):
        merge_adapters(adapters, strategy="average_factors")
    with pytest.raises(af.FormatError, match="2 weight"):
        merge_adapters(adapters, weights=[1, 2])
    gen = torch.Generator().manual_seed(0)
    other = make({LINEAR[0]: lowrank([16, 24], 2, 1.0, gen)})
    with pytest.raises(af.FormatError, match=r"m\.a: weight \[24, 16\] in input 1, weight \[16, 24\] in input 2"):
        merge_adapters([adapters[0], other])


def test_inputs_for_different_bases_need_force():
    gen = torch.Generator().manual_seed(0)
    fp = {"algorithm": "adapterfmt-fp1", "structure": "a" * 64, "values": None, "tensors": 1}
    a = make({LINEAR[0]: lowrank(LINEAR[1], 2, 1.0, gen)}, base={"name": "x", "revision": None, "fingerprint": fp})
    b = make({LINEAR[0]: lowrank(LINEAR[1], 2, 1.0, gen)},
             base={"name": "y", "revision": None, "fingerprint": {**fp, "structure": "b" * 64}})
    with pytest.raises(af.BaseMismatchError, match="different bases"):
        merge_adapters([a, b])
    assert merge_adapters([a, b], force=True).base["name"] == "x"


# ----- CLI and recipes --------------------------------------------------------------------------------
def test_cli_merge_and_recipe(inputs, tmp_path):
    adapters, parts = zip(*inputs, strict=True)
    paths = [str(af.save(a, tmp_path / f"in{i}")) for i, a in enumerate(adapters)]
    runner = CliRunner()
    res = runner.invoke(app, ["merge", *paths, "--weights", "0.7,-1.3,2", "--strategy", "svd", "--rank", "10",
                              "--out", str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["strategy"] == "svd" and report["modules"] == 3
    out = af.load(tmp_path / "out")
    assert relative_error(adapter_delta(out, LINEAR[0]), exact_sum(parts, WEIGHTS, LINEAR[0])) < 1e-6
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("strategy: ties\ndensity: 0.5\nadapters:\n"
                      + "".join(f"  - path: in{i}\n    weight: {w}\n" for i, w in enumerate(WEIGHTS))
                      + "out: from-recipe\n")
    res = runner.invoke(app, ["merge", "--recipe", str(recipe)])
    assert res.exit_code == 0, res.output
    direct = merge_adapters(adapters, weights=WEIGHTS, strategy="ties", density=0.5)
    assert torch.equal(adapter_delta(af.load(tmp_path / "from-recipe"), CONV1D[0]), adapter_delta(direct, CONV1D[0]))
    res = runner.invoke(app, ["merge", paths[0], "--out", str(tmp_path / "out")])
    assert res.exit_code == 1 and "exists" in res.output
