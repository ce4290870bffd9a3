"""The conformance kit on every installed method, with the exact set of skipped checks (and why) per method
so a regression cannot hide as a skip; and the kit itself: it fails broken methods, the pytest entry works."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from helpers_spec import invoke

import adapterfmt as af
from adapterfmt.authoring import conformance
from adapterfmt.authoring.conformance import (
    CHECKS,
    Example,
    build_example,
    check_method,
    conformance_cases,
)
from adapterfmt.deltas.dense import Dense
from adapterfmt.plugin import registry
from adapterfmt.tiny import TinyConfig, build_tiny

NO_TRAIN = {"train", "train_extract"}
NO_WEIGHT_MERGE = {"merge_equals_unmerged", "unmerge_restores"}
PREFIX = {"per_row_ids", "merge_verb", *NO_WEIGHT_MERGE}  # prompts: no weights to merge, longer outputs
EXPECTED_SKIPS: dict[str, set[str]] = {
    "lora": set(), "loha": set(), "lokr": set(), "vera": set(), "sparse_ft": set(), "structured_ft": set(),
    "spiel": set(), "s2ft": set(), "hft": set(), "lt_sft": set(), "grafting": set(),
    "dora": {"merge_verb"},  # the magnitude makes DoRA not W + dW
    "ia3": {"merge_verb"},  # a scaling is not W + dW
    "oft": {"merge_verb"}, "boft": {"merge_verb"}, "hra": {"merge_verb"},  # W G^T is not W + dW
    "lofit": {"merge_verb", *NO_WEIGHT_MERGE},  # offsets merge into a bias; the tiny model has none
    "adalora": NO_TRAIN, "task_vector": NO_TRAIN, "portllm": NO_TRAIN,
    "trainable_tokens": {"merge_verb", *NO_TRAIN},  # rows are replaced, not added
    "prompt_tuning": PREFIX, "dept": PREFIX, "ept": PREFIX, "multitask_prompt_tuning": PREFIX,
    "prefix_tuning": {"merge_verb", "per_row_ids", *NO_WEIGHT_MERGE, *NO_TRAIN},  # one cache serves the batch
    "bottleneck": {"merge_verb", *NO_WEIGHT_MERGE, *NO_TRAIN},  # non-linear in the output; made by convert
    "example_kron": NO_TRAIN,  # tests/thirdparty_plugin, when installed
    "shira": set(), "fourierft": set(), "randlora": set(), "c3a": set(), "miss": set(),
    "ln_tuning": {"merge_verb"},  # a dense replacement is not W + dW
    "vblora": set(),
    "mixture": {"merge_verb", *NO_WEIGHT_MERGE},  # routes by input
    "pissa": set(), "olora": set(), "kasa": set(), "sorsa": set(), "nlora": set(), "slora": set(), "lamda": set(),
    "ba_lora": set(), "ist": set(), "greentrainer": set(),
    "triadaptlora": set(), "diffora": set(), "s2_lora": set(),  # tests/test_train_procedures.py: S2 shared by layers
    "deft": set(), "star": set(),
    "light_peft": {"merge_verb"},  # a mask is not W + dW
    "loldu": {"merge_verb"}, "inttune": {"merge_verb"},  # their factors are derived from the base (spec 6.2.1)
    "peqa": {"merge_verb"}, "l4q": {"merge_verb"},  # new scales re-quantise the base: not W + dW
}
"""Per built-in method: the checks that are skipped. Every other check must pass."""
REASONS = {
    "train": r"has no train verb", "train_extract": r"has no train verb",
    "merge_verb": r"not W \+ dW.*\((lowrank|vector|rows|prompt|multitask_prompt|prefix|bottleneck|dept|dense|cayley|butterfly|householder|mixture|qscale|mask)\)"
                  r"|derived base part is computed from the base",
    "merge_equals_unmerged": r"not mergeable into weights: .*(prompt|DePT|cannot be merged|without a bias)",
    "unmerge_restores": r"not mergeable into weights",
    "per_row_ids": r"changes the output's shape \(\[3, 5, 32\] -> \[3, \d+, 32\]\)|per-row ids refused: .*kind prefix",
}
"""What a skip's reason must say, per check."""


def _tiny() -> torch.nn.Module:
    return build_tiny(0, TinyConfig(vocab_size=32, hidden=16, layers=1, heads=2, intermediate=32))


def _ids() -> torch.Tensor:
    return torch.randint(0, 32, (3, 4), generator=torch.Generator().manual_seed(1))


def kron_example() -> Example:
    """tests/thirdparty_plugin's example_kron (a kind the kit has no example of) on two projections."""
    from adapterfmt_example_plugin import make_adapter

    gen = torch.Generator().manual_seed(0)
    factors = {f"model.layers.0.self_attn.{p}": (torch.randn(4, 4, generator=gen), torch.randn(4, 4, generator=gen) / 8)
               for p in ("q_proj", "v_proj")}
    return Example(_tiny(), make_adapter(factors, scale=0.5), _ids())


FACTORIES = {"example_kron": kron_example,
             # VB-LoRA's vectors (PEFT's default length 256) must divide the tiny model's 16 and 32 features
             "vblora": lambda: build_example("vblora", train_config={"target_modules": ["q_proj", "down_proj"], "r": 2,
                                                                     "num_vectors": 6, "vector_length": 8}),
             # SHiRA's r (PEFT's default 32) asks r * (out + in) weights, more than the tiny model's layers hold
             "shira": lambda: build_example("shira", train_config={"target_modules": ["q_proj", "v_proj"], "r": 2}),
             # the tiny model applies its MLP activation as a function: DEFT watches the input of down_proj
             "deft": lambda: build_example("deft", train_config={"target_modules": ["q_proj", "v_proj"], "r": 2,
                                                                 "activations": "mlp.down_proj", "capture": "input"})}


@pytest.mark.parametrize("method", sorted(registry.methods()))
def test_builtin_method_conforms(method: str) -> None:
    if method not in EXPECTED_SKIPS:
        pytest.fail(f"method {method!r} is new: add its expected skips to EXPECTED_SKIPS")
    report = check_method(method, FACTORIES.get(method))
    assert [r.name for r in report.results] == list(CHECKS)
    assert report.by_status("fail") == {}, json.dumps(report.to_dict(), indent=1)
    skips = report.by_status("skip")
    assert set(skips) == EXPECTED_SKIPS[method], skips
    for check, reason in skips.items():
        assert re.search(REASONS[check], reason), (check, reason)
    assert report.ok


def test_checks_measure_something() -> None:
    """Pass details carry the measured facts (a pass is not an empty statement)."""
    details = {r.name: r.detail for r in check_method("lora").results}
    assert re.fullmatch(r"\d+ bytes, identical", details["roundtrip_folder"])
    assert re.fullmatch(r"output moved by [\d.e+-]+", details["attach"])
    assert re.fullmatch(r"loss ([\d.]+) -> ([\d.]+) in 20 steps", details["train"])
    first, last = map(float, re.findall(r"[\d.]+(?= |$)", details["train"].split(" in ")[0]))
    assert last < first
    assert re.search(r"-> \d+ tensor bytes", details["compress_verb"])


@pytest.mark.parametrize("case", conformance_cases("lora"), ids=str)
def test_pytest_entry(case: conformance.Case) -> None:
    """The entry a plugin's own tests use: every check of a complete method passes."""
    result = case()
    assert result.status == "pass"


def test_pytest_entry_skips_with_the_reason_where_a_kind_cannot_do_a_check() -> None:
    """A case that does not apply (a prompt cannot be merged into weights) skips with its reason."""
    cases = {str(c).rsplit("-", 1)[-1]: c for c in conformance_cases("prompt_tuning")}
    with pytest.raises(pytest.skip.Exception, match="cannot be merged into weights"):
        cases["merge_equals_unmerged"]()
    assert cases["attach"]().status == "pass"


# ----- the kit fails what is broken ------------------------------------------------------------------------
class DoubleMerge(Dense):
    """A broken kind: merge adds dW twice, so merged != unmerged and unmerge leaves dW behind."""

    name = "double_merge"

    def merge(self, module: torch.nn.Module, entry: Any, t: Any) -> Any:
        super().merge(module, entry, t)
        return super().merge(module, entry, t)


def _dense_example(kind: str, scale: float = 0.02) -> Example:
    model = _tiny()
    path = "model.layers.0.self_attn.q_proj"
    modules = {path: {"kind": kind, "shape": [16, 16], "params": {"mode": "add"}}}
    tensors = {f"{path}.delta": scale * torch.randn(16, 16, generator=torch.Generator().manual_seed(0))}
    adapter = af.Adapter(af.new_manifest("broken_dense", modules), tensors)
    return Example(model, adapter, _ids())


class BrokenMethod(af.Method):
    name = "broken_dense"
    kinds = ("double_merge",)

    def conformance_example(self) -> Example:
        return _dense_example("double_merge")


class NoExample(af.Method):
    name = "no_example"
    kinds = ("double_merge",)


class InProcessPlugin:
    @af.hookimpl
    def adapterfmt_methods(self) -> list[af.Method]:
        return [BrokenMethod(), NoExample()]

    @af.hookimpl
    def adapterfmt_delta_kinds(self) -> list[af.DeltaKind]:
        return [DoubleMerge()]


@pytest.fixture
def broken_plugin() -> Iterator[None]:
    registry.reset()
    registry.plugin_manager().register(InProcessPlugin(), name="broken_dense_test")
    try:
        yield
    finally:
        registry.reset()


def test_kit_fails_a_broken_kind(broken_plugin: None) -> None:
    report = check_method("broken_dense")  # the example comes from the method's conformance_example()
    fails = report.by_status("fail")
    assert set(fails) == {"merge_equals_unmerged", "unmerge_restores", "detach_restores"}, fails
    assert "merged vs unmerged output" in fails["merge_equals_unmerged"]
    assert not report.ok
    assert invoke("plugin", "check", "broken_dense").exit_code == 1


def test_kit_fails_an_adapter_that_does_nothing(broken_plugin: None) -> None:
    report = check_method("broken_dense", lambda: _dense_example("double_merge", scale=0.0))
    assert "unchanged" in report.by_status("fail")["attach"]


def test_kit_needs_an_example_for_unknown_kinds(broken_plugin: None) -> None:
    report = check_method("no_example")  # a kind the kit has no example of, no train verb, no factory
    assert set(report.by_status("fail")) == set(CHECKS)
    assert all("pass a factory" in d for d in report.by_status("fail").values())


def test_cli_check() -> None:
    res = invoke("plugin", "check", "ia3", "--json")
    assert res.exit_code == 0, res.stdout
    data = json.loads(res.stdout)
    assert data["ok"] and {r["name"]: r["status"] for r in data["results"]}["merge_verb"] == "skip"
    res = invoke("plugin", "check", "no_such_method")
    assert res.exit_code == 1 and "unknown method 'no_such_method'" in res.stderr
