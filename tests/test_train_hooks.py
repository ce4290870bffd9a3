"""Train-session hooks (adapterfmt.verbs.train): gradient masks, freeze after step k, rank pruning, Monte-Carlo
dropout in the session and on attach; ``adapter train``'s loop runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_methods import one_thread  # noqa: F401 (fixture)

import adapterfmt as af
from adapterfmt.plugin.registry import get_method
from adapterfmt.tiny import build_tiny
from adapterfmt.verbs.trainer import Run, TrainOptions

LORA = {"target_modules": ["q_proj", "v_proj"], "r": 4, "alpha": 8}
Q0 = "model.layers.0.self_attn.q_proj"


pytestmark = pytest.mark.usefixtures("one_thread")


def session(config=LORA, seed: int = 0) -> tuple[torch.nn.Module, af.TrainSession]:
    model = build_tiny(seed=0)
    torch.manual_seed(seed)
    return model, get_method("lora").train(model, config=dict(config))


def batch() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def train(model, s: af.TrainSession, steps: int, opt) -> None:
    for _ in range(steps):
        out = model(batch())
        loss = getattr(out, "logits", out).float().pow(2).mean()
        loss.backward()
        s.after_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        s.step(opt)


def snapshot(s: af.TrainSession) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in s.named_parameters()}


def test_gradient_mask_zeroes_chosen_entries():
    """A mask callable sees each parameter and the step; masked entries get no update under plain SGD."""
    model, s = session()
    seen = []

    def mask(name, p, step):
        seen.append(step)
        if name == f"{Q0}.lora_A":
            m = torch.ones_like(p)
            m[:2] = 0
            return m
        return torch.zeros(()) if name.endswith("v_proj.lora_B") else None

    s.mask_gradients(mask)
    before = snapshot(s)
    train(model, s, 3, torch.optim.SGD(s.parameters(), lr=0.5))
    after = snapshot(s)
    assert sorted(set(seen)) == [0, 1, 2] and s.steps == 3
    torch.testing.assert_close(after[f"{Q0}.lora_A"][:2], before[f"{Q0}.lora_A"][:2], rtol=0, atol=0)
    assert not torch.equal(after[f"{Q0}.lora_A"][2:], before[f"{Q0}.lora_A"][2:])
    for n in after:
        if n.endswith("v_proj.lora_B"):
            assert torch.equal(after[n], before[n])
    assert not torch.equal(after[f"{Q0}.lora_B"], before[f"{Q0}.lora_B"])


def test_prune_rank_keeps_the_most_important_components_at_zero_ever_after():
    model, s = session()
    opt = torch.optim.AdamW(s.parameters(), lr=1e-2, weight_decay=0.1)
    train(model, s, 2, opt)
    layer = s.layers[Q0]
    a, b = layer.weights.lora_A.detach().clone(), layer.weights.lora_B.detach().clone()
    score = b.norm(dim=0) * a.norm(dim=1)
    s.prune_rank(Q0, 2)
    assert not s.has_schedule and s.ranks() == {Q0: 2}  # the masks are checkpointed (schedule_state)
    keep = torch.zeros(4, dtype=torch.bool)
    keep[score.argsort(descending=True)[:2]] = True
    train(model, s, 3, opt)  # Adam momentum and weight decay would move the pruned entries
    a2, b2 = layer.weights.lora_A.detach(), layer.weights.lora_B.detach()
    assert torch.all(a2[~keep] == 0) and torch.all(b2[:, ~keep] == 0)
    assert not torch.equal(a2[keep], a[keep])
    s.prune_rank(Q0, 1)  # a subset of what was kept
    assert s.ranks() == {Q0: 1} and int((layer.weights.lora_A.detach().abs().sum(1) > 0).sum()) == 1
    with pytest.raises(af.AdapterError, match="rank 9"):
        s.prune_rank(Q0, 9)


def test_has_schedule_is_public_and_counts_stateful_hooks_only():
    _, s = session()
    assert not s.has_schedule
    s.freeze_after(Q0, 1)
    s.mask_gradients(lambda n, p, k: None)
    assert not s.has_schedule
    s.on_step(lambda opt: None)
    assert s.has_schedule
    with pytest.raises(af.AdapterError, match="no trained delta"):
        s.freeze_after("model.nope", 1)


def test_mc_dropout_in_the_session_and_on_attach():
    model, s = session({**LORA, "dropout": 0.5})
    with torch.no_grad():
        for p in s.parameters():
            p.normal_()
    model.eval()
    x = batch()
    with torch.no_grad():
        y0, y1 = model(x), model(x)
        torch.testing.assert_close(y0, y1, rtol=0, atol=0)  # eval: deterministic
        with s.mc_dropout():
            samples = [model(x) for _ in range(2)]
        assert not torch.equal(samples[0], samples[1])
        torch.testing.assert_close(model(x), y0, rtol=0, atol=0)
    adapter = s.extract()
    s.remove()
    with torch.no_grad():
        af.attach(model, adapter)
        plain = model(x)
        af.detach(model)
        af.attach(model, adapter, dropout=0.5)
        draws = torch.stack([model(x) for _ in range(3)])
        assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], plain)
        with pytest.raises(af.UnsupportedError, match="unmerged"):
            af.merge_into(model, adapter.method)
        af.detach(model)
    with pytest.raises(af.UnsupportedError, match="merge=False"):
        af.attach(model, adapter, dropout=0.5, merge=True)


def test_mc_dropout_on_token_ids_is_refused():
    """A delta on an embedding (a prompt here) sees token ids: dropout on them has no meaning, so attach refuses
    in one line and leaves the model as it was."""
    model = build_tiny(0)
    emb = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding))
    shape = list(model.get_submodule(emb).weight.shape)
    dim = shape[1]
    adapter = af.Adapter(af.new_manifest("prompt_tuning", {emb: {"kind": "prompt", "shape": shape}}),
                         {f"{emb}.embeddings": torch.randn(4, dim)})
    x = batch()
    with torch.no_grad():
        before = model(x)
        with pytest.raises(af.UnsupportedError, match=f"module '{emb}' takes token ids; attach this adapter without"):
            af.attach(model, adapter, dropout=0.5)
        assert not af.attached(model)
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def write_data(path: Path) -> Path:
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "it"]
    lines = [json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(4 + i % 5))}) for i in range(12)]
    path.write_text("\n".join(lines) + "\n")
    return path


def run(tmp: Path, out: str, steps: int, freeze: int | None = None, prune: int | None = None,
        **kw) -> dict[str, torch.Tensor]:
    r = Run(TrainOptions(method="lora", data=write_data(tmp / "d.jsonl"), out=tmp / out, config=LORA,
                         max_steps=steps, batch_size=4, lr=1e-2, schedule="constant", cpu=True, **kw))
    r.prepare()
    if freeze is not None:
        r.session.freeze_after(Q0, freeze)
    if prune is not None:
        r.session.prune_rank(Q0, prune)
    r.loop()
    a = af.load(tmp / out)
    return {n: a.tensor(n) for n in a.tensors()}


def test_adapter_train_runs_freeze_after(tmp_path: Path):
    """The trainer calls after_backward: a delta frozen after step 2 of 4 equals the 2-step run's (AdamW skips
    it: no momentum, no weight decay), the others keep training."""
    two = run(tmp_path, "two.safetensors", 2)
    frozen = run(tmp_path, "frozen.safetensors", 4, freeze=2)
    for n in two:
        if n.startswith(Q0 + "."):
            torch.testing.assert_close(frozen[n], two[n], rtol=0, atol=0)
        elif n.endswith("lora_B"):
            assert not torch.equal(frozen[n], two[n]), n


def test_freeze_after_and_rank_pruning_resume_exactly(tmp_path: Path):
    """A resumed run counts steps from the checkpoint's, so a delta frozen after step 1 stays frozen after a
    resumption at step 2; pruned ranks come back from the checkpoint (the resumed run does not prune): both bit
    for bit the uninterrupted run. An on_step hook without state_dict is refused with checkpoints, even when
    added after prepare()."""
    whole = run(tmp_path, "w.safetensors", 4, freeze=1, prune=2, checkpoint_every=2)
    assert int((whole[f"{Q0}.lora_A"].abs().sum(1) > 0).sum()) == 2
    r = Run(TrainOptions(resume=tmp_path / "w.safetensors.checkpoints" / "step-00000002", overwrite=True, cpu=True))
    r.prepare()
    assert r.session.steps == 2 and r.session.ranks() == {Q0: 2}
    r.session.freeze_after(Q0, 1)
    r.loop()
    resumed = af.load(tmp_path / "w.safetensors")
    for n, t in whole.items():
        assert torch.equal(resumed.tensor(n), t), n
    r = Run(TrainOptions(method="lora", data=tmp_path / "d.jsonl", out=tmp_path / "p.safetensors", config=LORA,
                         max_steps=2, batch_size=4, checkpoint_every=1, cpu=True))
    r.prepare()
    r.session.on_step(lambda opt: None)
    with pytest.raises(af.UnsupportedError, match="on_step hook without state_dict"):
        r.loop()
