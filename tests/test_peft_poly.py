"""PEFT Poly (Polytropon / MHR): one task's LoRA read exactly (``--task-id``), against PEFT's own forward with
that task's ids; written back as a PEFT LoRA that PEFT reloads with the same logits; no task -> one line."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from helpers_peft import build, load_peft, logits, randomize
from helpers_spec import invoke

import adapterfmt as af

TASKS = 3


@pytest.fixture(scope="module")
def poly(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.Tensor, list[torch.Tensor]]:
    """A PEFT Poly adapter (2 splits, 4 skills, rank 2) on q_proj and down_proj of a tiny Llama, every
    parameter random; the base saved as a checkpoint; PEFT's logits for each task."""
    from peft import PolyConfig, get_peft_model

    root = tmp_path_factory.mktemp("poly")
    ids = torch.randint(0, 48, (2, 7), generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(build("llama"), copy.deepcopy(PolyConfig(
            task_type="CAUSAL_LM", r=2, n_tasks=TASKS, n_skills=4, n_splits=2, target_modules=["q_proj", "down_proj"])))
        randomize(pm, 3)
        with torch.no_grad():  # routers far apart, so each task mixes its skills differently
            for name, p in pm.named_parameters():
                if "module_logits" in name:
                    p.mul_(10)
        pm.eval()
        expected = []
        for t in range(TASKS):
            with torch.no_grad():
                expected.append(pm(input_ids=ids, task_ids=torch.full((2,), t)).logits)
        pm.save_pretrained(root / "peft")
    build("llama").save_pretrained(root / "base")
    return root / "peft", root / "base", ids, expected


def test_each_task_reads_as_the_lora_peft_computes(poly, tmp_path: Path) -> None:
    folder, base, ids, expected = poly
    assert float((expected[0] - expected[1]).abs().max()) > 1e-2  # the tasks' routers differ
    for t in range(TASKS):
        out = tmp_path / f"task{t}.safetensors"
        res = invoke("convert", str(folder), "--out", str(out), "--task-id", str(t), "--base", str(base))
        assert res.exit_code == 0, res.stderr
        assert f"note: Poly: task {t} of {TASKS} read as a LoRA" in res.stderr
        adapter = af.load(out)
        assert {e["kind"] for e in adapter.modules.values()} == {"lowrank"} and len(adapter.modules) == 4
        model = build("llama")
        af.attach(model, adapter)
        assert float((logits(model, ids) - expected[t]).abs().max()) <= 1e-5
    back = tmp_path / "lora-peft"
    res = invoke("convert", str(tmp_path / "task2.safetensors"), "--to", "peft", "--out", str(back))
    assert res.exit_code == 0, res.stderr
    pm, missing, unexpected = load_peft("llama", back)
    assert not missing and not unexpected
    assert float((logits(pm, ids) - expected[2]).abs().max()) <= 1e-5


def test_no_task_or_a_wrong_one_is_refused_in_one_line(poly, tmp_path: Path) -> None:
    folder, base, _, _ = poly
    for extra, said in (([], "no task given; choose one of 0..2 (task_id= / --task-id)"),
                        (["--task-id", "3"], "task 3 given; choose one of 0..2")):
        out = tmp_path / "x.safetensors"
        res = invoke("convert", str(folder), "--out", str(out), *extra)
        assert res.exit_code == 1 and res.stderr.count("\n") == 1 and said in res.stderr, res.stderr
        assert not out.exists()
    with pytest.raises(af.UnsupportedError, match="Poly mixes its skills' LoRA factors per task"):
        af.load(folder)
