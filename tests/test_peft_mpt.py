"""PEFT multitask prompt tuning (kind ``multitask_prompt``): PEFT's folders on tiny Llama and GPT-2 read by
``adapter convert``, attached with ``af.attach`` giving PEFT's logits for each task id (and per-row task ids
through ``adapter_ids``), written back as files PEFT reloads with the same logits and the same tensors; the
kind's math as spec 6.10.16 writes it; training and the conformance kit."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
from helpers_peft import VOCAB, build, randomize
from helpers_spec import EXAMPLES, invoke
from peft import MultitaskPromptTuningConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import adapterfmt as af
from adapterfmt.authoring.conformance import check_method
from adapterfmt.format import golden

ATOL = 1e-5
TASKS = 3
IDS = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(0))


def peft_logits(pm, task_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return pm(input_ids=IDS, task_ids=torch.tensor(task_ids)).logits[:, -IDS.shape[1]:]


def peft_case(tmp_path, model: str):
    cfg = MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, num_tasks=TASKS, num_ranks=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(build(model), copy.deepcopy(cfg))
        randomize(pm, 1)
        pm.eval()
        pm.save_pretrained(tmp_path / "peft")
    return pm, tmp_path / "peft"


def run(m) -> torch.Tensor:
    """The logits of the real tokens."""
    with torch.no_grad():
        return m(input_ids=IDS).logits[:, -IDS.shape[1]:]


def ours(model: str, adapter: af.Adapter, task: int) -> torch.Tensor:
    m = build(model)
    af.attach(m, af.registry.get_method("multitask_prompt_tuning").for_task(adapter, task))
    return run(m)


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_mpt_reads_applies_each_task_and_writes_back(tmp_path, model):
    pm, folder = peft_case(tmp_path, model)
    res = invoke("convert", str(folder), str(tmp_path / "mpt.safetensors"), "--base", _save_base(tmp_path, model))
    assert res.exit_code == 0, res.stderr
    adapter = af.load(tmp_path / "mpt.safetensors")
    ((path, entry),) = adapter.modules.items()
    assert entry["kind"] == "multitask_prompt" and "task" not in entry["params"]
    assert adapter.shape(f"{path}.task_cols") == (TASKS, 4, 2)
    outs = []
    for task in range(TASKS):
        want = peft_logits(pm, [task] * IDS.shape[0])
        got = ours(model, adapter, task)
        assert (got - want).abs().max() <= ATOL
        outs.append(got)
    assert (outs[0] - outs[1]).abs().max() > 1e-3  # the tasks differ

    # per-row task ids, as PEFT's task_ids: one attach per task, rows routed with adapter_ids
    m = build(model)
    mpt = af.registry.get_method("multitask_prompt_tuning")
    for task in range(TASKS):
        af.attach(m, mpt.for_task(adapter, task), name=f"t{task}", activate=False)
    with af.adapter_ids(m, ["t2", "t0", "t1"]):
        got = run(m)
    assert (got - peft_logits(pm, [2, 0, 1])).abs().max() <= ATOL
    with pytest.raises(af.UnsupportedError, match="a prompt of one length on every row"), \
            af.adapter_ids(m, ["t0", None, "t1"]):
        run(m)  # a row without a prompt would be shorter than the others

    af.write_foreign(adapter, tmp_path / "back", "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = PeftModel.from_pretrained(build(model), tmp_path / "back").eval()
    assert (peft_logits(back, [1, 2, 0]) - peft_logits(pm, [1, 2, 0])).abs().max() <= ATOL
    src = load_file(folder / "adapter_model.safetensors")
    new = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert src.keys() == new.keys() and all(torch.equal(src[k], new[k]) for k in src)


def _save_base(tmp_path, model: str) -> str:
    build(model).save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")


def test_mpt_task_id_and_refusals(tmp_path):
    pm, folder = peft_case(tmp_path, "llama")
    base = _save_base(tmp_path, "llama")
    res = invoke("convert", str(folder), str(tmp_path / "t2.safetensors"), "--base", base, "--task-id", "2")
    assert res.exit_code == 0, res.stderr
    chosen = af.load(tmp_path / "t2.safetensors")
    assert chosen.modules["model.embed_tokens"]["params"]["task"] == 2
    assert chosen.shape("model.embed_tokens.task_cols")[0] == TASKS  # every task kept
    m = build("llama")
    af.attach(m, chosen)
    assert (run(m) - peft_logits(pm, [2] * IDS.shape[0])).abs().max() <= ATOL
    res = invoke("convert", str(folder), str(tmp_path / "t3.safetensors"), "--base", base, "--task-id", "3")
    assert res.exit_code == 1 and "has 3 tasks; task 3 given" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "t3.safetensors").exists()
    adapter = af.read_foreign(folder, base=build("llama"))
    with pytest.raises(af.UnsupportedError, match="of 3 tasks applies one: choose it with params.task"):
        af.attach(build("llama"), adapter)
    with pytest.raises(af.FormatError, match=r"params.task 3 is not a task id in \[0, 3\)"):
        af.registry.get_method("multitask_prompt_tuning").for_task(adapter, 3)


def test_mpt_golden_example_is_the_spec_math():
    """Spec 6.10.16 in numpy on spec/examples/multitask_prompt: P = embeddings * (task_cols[t] @ task_rows[t]),
    t = params.task, prepended to the embedding output."""
    adapter = af.load(EXAMPLES / "multitask_prompt.safetensors")
    entry = adapter.modules["model.embed_tokens"]
    n = {r: t.numpy() for r, t in adapter.module_tensors("model.embed_tokens").items()}
    task = entry["params"]["task"]
    model = golden.golden_base()
    ids = torch.tensor([[1, 4, 2], [0, 3, 5]])
    y = model.model.embed_tokens(ids).detach().numpy()
    prompt = n["embeddings"] * (n["task_cols"][task] @ n["task_rows"][task])
    want = np.concatenate([np.broadcast_to(prompt, (2, *prompt.shape)), y], axis=1)
    af.attach(model, adapter)
    assert np.abs(model.model.embed_tokens(ids).detach().numpy() - want).max() <= ATOL
    with pytest.raises(af.UnsupportedError, match="cannot be merged"):
        af.merge_into(model, "multitask_prompt_tuning")


def test_mpt_trains_and_passes_the_conformance_kit():
    report = check_method("multitask_prompt_tuning", train_config={"num_virtual_tokens": 3, "num_tasks": 2, "task": 1})
    assert report.by_status("fail") == {}, report.to_dict()
    assert set(report.by_status("skip")) == {"per_row_ids", "merge_verb", "merge_equals_unmerged", "unmerge_restores"}
