"""STAR (plugins/methods/star.py, adapterfmt/verbs/acquire.py, `adapter acquire`): the B-only AdamW decay is a
hand-computed AdamW step; PE / Entropy / the dynamic score equal a per-example transcription of the reference's
``al_methods.py`` + ``normalize_list`` + stable descending sort; Monte-Carlo dropout passes differ (and with
dropout 0 equal the single pass); one-line refusals that write nothing; `adapter train --method star`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_methods import one_thread  # noqa: F401 (fixture)
from helpers_spec import invoke

import adapterfmt as af
from adapterfmt.plugin.registry import get_method
from adapterfmt.tiny import build_tiny
from adapterfmt.verbs.acquire import encode, read_pool, top
from adapterfmt.verbs.trainer import ByteTokenizer, TrainOptions, train_adapter

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4, "alpha": 8}


def test_one_adamw_step_decays_b_only_by_hand():
    model = build_tiny(seed=0)
    session = get_method("star").train(model, config={**SMALL, "dropout": 0.0, "a_weight_decay": 0.01})
    with torch.no_grad():
        for layer in session.layers.values():
            layer.weights.lora_B.normal_(0, 0.1)
    before = {n: p.detach().clone() for n, p in session.named_parameters()}
    lr, eps = 1e-2, 1e-8
    opt = session.optimizer(lr=lr, eps=eps)
    model(torch.tensor([list(b"hello star")])).square().mean().backward()  # the tiny model returns logits
    grads = {n: p.grad.clone() for n, p in session.named_parameters()}
    opt.step()
    for name, p in session.named_parameters():
        wd = 0.5 if name.endswith("lora_B") else 0.01
        g = grads[name]  # step 1: m_hat = g, v_hat = g^2
        want = before[name] * (1 - lr * wd) - lr * g / (g.abs() + eps)
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads.values())
    with pytest.raises(af.UnsupportedError, match="a single weight_decay 0.1 would override it"):
        session.optimizer(lr=lr, weight_decay=0.1)
    session.remove()


# ----- the reference's measures, transcribed per example (al_methods.py, utils.normalize_list) ---------------
def ref_pe(logits: np.ndarray, ids: list[int], length: int) -> float:
    out = []
    for row, tok in zip(logits[length - 1:], ids[length:]):
        p = np.exp(row - row.max())
        p /= p.sum()
        out.append(-np.log(p[tok]))
    return float(np.sum(out))


def ref_entropy(logits: np.ndarray, ids: list[int], length: int) -> float:
    total = 0.0
    for row, _ in zip(logits[length - 1:], ids[length:]):
        p = np.exp(row - row.max())
        p /= p.sum()
        total += float(np.sum(-p * np.log(p)))
    return total


def normalize_list(xs: list[float]) -> list[float]:
    lo, hi = min(xs), max(xs)
    return [(x - lo) / (hi - lo) for x in xs]


def write_pool(path: Path, n: int = 14) -> Path:
    words = ["red", "sky", "sea", "cat", "sun", "dog", "map"]
    path.write_text("".join(json.dumps({"prompt": f"{words[i % 7]} {i}:", "completion": " " + words[(3 * i) % 7] * (1 + i % 3)})
                            + "\n" for i in range(n)))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A STAR adapter on the tiny model with non-zero B (so the current model differs from the base)."""
    session = get_method("star").train(build_tiny(seed=0), config=SMALL)
    with torch.no_grad():
        for p in session.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    path = tmp_path_factory.mktemp("star") / "a.safetensors"
    af.save(session.extract(base_name="adapterfmt-tiny"), path)
    session.remove()
    return path


@pytest.mark.parametrize("measure, ref", [("pe", ref_pe), ("entropy", ref_entropy)])
def test_measures_and_dynamic_score_are_the_references(tmp_path: Path, trained: Path, measure: str, ref):
    pool = write_pool(tmp_path / "pool.jsonl")
    labelled = tmp_path / "lab.jsonl"
    labelled.write_text("".join(pool.read_text().splitlines(keepends=True)[i] for i in (1, 4, 6)))
    records = read_pool(pool)
    examples = encode(records, ByteTokenizer(128), 512)
    model = build_tiny(seed=0).eval()

    def per_example(m: torch.nn.Module) -> list[float]:  # one unpadded forward per record, as the reference
        with torch.no_grad():
            return [ref(m(torch.tensor([e.ids]))[0].double().numpy(), list(e.ids), e.loss_from)
                    for e in examples]

    base = per_example(model)
    batched = af.answer_uncertainty(model, examples, measure=measure, batch_size=5)  # right-padded batches
    np.testing.assert_allclose(batched.numpy(), base, rtol=1e-5)
    af.attach(model, af.load(trained))
    current = per_example(model)
    assert max(abs(a - b) for a, b in zip(base, current)) > 1e-3

    iteration, base_norm = 2, normalize_list(base)  # the base normalised over the whole pool (_value_all)
    rest = [i for i in range(len(records)) if i not in (1, 4, 6)]
    w = 0.1 * (iteration + 1)
    value = normalize_list([w * current[i] + (1 - w) * base_norm[i] for i in rest])
    order = sorted(zip(rest, value), key=lambda x: x[1], reverse=True)[:5]
    got = af.acquire(pool, n=5, adapter=trained, labelled=labelled, iteration=iteration, measure=measure,
                     dropout=0.0, out=tmp_path / "sel.jsonl")
    assert got.selected == [i for i, _ in order] and got.candidates == 11 and got.weight == pytest.approx(w)
    np.testing.assert_allclose(got.scores, [v for _, v in order], rtol=1e-5, atol=1e-9)
    lines = pool.read_text().splitlines()
    assert (tmp_path / "sel.jsonl").read_text().splitlines() == [lines[i] for i in got.selected]
    static = af.acquire(pool, n=5, adapter=trained, labelled=labelled, measure=measure, dynamic=False)
    plain = sorted(zip(rest, normalize_list([current[i] for i in rest])), key=lambda x: x[1], reverse=True)[:5]
    assert static.selected == [i for i, _ in plain] and static.weight is None


def test_mc_dropout_passes_differ_and_without_dropout_equal_one_pass(tmp_path: Path, trained: Path):
    pool = write_pool(tmp_path / "pool.jsonl")
    examples = encode(read_pool(pool), ByteTokenizer(128), 512)
    adapter = af.load(trained)
    model = build_tiny(seed=0).eval()
    af.attach(model, adapter, dropout=0.5)
    a, b = (af.answer_uncertainty(model, examples, measure="pe") for _ in range(2))
    assert (a - b).abs().max() > 1e-3  # eval mode, yet each pass draws its own dropout mask
    af.detach(model)
    af.attach(model, adapter)
    one = af.answer_uncertainty(model, examples, measure="pe")
    mc = torch.stack([af.answer_uncertainty(model, examples, measure="pe") for _ in range(3)])
    assert torch.equal(mc.mean(0), one) or torch.allclose(mc.mean(0), one, rtol=1e-12)
    assert torch.equal(af.star_scores(mc), af.star_scores(one[None]))
    # dropout recorded in the adapter (0.1) is the default; a seed makes the draws repeatable
    first, again = (af.acquire(pool, n=4, adapter=trained, seed=3) for _ in range(2))
    zero = af.acquire(pool, n=4, adapter=trained, dropout=0.0)
    assert first.scores == again.scores and first.scores != zero.scores


def test_top_is_stable_and_minmax_handles_ties():
    assert top(torch.tensor([0.5, 1.0, 0.5, 1.0, 0.0]), 3) == [1, 3, 0]
    assert af.star_scores(torch.tensor([[2.0, 2.0]])).tolist() == [0.0, 0.0]
    s = af.star_scores(torch.tensor([[1.0, 3.0, 2.0]]), torch.tensor([1.0, 0.0, 0.5]), 0.5)
    torch.testing.assert_close(s, torch.tensor([0.0, 1.0, 0.5]))  # 1.0, 1.5, 1.25 normalised


def test_no_examples_score_nothing_and_batch_size_0_is_refused(tmp_path: Path):
    model = build_tiny(seed=0).eval()
    none = af.answer_uncertainty(model, [], measure="entropy")
    assert none.shape == (0,) and none.dtype == torch.float64
    assert af.star_scores(torch.zeros(3, 0), torch.zeros(0), 0.5).shape == (0,)
    examples = encode(read_pool(write_pool(tmp_path / "pool.jsonl", n=2)), ByteTokenizer(128), 512)
    with pytest.raises(af.AdapterError, match="batch_size 0 must be at least 1"):
        af.answer_uncertainty(model, examples, measure="pe", batch_size=0)


def test_a_device_that_is_not_one_is_refused_in_one_line(tmp_path: Path):
    pool = write_pool(tmp_path / "pool.jsonl", n=2)
    with pytest.raises(af.AdapterError, match="device 'tpu' is not a torch device"):
        af.acquire(pool, n=1, device="tpu", out=tmp_path / "out.jsonl")
    if not torch.cuda.is_available():
        with pytest.raises(af.AdapterError, match="device 'cuda': no CUDA device is available here"):
            af.acquire(pool, n=1, device="cuda", out=tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("lines, args, message", [
    (['{"prompt": "a"}'], ["--n", "1"], "line 1: a record needs string 'prompt' and 'completion' fields"),
    (['{"prompt": "a", "completion": "b"}', "{"], ["--n", "1"], "line 2: not JSON"),
    (['{"prompt": "a", "completion": "b"}'], ["--n", "2"], "n 2 exceeds the 1 unlabelled records of the pool"),
    (['{"prompt": "a", "completion": "b"}'], ["--n", "1", "--iteration", "10"],
     "iteration 10: the current model's weight 0.1 * (10 + 1) = 1.1 is outside (0, 1]; pass a weight_step in "
     "(0, 0.0909091]"),
    (['{"prompt": "a", "completion": "b"}'], ["--n", "1", "--weight-step", "0"],
     "weight 0.0 * (0 + 1) = 0 is outside (0, 1]; pass a weight_step in (0, 1]"),
    (['{"prompt": "a", "completion": "b"}'], ["--n", "1", "--labelled", "LAB"], "labelled record is not in the pool"),
    (['{"prompt": "a", "completion": "b"}'], ["--n", "1", "--labelled", "NONE"], "none.jsonl: labelled file not found"),
    (['{"prompt": "a", "completion": ""}'], ["--n", "1"], "line 1: no completion token within max_length"),
])
def test_cli_refuses_bad_input_in_one_line_writing_nothing(tmp_path: Path, lines, args, message):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n".join(lines) + "\n")
    (tmp_path / "lab.jsonl").write_text('{"prompt": "x", "completion": "y"}\n')
    args = [str(tmp_path / "lab.jsonl") if a == "LAB" else str(tmp_path / "none.jsonl") if a == "NONE" else a
            for a in args]
    r = invoke("acquire", "--pool", str(pool), "--out", str(tmp_path / "sel.jsonl"), *args)
    assert r.exit_code == 1 and message in r.stderr, r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error")]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lab.jsonl", "pool.jsonl"]


def test_cli_usage_and_existing_output(tmp_path: Path):
    pool = write_pool(tmp_path / "pool.jsonl")
    r = invoke("acquire", "--pool", str(pool), "--n", "1", "--out", str(tmp_path / "o.jsonl"), "--measure", "bald")
    assert r.exit_code == 2 and "--measure 'bald' is not one of pe, entropy" in r.stderr
    (tmp_path / "o.jsonl").write_text("keep\n")
    r = invoke("acquire", "--pool", str(pool), "--n", "1", "--out", str(tmp_path / "o.jsonl"))
    assert r.exit_code == 1 and (tmp_path / "o.jsonl").read_text() == "keep\n"


def test_adapter_train_star_then_acquire(tmp_path: Path):
    """`adapter train --method star` end to end: with both decays 0 it trains LoRA's adapter bit for bit (same
    seed, same options); with the default B decay, the B factors end smaller and the A factors are LoRA's
    trajectory apart; then `adapter acquire` on its adapter writes the selection."""
    pool = write_pool(tmp_path / "pool.jsonl", 16)
    data = tmp_path / "lab.jsonl"
    data.write_text("".join(pool.read_text().splitlines(keepends=True)[:8]))
    common = {"data": data, "max_steps": 6, "batch_size": 4, "lr": 5e-2, "cpu": True}
    cfg = {**SMALL, "dropout": 0.1}
    lora = train_adapter(TrainOptions(method="lora", out=tmp_path / "lora.safetensors", config=cfg, **common))
    zero = train_adapter(TrainOptions(method="star", out=tmp_path / "zero.safetensors", **common,
                                      config={**cfg, "b_weight_decay": 0.0}))
    a, b = af.load(lora.out), af.load(zero.out)
    assert all(torch.equal(a.tensor(n), b.tensor(n)) for n in a.tensors()) and b.manifest["method"]["name"] == "star"
    (tmp_path / "cfg.yaml").write_text("target_modules: [q_proj, v_proj, down_proj]\nr: 4\nalpha: 8\n"
                                       "b_weight_decay: 5.0\n")
    r = invoke("train", "--method", "star", "--data", str(data), "--out", str(tmp_path / "star.safetensors"),
               "--config", str(tmp_path / "cfg.yaml"), "--max-steps", "6", "--batch-size", "4", "--lr", "5e-2",
               "--cpu", "--json")
    assert r.exit_code == 0, r.stderr
    star = af.load(tmp_path / "star.safetensors")
    assert star.manifest["method"]["config"]["b_weight_decay"] == 5.0
    assert {m["kind"] for m in star.manifest["modules"].values()} == {"lowrank"}
    norm = {k: sum(float(x.tensor(n).norm()) for n in x.tensors() if n.endswith(".lora_B")) for k, x in
            (("star", star), ("zero", b))}
    assert norm["star"] < 0.9 * norm["zero"]
    r = invoke("train", "--method", "star", "--data", str(data), "--out", str(tmp_path / "wd.safetensors"),
               "--weight-decay", "0.1", "--max-steps", "1", "--cpu")
    assert r.exit_code == 1 and "leave it at 0" in r.stderr and not (tmp_path / "wd.safetensors").exists()
    r = invoke("acquire", "--adapter", str(tmp_path / "star.safetensors"), "--pool", str(pool), "--labelled",
               str(data), "--n", "3", "--iteration", "0", "--mc-passes", "2", "--out", str(tmp_path / "next.jsonl"),
               "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["candidates"] == 8 and report["weight"] == pytest.approx(0.1) and len(report["selected"]) == 3
    assert all(s["line"] > 8 for s in report["selected"])
    assert [json.loads(ln) for ln in (tmp_path / "next.jsonl").read_text().splitlines()] == [
        json.loads(pool.read_text().splitlines()[s["line"] - 1]) for s in report["selected"]]


def test_config_is_strict():
    model = build_tiny(seed=0)
    for config, message in (({"use_dora": True}, "star config has unknown key(s): 'use_dora'"),
                            ({"b_weight_decay": -1}, "star config field b_weight_decay")):
        with pytest.raises(af.FormatError, match=message.replace("(", r"\(").replace(")", r"\)")):
            get_method("star").train(model, config=config)
    assert not any(n.endswith("adapterfmt_delta") for n, _ in model.named_modules())


def test_a_labelled_record_labels_its_duplicates_in_the_pool(tmp_path: Path):
    pool = tmp_path / "pool.jsonl"
    rec, other = '{"prompt": "a", "completion": "b"}', '{"prompt": "c", "completion": "d"}'
    pool.write_text(f"{rec}\n{other}\n{rec}\n")
    (tmp_path / "lab.jsonl").write_text(rec + "\n")
    got = af.acquire(str(pool), n=1, labelled=str(tmp_path / "lab.jsonl"), dynamic=False)
    assert got.candidates == 1 and got.selected == [1] and got.scores == [0.0]


def test_adapter_train_star_resumes_exactly(tmp_path: Path):
    """A run resumed from its step-3 checkpoint (the two-group optimizer's state included) equals the whole run."""
    data = write_pool(tmp_path / "d.jsonl", 8)
    common = {"data": data, "max_steps": 6, "batch_size": 4, "lr": 5e-2, "cpu": True, "config": SMALL}
    whole = train_adapter(TrainOptions(method="star", out=tmp_path / "whole.safetensors", checkpoint_every=3, **common))
    resumed = train_adapter(TrainOptions(resume=whole.checkpoints[0], out=tmp_path / "resumed.safetensors"))
    a, b = af.load(whole.out), af.load(resumed.out)
    assert resumed.resumed_from == 3 and all(torch.equal(a.tensor(n), b.tensor(n)) for n in a.tensors())
