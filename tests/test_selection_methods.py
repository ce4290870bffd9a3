"""IST, GreenTrainer and Light-PEFT (plugins/methods/selection.py) and the ``mask`` kind (spec 6.13).

IST's schedule is checked against a transcription of the reference's ``ISTCallback`` (same generator calls,
losses recomputed from the extracted adapter with the suppressed scales); GreenTrainer's subset against brute
force; Light-PEFT's pruning counts against the reference's quantile rules; the mask against a physically pruned
module."""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from helpers_methods import one_thread  # noqa: F401 (fixture)

import adapterfmt as af
from adapterfmt.tiny import TinyConfig, build_tiny
from adapterfmt.verbs.trainer import Run, TrainOptions
from adapterfmt.plugins.methods.selection import (ISTSchedule, linear_flops, select_tensors,
                                                   tensor_importance)


pytestmark = pytest.mark.usefixtures("one_thread")


def loss_fn(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids[:, :-1])
    return F.cross_entropy(getattr(out, "logits", out).flatten(0, 1), ids[:, 1:].flatten())


def data(n: int = 2, vocab: int = 128) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, vocab, (4, 9), generator=gen) for _ in range(n)]


@pytest.mark.parametrize("method, extra", [("ist", {}), ("greentrainer", {}), ("light_peft", {})])
def test_configs_refuse_unknown_keys(method, extra):
    with pytest.raises(af.FormatError, match="rnak"):
        af.registry.get_method(method).train(build_tiny(0), config={"rnak": 4, **extra}, loss_fn=loss_fn,
                                             batches=data())


# ----- IST --------------------------------------------------------------------------------------------------
def test_ist_trains_the_drawn_blocks_and_learns_scores_as_the_reference():
    cfg = {"target_modules": ["q_proj", "v_proj"], "r": 2, "update_ratio": 0.25, "suppress_ratio": 0.5,
           "rl_steps": 2, "update_interval": 2, "seed": 3}
    base = build_tiny(0, TinyConfig(layers=4))
    model, batches = copy.deepcopy(base), data()
    torch.manual_seed(0)
    s = af.registry.get_method("ist").train(model, config=cfg, loss_fn=loss_fn, batches=batches)
    opt = torch.optim.AdamW(s.parameters(), lr=1e-2)
    # the reference, transcribed: scores, draws by sigmoid(+-scores) without replacement, REINFORCE update
    gen, scores, updates = torch.Generator().manual_seed(3), torch.zeros(4), 0

    def draw(logits, k):
        return torch.sort(torch.multinomial(logits.sigmoid(), k, generator=gen)).values.tolist()

    def suppressed_loss(adapter, blocks, batch):
        a = copy.deepcopy(adapter)
        for path, entry in a.modules.items():
            if af.layer_index(path) in blocks:
                entry["params"]["scale"] *= 0.25
        m = copy.deepcopy(base).eval()
        af.attach(m, a)
        with torch.no_grad():
            return float(loss_fn(m, batch))

    active = draw(-scores, 1)
    for step in range(6):
        before = {n: p.detach().clone() for n, p in s.named_parameters()}
        loss_fn(model, batches[step % 2]).backward()
        s.after_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        moved = {af.layer_index(n) for n, p in s.named_parameters() if not torch.equal(p, before[n])}
        assert moved == set(active), (step, moved, active)
        if (step + 1) % 2 == 0:
            adapter, draws = s.extract(), []
            while len(draws) < 2:
                d = draw(scores, 2)
                if d not in draws:
                    draws.append(d)
            losses = [suppressed_loss(adapter, d, batches[updates % 2]) for d in draws]
            updates += 1
            rewards = [math.exp(-x) for x in losses]
            p = scores.sigmoid()
            for d, r in zip(draws, rewards):
                for i in d:
                    scores[i] += (r - sum(rewards) / 2) * p[i] * (1 - p[i]) * 10.0
        s.step(opt)
        active = draw(-scores, 1)
    assert bool((scores != 0).any())
    assert s.extract().method == "ist" and {e["kind"] for e in s.extract().modules.values()} == {"lowrank"}


def test_ist_runs_no_backward_for_undrawn_blocks_and_trains_as_dropping_their_gradients():
    """The undrawn blocks' deltas do not require grad in the step's forward: they get no gradient and nothing below
    the lowest drawn block enters the autograd graph. The run equals, bit for bit, a LoRA trained by the same
    schedule whose undrawn blocks' gradients are computed and dropped after backward (IST before it saved
    anything): the same draws, score updates and parameters at every step, dropout on; the flags are back on
    between steps."""
    cfg = {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 2, "dropout": 0.1, "update_ratio": 0.34,
           "rl_steps": 2, "update_interval": 2, "seed": 3}
    base, batches = build_tiny(0, TinyConfig(layers=6)), data()
    torch.manual_seed(0)
    s = af.registry.get_method("ist").train(copy.deepcopy(base), config=cfg, loss_fn=loss_fn, batches=batches)
    torch.manual_seed(0)  # the same LoRA init; the old behaviour: the schedule's draws, gradients dropped
    ref = af.registry.get_method("lora").train(copy.deepcopy(base), config={k: cfg[k] for k in (
        "target_modules", "r", "dropout")} | {"alpha": 8})
    schedule = ISTSchedule(ref, {**af.registry.get_method("ist").defaults, **cfg}, loss_fn, batches)
    ref.on_step(schedule)
    opts = [torch.optim.AdamW(x.parameters(), lr=1e-2) for x in (s, ref)]
    grad_out: dict[int, bool] = {}
    for i, block in enumerate(s.model.model.layers):
        block.register_forward_hook(lambda m, a, out, i=i: grad_out.__setitem__(i, out.requires_grad))
    for step in range(7):
        drawn = sorted({af.layer_index(p) for p in s.schedule_state()["hooks"][0]["active"]})
        assert drawn == sorted({af.layer_index(p) for p in schedule.active}) and len(drawn) == 2
        for x, opt in zip((s, ref), opts):
            torch.manual_seed(100 + step)  # the same dropout masks
            loss_fn(x.model, batches[step % 2]).backward()
            if x is ref:
                for path, layer in ref.layers.items():
                    for p in layer.weights.parameters():
                        assert p.grad is not None
                        if schedule.skip(path, ref.steps):
                            p.grad = None
            else:
                assert grad_out == {i: i >= drawn[0] for i in range(6)}
                assert all((p.grad is None) == (af.layer_index(n) not in drawn) for n, p in s.named_parameters())
            x.after_backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            x.step(opt)
        assert all(p.requires_grad for p in s.parameters())
        assert all(torch.equal(a, b) for a, b in zip(s.parameters(), ref.parameters(), strict=True)), step
    assert torch.equal(s.schedule_state()["hooks"][0]["scores"], schedule.scores) and bool(schedule.scores.any())
    a, b = s.extract(), ref.extract()
    assert all(torch.equal(a.tensor(n), b.tensor(n)) for n in b.tensor_names())


def test_ist_schedule_state_continues_the_draws_and_score_updates():
    """IST's schedule state (scores, generator, drawn blocks) loaded into a fresh session continues the session
    it came from, draw for draw and score for score; a schedule without it draws otherwise."""
    cfg = {"target_modules": ["q_proj"], "r": 2, "update_interval": 2, "rl_steps": 2, "seed": 3}

    def session() -> af.TrainSession:
        torch.manual_seed(0)  # the same LoRA init in each
        s = af.registry.get_method("ist").train(build_tiny(0, TinyConfig(layers=4)), config=cfg, loss_fn=loss_fn,
                                                batches=data())
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # B off zero: the suppressed losses differ, so the scores move
            for layer in s.layers.values():
                layer.weights.lora_B.copy_(torch.randn(layer.weights.lora_B.shape, generator=gen))
        return s

    def run(s: af.TrainSession, n: int) -> list[tuple[list[str], list[float]]]:
        out = []
        for _ in range(n):
            s.step(None)
            st = s.schedule_state()["hooks"][0]
            out.append((st["active"], st["scores"].tolist()))
        return out

    a, b, c = session(), session(), session()
    run(a, 3)
    b.load_schedule_state(a.schedule_state())
    b.steps = c.steps = a.steps
    ahead = run(a, 6)
    assert run(b, 6) == ahead and run(c, 6) != ahead
    assert len({tuple(active) for active, _ in ahead}) > 1 and any(x != 0 for x in ahead[-1][1])


def test_ist_refuses_what_it_cannot_do():
    with pytest.raises(af.FormatError, match="calibration data"):
        af.registry.get_method("ist").train(build_tiny(0), config={"target_modules": ["q_proj"]})
    with pytest.raises(af.FormatError, match="fewer than rl_steps=3"):  # 2 blocks: 2 distinct draws of 1
        af.registry.get_method("ist").train(build_tiny(0), config={"target_modules": ["q_proj"]}, loss_fn=loss_fn,
                                            batches=data())
    with pytest.raises(af.FormatError, match="not inside a numbered block"):
        af.registry.get_method("ist").train(build_tiny(0), config={"target_modules": ["lm_head"], "update_interval": 0})


# ----- GreenTrainer ------------------------------------------------------------------------------------------
def brute_force(t_dy, t_dw, gains, limit):
    best = 0.0
    for k in range(1, len(gains) + 1):
        for subset in itertools.combinations(range(len(gains)), k):
            cost = sum(t_dw[i] for i in subset) + sum(t_dy[: max(subset) + 1])
            if cost <= limit:
                best = max(best, sum(gains[i] for i in subset))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_select_tensors_finds_the_best_subset(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 7
    t_dy = torch.randint(0, 12, (n,), generator=gen).tolist()
    t_dw = torch.randint(0, 12, (n,), generator=gen).tolist()
    gains = (torch.rand(n, generator=gen) * 2 - 0.4).tolist()
    gains[seed % n] = -math.inf  # a tensor that is not a candidate
    limit = int(torch.randint(5, 60, (1,), generator=gen))
    chosen = select_tensors(t_dy, t_dw, gains, limit)
    cost = sum(t_dw[i] for i in chosen) + (sum(t_dy[: max(chosen) + 1]) if chosen else 0)
    assert cost <= limit
    assert sum(gains[i] for i in chosen) == pytest.approx(brute_force(t_dy, t_dw, gains, limit))


def test_greentrainer_trains_the_best_whole_tensors_under_the_budget():
    model, batches = build_tiny(0), data()
    cfg = {"target_modules": ["q_proj", "v_proj", "down_proj"], "rho": 0.6}
    paths, t_dy, t_dw, forward = linear_flops(model, loss_fn, batches[0])
    assert paths[0] == "model.layers.0.self_attn.q_proj" and t_dw[:2].tolist() == [32 * 64 * 64] * 2  # 4 x 8 tokens
    v = paths.index("model.layers.0.self_attn.v_proj")
    assert t_dy[v] == 32 * 64 * 64 + 2 * 32 * 8 * 64  # attention's backward charged to v_proj
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    candidates = af.select_targets(model, cfg)
    scores = tensor_importance(model, candidates, loss_fn, batches[0], 2e-5)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # weights restored
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())
    s = af.registry.get_method("greentrainer").train(model, config=cfg, loss_fn=loss_fn, batches=batches)
    adapter = s.extract()
    chosen = adapter.config["tensors"]
    assert set(adapter.modules) == set(chosen) and {e["kind"] for e in adapter.modules.values()} == {"dense"}
    # the brute-force best subset of the candidates, on the same quantised costs
    backward = float((t_dy + t_dw).sum())
    rho_bp = 0.6 * (1 + forward / backward) - forward / backward
    dy = [math.floor(x * 1000 / backward) for x in reversed(t_dy.tolist())]
    dw = [math.floor(x * 1000 / backward) for x in reversed(t_dw.tolist())]
    chain = list(reversed(paths))
    gains = [scores.get(p, -math.inf) for p in chain]
    limit = int(rho_bp * (sum(dy) + sum(dw)))
    assert sum(scores[p] for p in chosen) == pytest.approx(brute_force(dy, dw, gains, limit))
    deepest = max(chain.index(p) for p in chosen)
    assert sum(dw[chain.index(p)] for p in chosen) + sum(dy[: deepest + 1]) <= limit
    with pytest.raises(af.FormatError, match="rho"):
        af.registry.get_method("greentrainer").train(build_tiny(0), config={"rho": 0.05}, loss_fn=loss_fn,
                                                     batches=batches)


# ----- mask and Light-PEFT -----------------------------------------------------------------------------------
def test_mask_computes_the_pruned_module_and_validation_refuses_bad_keeps(tmp_path: Path):
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    keep = torch.tensor([1, 0, 1], dtype=torch.uint8)  # groups of 2 inputs: inputs 2, 3 removed
    x = torch.randn(3, 6)
    small = nn.Linear(4, 4)
    with torch.no_grad():
        small.weight.copy_(lin.weight[:, [0, 1, 4, 5]])
        small.bias.copy_(lin.bias)
    entry = {"kind": "mask", "shape": [4, 6], "params": {"side": "input", "group": 2}}
    adapter = af.Adapter(af.new_manifest("light_peft", {"m": entry}), {"m.keep": keep})
    model = nn.Sequential()
    model.add_module("m", lin)
    af.attach(model, adapter)
    with torch.no_grad():
        torch.testing.assert_close(model(x), small(x[:, [0, 1, 4, 5]]))
    af.detach(model)
    out_entry = {"kind": "mask", "shape": [4, 6], "params": {"side": "output"}}
    rows = torch.tensor([0, 1, 1, 0], dtype=torch.uint8)
    af.attach(model, af.Adapter(af.new_manifest("light_peft", {"m": out_entry}), {"m.keep": rows}), merge=True)
    with torch.no_grad():
        y = model(x)
    assert torch.all(y[:, [0, 3]] == 0) and torch.equal(lin.bias[[0, 3]], torch.zeros(2))
    af.detach(model)
    for bad, match in ((torch.tensor([1, 2, 1], dtype=torch.uint8), "0 or 1"), (keep.float(), "uint8")):
        a = af.Adapter(af.new_manifest("light_peft", {"m": entry}), {"m.keep": bad})
        with pytest.raises(af.FormatError, match=match):
            af.validate(a)
    with pytest.raises(af.FormatError, match="expected"):
        af.validate(af.Adapter(af.new_manifest("light_peft", {"m": {**entry, "params": {"group": 4}}}), {"m.keep": keep}))


LIGHT = {"target_modules": ["q_proj", "v_proj"], "estimate_steps": 6, "r": 8}


def test_light_peft_prunes_by_the_reference_quantile_rules():
    """Tiny model: 2 blocks of 4 heads and 128 FFN channels, LoRA r=8 on q/v (4 modules). numpy.quantile's rules
    keep heads above the 1/3 quantile of their layer (2 of 4), channels above the global 1/3 quantile (170 of
    256), modules above the 0.75 quantile (1 of 4), ranks above the 0.5 quantile (4 of 8)."""
    s = af.registry.get_method("light_peft").train(build_tiny(0), config=LIGHT, loss_fn=loss_fn, batches=data())
    a = s.extract()
    masks = {p: a.tensor(f"{p}.keep") for p, e in a.modules.items() if e["kind"] == "mask"}
    heads = {p: k for p, k in masks.items() if p.endswith("o_proj")}
    assert len(heads) == 2 and all(int(k.sum()) == 2 and k.numel() == 4 for k in heads.values())
    assert all(a.modules[p]["params"] == {"side": "input", "group": 16} for p in heads)
    channels = [k for p, k in masks.items() if p.endswith("down_proj")]
    assert sum(int(k.sum()) for k in channels) == 170 and sum(k.numel() for k in channels) == 256
    loras = {p: e for p, e in a.modules.items() if e["kind"] == "lowrank"}
    assert len(loras) == 1 and [a.tensor(f"{p}.lora_A").shape[0] for p in loras] == [4]
    assert all(e["params"]["scale"] == 2.0 for e in loras.values())  # alpha 16 / the original r 8
    assert [n.rsplit(".", 1)[1] for n, _ in s.named_parameters()] == ["lora_A", "lora_B"]


def test_light_peft_refuses_a_lora_where_a_mask_goes():
    with pytest.raises(af.FormatError, match="o_proj"):
        af.registry.get_method("light_peft").train(build_tiny(0), config={**LIGHT, "target_modules": ["o_proj"]},
                                                   loss_fn=loss_fn, batches=data())
    with pytest.raises(af.FormatError, match="drop target_modules"):
        af.registry.get_method("light_peft").train(build_tiny(0), config={"structure_from": "x", "target_modules": "q"})


def write_data(path: Path) -> Path:
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "it"]
    lines = [json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(4 + i % 5))}) for i in range(12)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_adapter_train_runs_each_method_and_light_peft_resumes_exactly(tmp_path: Path):
    """Light-PEFT's session has no schedule state (its estimation runs in ``train`` on the calibration batches),
    so a run resumed from a checkpoint equals the uninterrupted run; IST and GreenTrainer train through the loop."""
    d = write_data(tmp_path / "d.jsonl")
    opts = dict(data=d, max_steps=4, batch_size=4, lr=1e-2, cpu=True, calibration_batches=2)
    for method, config in (("ist", {"target_modules": ["q_proj"], "update_interval": 2, "rl_steps": 2}),
                           ("greentrainer", {"target_modules": ["q_proj", "v_proj"], "rho": 0.6})):
        r = Run(TrainOptions(method=method, out=tmp_path / f"{method}.safetensors", config=config, **opts))
        r.prepare()
        r.loop()
        assert af.load(tmp_path / f"{method}.safetensors").method == method
    light = {**LIGHT, "estimate_steps": 3}
    r = Run(TrainOptions(method="light_peft", out=tmp_path / "l.safetensors", config=light, checkpoint_every=2, **opts))
    r.prepare()
    r.loop()
    whole = af.load(tmp_path / "l.safetensors")
    r = Run(TrainOptions(resume=tmp_path / "l.safetensors.checkpoints" / "step-00000002", overwrite=True, cpu=True))
    r.prepare()
    r.loop()
    resumed = af.load(tmp_path / "l.safetensors")
    assert set(whole.modules) == set(resumed.modules) and {e["kind"] for e in whole.modules.values()} == {"lowrank", "mask"}
    for n in whole.tensors():
        assert torch.equal(resumed.tensor(n), whole.tensor(n)), n
