"""Training procedures on the session hooks (plugins/methods/procedures.py): TriAdaptLoRA's triangular C and
threshold rank growth, DiffoRA's module selection, S2-LoRA's shared factors stored once; each through
``adapter train`` (TriAdaptLoRA resumed with its last importances, S2-LoRA exactly)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from adapterfmt.plugins.methods.procedures import diffora_selection, growth_threshold
from helpers_methods import one_thread  # noqa: F401 (fixture)
from helpers_spec import invoke

import adapterfmt as af
from adapterfmt.authoring.conformance import Example, check_method
from adapterfmt.plugin.registry import get_kind, get_method
from adapterfmt.tiny import TinyConfig, build_tiny
from adapterfmt.verbs.trainer import TrainOptions, train_adapter

CFG = TinyConfig(vocab_size=32, hidden=16, layers=2, heads=2, intermediate=32)
TARGETS = {"target_modules": ["q_proj", "v_proj"]}


pytestmark = pytest.mark.usefixtures("one_thread")


def ids() -> torch.Tensor:
    return torch.randint(0, 32, (3, 6), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def run(model, session, steps: int, opt, *, reg: bool = True) -> list[float]:
    target = torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(4))
    losses = []
    for _ in range(steps):
        loss = (logits(model, ids()) - target).square().mean()
        (loss + (session.regularization() if reg else 0)).backward()
        session.after_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        session.step(opt)
        losses.append(float(loss.detach()))
    return losses


def reloaded_output(adapter: af.Adapter, tmp: Path) -> torch.Tensor:
    base = build_tiny(0, CFG)
    af.attach(base, af.validate(af.save(adapter, tmp / "a.safetensors", overwrite=True)))
    with torch.no_grad():
        return logits(base.eval(), ids())


# ----- TriAdaptLoRA ---------------------------------------------------------------------------------------
TRI = {**TARGETS, "init_rank": 1, "reference_rank": 2, "alpha": 4, "total_step": 10}


def fork_delta(a_blocks, b_blocks, rows, cols, alpha):
    """The fork's ``loraW.forward``: zero-padded block rows and columns concatenated, summed; B (C A) alpha / r."""
    r = rows[-1].shape[1]
    lower = torch.cat([torch.cat([c, torch.zeros(c.shape[0], r - c.shape[1])], 1) for c in rows], 0)
    upper = torch.cat([torch.cat([c, torch.zeros(r - c.shape[0], c.shape[1])], 0) for c in cols], 1)
    return torch.cat(list(b_blocks), 1) @ ((lower + upper) @ torch.cat(list(a_blocks), 0)) * alpha / (r + 1e-5)


def test_triadaptlora_starts_at_the_base_and_trains_c_first():
    """dW = 0 at the start (C zero), yet C gets a gradient (A, B ~ N(0, 0.02)): the fork's all-zero init
    would leave every gradient zero."""
    model = build_tiny(0, CFG)
    with torch.no_grad():
        want = logits(model, ids())
    torch.manual_seed(0)
    session = get_method("triadaptlora").train(model, config=dict(TRI))
    out = logits(model, ids())
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    out.square().mean().backward()
    grads = {n: p.grad for n, p in session.named_parameters()}
    q0 = "model.layers.0.self_attn.q_proj"
    assert grads[f"{q0}.C_rows_0"].abs().sum() > 0 and grads[f"{q0}.C_cols_0"].abs().sum() > 0
    assert grads[f"{q0}.A_0"].abs().sum() == 0 and grads[f"{q0}.B_0"].abs().sum() == 0
    assert 0.01 < float(session.layers[q0].blocks_A[0].detach().std()) < 0.04


def test_triadaptlora_grows_by_threshold_and_extracts_what_it_computes(tmp_path: Path):
    model = build_tiny(0, CFG)
    torch.manual_seed(0)
    session = get_method("triadaptlora").train(model, config=dict(TRI))
    assert not session.has_schedule and {p: l.rank for p, l in session.layers.items()} == dict.fromkeys(session.layers, 1)
    opt = torch.optim.AdamW(session.parameters(), lr=1e-2)
    run(model, session, 1, opt)
    # step 1 of 10: n = max(1, int((8 - 4) * 0.1)) = 1: only the largest change of ||C||_F / 1 (from 0) grows
    norms = {p: float(torch.linalg.norm(l.mid().detach()[:1, :1])) for p, l in session.layers.items()}
    grown = [p for p, l in session.layers.items() if l.rank == 2]
    assert grown == [max(norms, key=norms.get)]
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == 4 * 4 + 4  # the new blocks too
    layer = session.layers[grown[0]]
    assert [tuple(c.shape) for c in layer.rows] == [(1, 1), (1, 2)] and [tuple(c.shape) for c in layer.cols] == [(1, 1), (2, 1)]
    run(model, session, 9, opt)
    ranks = {p: l.rank for p, l in session.layers.items()}
    assert sum(ranks.values()) == 8  # the budget, reference_rank x modules, reached: growth stops there
    run(model, session, 2, opt)
    assert {p: l.rank for p, l in session.layers.items()} == ranks
    new_c = [p for n, p in session.named_parameters() if "_C_" in n.replace(".C_", "_C_") and not n.endswith("_0")]
    assert new_c and all(float(p.detach().abs().sum()) > 0 for p in new_c)  # grown blocks of C trained
    for l in session.layers.values():  # the session computes the fork's formula on its blocks
        t = l.tensors()
        dw = l.entry["params"]["scale"] * t["lora_B"] @ t["lora_mid"] @ t["lora_A"]
        torch.testing.assert_close(dw, fork_delta(l.blocks_A, l.blocks_B, l.rows, l.cols, 4.0))
    model.eval()
    with torch.no_grad():
        want = logits(model, ids())
    adapter = session.extract()
    entry = adapter.modules[grown[0]]
    assert adapter.tensor(f"{grown[0]}.lora_mid").shape == (layer.rank, layer.rank)
    assert entry["params"]["scale"] == pytest.approx(4 / (layer.rank + 1e-5), rel=1e-12)
    torch.testing.assert_close(reloaded_output(adapter, tmp_path), want, rtol=1e-5, atol=1e-5)


def test_growth_threshold_follows_the_fork():
    """n = int((target - total) * c) (linear) or int(exp(c * log(target - total))), at least 1, at most all;
    the threshold is the n-th largest importance."""
    cfg = {"init_warmup": 2, "total_step": 12, "rank_growth_model": "linear"}
    scores = [0.5, 0.1, 0.9, 0.3]
    assert growth_threshold(scores, 3, 4, 16, cfg) == 0.9  # c = 0.1: int(1.2) = 1
    assert growth_threshold(scores, 5, 4, 16, cfg) == 0.3  # c = 0.3: int(3.6) = 3
    assert growth_threshold(scores, 7, 4, 16, cfg) == 0.1  # c = 0.5: int(6) = 6 -> all 4
    nonlinear = {**cfg, "rank_growth_model": "non-linear"}
    assert growth_threshold(scores, 7, 4, 16, nonlinear) == 0.3  # int(exp(0.5 log 12)) = int(3.46) = 3
    assert growth_threshold(scores, 2, 4, 16, cfg) == growth_threshold(scores, 2, 4, 16, nonlinear) == 0.9


def test_triadaptlora_config_is_strict():
    model = build_tiny(0, CFG)
    with pytest.raises(af.FormatError, match="unknown key.*'init_ranks' \\(did you mean 'init_rank'"):
        get_method("triadaptlora").train(model, config={**TRI, "init_ranks": 2})
    with pytest.raises(af.FormatError, match="total_step: must exceed init_warmup"):
        get_method("triadaptlora").train(model, config={**TRI, "init_warmup": 10})


# ----- DiffoRA --------------------------------------------------------------------------------------------
DIFFO = {"target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"], "r": 2, "alpha": 4, "search_steps": 4,
         "select_ratio": 0.5}


def test_diffora_keeps_the_heaviest_modules_without_a_jump(tmp_path: Path):
    """During the search every module's update is weighted by its gate (an adapter extracted then computes the
    session); at step ``search_steps`` the heaviest half keep their update exactly (weight folded into B), the
    rest are dropped, the gates leave the parameters; the adapter holds the chosen modules only."""
    model = build_tiny(0, CFG)
    torch.manual_seed(0)
    session = get_method("diffora").train(model, config=dict(DIFFO))
    assert len(session.layers) == 8 and not session.has_schedule  # its selection state is checkpointed
    opt = torch.optim.Adam(session.parameters(), lr=2e-2)
    run(model, session, 3, opt)
    model.eval()
    with torch.no_grad():
        mid_search = logits(model, ids())
    torch.testing.assert_close(reloaded_output(session.extract(), tmp_path), mid_search, rtol=1e-5, atol=1e-5)
    model.train()
    target = torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(4))
    (logits(model, ids()) - target).square().mean().backward()
    session.after_backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        weights = {p: float(l.weight()) for p, l in session.layers.items()}
        deltas = {p: l.tensors()["lora_B"] @ l.tensors()["lora_A"] for p, l in session.layers.items()}
    assert len(set(weights.values())) == 8  # the gates moved apart
    session.step(opt)  # step 4 = search_steps: the selection
    want = sorted(weights, key=lambda p: -weights[p])[:4]
    assert sorted(session.layers) == sorted(want)
    for p, l in session.layers.items():
        assert not l.searching and not l.gate.requires_grad
        torch.testing.assert_close(l.tensors()["lora_B"] @ l.tensors()["lora_A"], deltas[p], rtol=1e-6, atol=1e-7)
    assert not any(n.endswith(".gate") for n, _ in session.named_parameters())
    assert not any(hasattr(model.get_submodule(p), "adapterfmt_delta") for p in set(weights) - set(want))
    run(model, session, 2, opt)
    adapter = session.extract()
    assert sorted(adapter.modules) == sorted(want)
    model.eval()
    with torch.no_grad():
        final = logits(model, ids())
    torch.testing.assert_close(reloaded_output(adapter, tmp_path), final, rtol=1e-5, atol=1e-5)



def test_diffora_search_alternates_factors_and_gates():
    """First-order DARTS: even steps move the factors only, odd steps the gates only (plain SGD, no momentum);
    ``search: joint`` moves both at every step."""
    def moved(search: str) -> list[tuple[bool, bool]]:
        model = build_tiny(0, CFG)
        torch.manual_seed(0)
        session = get_method("diffora").train(model, config={**DIFFO, "search": search})
        opt = torch.optim.SGD(session.parameters(), lr=0.5)
        out = []
        for _ in range(3):
            gates = [l.gate.detach().clone() for l in session.layers.values()]
            factors = [l.weights.lora_B.detach().clone() for l in session.layers.values()]
            run(model, session, 1, opt)
            out.append((any(not torch.equal(g, l.gate) for g, l in zip(gates, session.layers.values())),
                        any(not torch.equal(f, l.weights.lora_B) for f, l in zip(factors, session.layers.values()))))
        return out

    assert moved("alternate") == [(False, True), (True, False), (False, True)]
    assert moved("joint") == [(False, True), (True, True), (True, True)]  # B starts at 0: no gate gradient at first

def test_diffora_selection_count_and_ties():
    model = build_tiny(0, CFG)
    session = get_method("diffora").train(model, config=dict(DIFFO))
    paths = list(session.layers)
    with torch.no_grad():
        for i, p in enumerate(paths):
            session.layers[p].gate.copy_(torch.tensor([0.0, 1.0 if i in (2, 5) else 0.0]))
    kept, dropped = diffora_selection(session, 0.3)  # ceil(2.4) = 3: the two heaviest, then the first tie
    assert kept == [paths[2], paths[5], paths[0]] and len(dropped) == 5
    assert diffora_selection(session, 0.01)[0] == [paths[2]]


# ----- S2-LoRA --------------------------------------------------------------------------------------------
S2 = {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 2, "alpha": 4, "l1": 1e-2}


def test_s2_lora_shares_trained_factors_and_stores_them_once(tmp_path: Path):
    model = build_tiny(0, CFG)
    torch.manual_seed(0)
    session = get_method("s2_lora").train(model, config=dict(S2))
    q0, q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    assert session.layers[q0].lora_A is session.layers[q1].lora_A  # one parameter, two layers
    names = [n for n, _ in session.named_parameters()]
    assert len(names) == len(set(names)) == 6 + 3 * 2  # a lambda per module, A and B per group
    assert session.regularization().item() == pytest.approx(1e-2 * 6 * 2)  # l1 * sum |lambda|, lambda = 1
    opt = torch.optim.Adam(session.parameters(), lr=2e-2)
    run(model, session, 5, opt)
    assert not torch.equal(session.layers[q0].weights.lora_mid, session.layers[q1].weights.lora_mid)
    model.eval()
    with torch.no_grad():
        want = logits(model, ids())
    adapter = session.extract()
    shared = sorted(n for n in adapter.tensor_names() if not n.startswith(tuple(adapter.modules)))
    assert shared == ["model.layers.N.mlp.down_proj.16x32.lora_A", "model.layers.N.mlp.down_proj.16x32.lora_B",
                      "model.layers.N.self_attn.q_proj.16x16.lora_A", "model.layers.N.self_attn.q_proj.16x16.lora_B",
                      "model.layers.N.self_attn.v_proj.16x16.lora_A", "model.layers.N.self_attn.v_proj.16x16.lora_B"]
    assert adapter.modules[q1]["params"]["shared"] == {"lora_A": "model.layers.N.self_attn.q_proj.16x16.lora_A",
                                                       "lora_B": "model.layers.N.self_attn.q_proj.16x16.lora_B"}
    assert adapter.tensor(f"{q1}.lora_mid").shape == (2,)
    stored = sum(adapter.tensor(n).numel() for n in adapter.tensor_names())
    assert stored == sum(p.numel() for p in session.parameters())  # nothing stored twice
    torch.testing.assert_close(reloaded_output(adapter, tmp_path), want, rtol=1e-5, atol=1e-5)



def test_compress_resize_of_shared_factors_writes_each_module_its_own(tmp_path: Path):
    """Resizing refactors each module's dW (shared factors and lambda) into factors of its own: the shared
    entries are dropped from params.shared (they used to stay, so the file read the old shared factors without
    lambda, while the report described the new ones)."""
    model = build_tiny(0, CFG)
    session = get_method("s2_lora").train(model, config=dict(S2))
    with torch.no_grad():
        for p in session.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    adapter = session.extract()
    out = af.load(af.save(af.compress_adapter(adapter, steps=[{"method": "resize", "rank": 2}]),
                          tmp_path / "r.safetensors"))
    kind = get_kind("lowrank")
    for path, entry in adapter.modules.items():
        assert "shared" not in out.modules[path]["params"]
        want = kind.delta(entry, adapter.module_tensors(path))
        torch.testing.assert_close(kind.delta(out.modules[path], out.module_tensors(path)), want,
                                   rtol=1e-5, atol=1e-6)
    assert not any(".N." in n for n in out.tensor_names())
    assert out.manifest["compression"]["dW_rel_error_max"] < 1e-5

@pytest.mark.parametrize("options", [["--codec", "int8"], ["--density", "0.5"]])
def test_compress_codecs_that_find_nothing_to_encode_in_s2_lora_say_so(tmp_path: Path, options: list[str]):
    """S2-LoRA's factors are shared (stored plain, spec section 5) and its coefficients 1-D (never encoded): int8
    and ComPEFT encode nothing, so the file only grows by the record; the report and the CLI say why in one note."""
    session = get_method("s2_lora").train(build_tiny(0, CFG), config=dict(S2))
    src = af.save(session.extract(), tmp_path / "s2.safetensors")
    res = invoke("compress", str(src), "--out", str(tmp_path / "q.safetensors"), *options)
    assert res.exit_code == 0, res.output
    notes = [line for line in res.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "encoded no tensor" in notes[0], res.output
    assert "6 shared tensor(s) stay plain" in notes[0] and "6 tensor(s) 1-D" in notes[0] and "not smaller" in notes[0]
    out = af.load(tmp_path / "q.safetensors")
    assert out.manifest["compression"]["notes"] == [notes[0].removeprefix("note: ")]
    assert not any("encoding" in e for e in out.modules.values())
    lora = af.Adapter(af.new_manifest("lora", {"m": af.lowrank_entry([4, 4], 1.0)}),
                      {"m.lora_A": torch.ones(2, 4), "m.lora_B": torch.ones(4, 2)})
    assert "notes" not in af.compress_adapter(lora, steps=[{"method": "quantize", "bits": 8}]).manifest["compression"]


def s2_example() -> Example:
    """S2-LoRA trained a little on a two-layer model, so each group is shared by two modules."""
    model = build_tiny(0, CFG)
    trained = build_tiny(0, CFG)
    session = get_method("s2_lora").train(trained, config=dict(S2))
    with torch.no_grad():
        for p in session.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    return Example(model, session.extract(), ids(), train_config=dict(S2))


def test_s2_lora_conforms_with_shared_factors():
    """The conformance kit (attach, merge, compress, port ... of kind lowrank) on factors shared by layers."""
    report = check_method("s2_lora", s2_example)
    assert report.by_status("fail") == {} and report.by_status("skip") == {}, report.to_dict()


# ----- through adapter train --------------------------------------------------------------------------------
def write_data(path: Path) -> Path:
    path.write_text("".join(f'{{"text": "the cat {i} sat on the mat {i % 3}"}}\n' for i in range(8)))
    return path


@pytest.mark.parametrize("method,config", [("triadaptlora", "target_modules: [q_proj, v_proj]\ntotal_step: 4\n"),
                                           ("diffora", "target_modules: [q_proj, v_proj]\nsearch_steps: 2\n")])
def test_scheduled_methods_train_and_checkpoint_from_the_command_line(tmp_path: Path, method, config):
    data = write_data(tmp_path / "data.jsonl")
    (tmp_path / "cfg.yaml").write_text(config)
    common = ["train", "--method", method, "--data", str(data), "--config", str(tmp_path / "cfg.yaml"),
              "--max-steps", "4", "--batch-size", "2", "--lr", "1e-2", "--cpu", "--quiet"]
    res = invoke(*common, "--out", str(tmp_path / "out.safetensors"))
    assert res.exit_code == 0, res.output
    adapter = af.load(tmp_path / "out.safetensors")
    assert adapter.manifest["method"]["name"] == method
    if method == "diffora":
        assert len(adapter.modules) == 2  # of 4 candidates
    else:
        assert sum(adapter.tensor(f"{p}.lora_A").shape[0] for p in adapter.modules) > 4  # grown from rank 1 each
    res = invoke(*common, "--out", str(tmp_path / "ck.safetensors"), "--checkpoint-every", "2")
    # the schedule state is checkpointed (resumed exactly: tests/test_train_cmd.py::test_killed_run_resumes_exactly)
    assert res.exit_code == 0 and (tmp_path / "ck.safetensors.checkpoints" / "step-00000002").is_dir()


def test_s2_lora_resumes_exactly(tmp_path: Path):
    """S2-LoRA has no schedule: a run resumed from its step-2 checkpoint (shared factors restored) equals the
    uninterrupted run."""
    data = write_data(tmp_path / "data.jsonl")
    base = {"method": "s2_lora", "data": data, "config": dict(S2, target_modules=["q_proj", "v_proj"]),
            "max_steps": 4, "batch_size": 2, "lr": 1e-2, "cpu": True}
    whole = train_adapter(TrainOptions(**base, out=tmp_path / "whole.safetensors", checkpoint_every=2))
    assert [p.name for p in whole.checkpoints] == ["step-00000002"]
    resumed = train_adapter(TrainOptions(resume=whole.checkpoints[0], out=tmp_path / "resumed.safetensors"))
    assert resumed.resumed_from == 2
    a, b = af.load(whole.out), af.load(resumed.out)
    assert sorted(a.tensor_names()) == sorted(b.tensor_names())
    assert all(torch.equal(a.tensor(n), b.tensor(n)) for n in a.tensor_names())


def test_triadaptlora_resumes_with_the_last_importances(tmp_path: Path):
    """A growth right after the resumption scores each module by the change of its normalised ||C||_F since the
    growth before the checkpoint: the checkpoint's last norms are restored, so the resumed run grows the modules
    the uninterrupted one grows (starting them from zero instead picks others here)."""
    data = write_data(tmp_path / "data.jsonl")
    config = {"target_modules": "all-linear", "reference_rank": 4, "incre_rank_num": 1, "total_step": 100,
              "incre_interval": 2}
    base = {"method": "triadaptlora", "data": data, "config": config, "max_steps": 8, "batch_size": 4, "lr": 1e-2,
            "cpu": True}
    whole = train_adapter(TrainOptions(**base, out=tmp_path / "whole.safetensors", checkpoint_every=4))
    state = torch.load(whole.checkpoints[0] / "schedule.pt", weights_only=True)["hooks"][0]
    assert len(state["growths"]) == 2 and all(v > 0 for v in state["previous"].values())
    resumed = train_adapter(TrainOptions(resume=whole.checkpoints[0], out=tmp_path / "resumed.safetensors"))
    a, b = af.load(whole.out), af.load(resumed.out)
    first = af.load(whole.checkpoints[0] / "adapter.safetensors")
    ranks = {p: (first.tensor(f"{p}.lora_A").shape[0], a.tensor(f"{p}.lora_A").shape[0]) for p in a.modules}
    assert any(r < s for r, s in ranks.values()) and any(r == s for r, s in ranks.values())  # some grew after it
    assert sorted(a.tensor_names()) == sorted(b.tensor_names())
    assert all(torch.equal(a.tensor(n), b.tensor(n)) for n in a.tensor_names())
