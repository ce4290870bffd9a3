"""VB-LoRA's train verb against the real peft package: from the same initial bank and logits (copied from a
PEFT model onto ours), one training step on the same tiny Llama and batch gives PEFT's gradients and updated
parameters; the trained adapter saves and loads as kind ``vector_bank`` and gives PEFT's trained function,
attached here and written back to PEFT."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("peft")
from helpers_peft import VOCAB, build, load_peft, logits
from peft import VBLoRAConfig, get_peft_model

import adapterfmt as af

ATOL = 1e-6
TARGETS = ["q_proj", "v_proj", "down_proj"]
CONFIG = {"target_modules": TARGETS, "r": 2, "num_vectors": 6, "vector_length": 8, "topk": 2}


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids[:, :-1])
    out = out if isinstance(out, torch.Tensor) else out.logits
    return torch.nn.functional.cross_entropy(out.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def test_one_training_step_equals_peft(tmp_path):
    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(11)
        pm = get_peft_model(build("llama"), VBLoRAConfig(**CONFIG)).eval()
    model = build("llama").eval()
    torch.manual_seed(12)  # other initial values: the copy below must set them all
    session = af.registry.get_method("vblora").train(model, config=CONFIG)
    ours = dict(session.named_parameters())

    def peft_param(name: str) -> torch.nn.Parameter:
        if name == "vector_bank":
            return pm.base_model.vblora_vector_bank["default"]
        path, role = name.rsplit(".", 1)
        return pm.get_parameter(f"base_model.model.{path}.vblora_{role}.default")

    theirs = {n: peft_param(n) for n in ours}
    assert {id(p) for p in theirs.values()} == {id(p) for p in pm.parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in ours.items():
            p.copy_(theirs[n])
    torch.testing.assert_close(logits(model, ids), logits(pm, ids), atol=ATOL, rtol=0)

    opts = [torch.optim.AdamW(list(ours.values()), lr=0.05),
            torch.optim.AdamW(list(theirs.values()), lr=0.05)]
    for m, opt in zip((model, pm), opts, strict=True):
        opt.zero_grad()
        _loss(m, ids).backward()
    for n, p in ours.items():
        q = theirs[n]
        assert q.grad is not None and q.grad.abs().max() > 0, n
        torch.testing.assert_close(p.grad, q.grad, atol=1e-7, rtol=1e-5)
    before = {n: p.detach().clone() for n, p in ours.items()}
    for opt in opts:
        opt.step()
    session.step(opts[0])
    for n, p in ours.items():
        assert not torch.equal(p, before[n]), n
        torch.testing.assert_close(p, theirs[n], atol=ATOL, rtol=0)
    want = logits(pm, ids)
    torch.testing.assert_close(logits(model, ids), want, atol=ATOL, rtol=0)

    adapter = af.load(af.save(session.extract(), tmp_path / "vb.safetensors"))
    session.remove()
    assert {e["kind"] for e in adapter.modules.values()} == {"vector_bank"} and len(adapter.modules) == 6
    assert adapter.tensor("vector_bank").shape == (6, 8)
    fresh = build("llama").eval()
    af.attach(fresh, adapter, name="vb")
    torch.testing.assert_close(logits(fresh, ids), want, atol=1e-5, rtol=0)
    af.merge_into(fresh, "vb")
    torch.testing.assert_close(logits(fresh, ids), want, atol=1e-5, rtol=0)

    af.to_peft(adapter, tmp_path / "peft")
    back, missing, unexpected = load_peft("llama", tmp_path / "peft")
    assert [k for k in missing if ".vblora_vector_bank." not in k] == [] and unexpected == []
    torch.testing.assert_close(logits(back, ids), want, atol=1e-5, rtol=0)
