"""SpIEL (method ``spiel``) and the lean sparse training path every sparse method uses: gradients equal the
dense masked reference, no weight-sized tensor in a step, candidate collection, RigL / SM3 reselection as the
authors' algorithm written out with dense masks, the schedule, and a trained adapter that reloads exactly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from adapterfmt.plugins.methods import sparse as sp
from helpers_methods import lm_loss, lm_task, one_thread  # noqa: F401 (fixture)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import adapterfmt as af
from adapterfmt.tiny import build_tiny

pytestmark = pytest.mark.usefixtures("one_thread")
SPIEL = af.registry.get_method("spiel")


class Conv1D(nn.Module):
    """GPT-2's Conv1D: weight stored [in, out], y = x @ W + b."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(n_in * n_out)
        self.weight = nn.Parameter(torch.randn(n_in, n_out, dtype=torch.float64, generator=g))
        self.bias = nn.Parameter(torch.randn(n_out, dtype=torch.float64, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def _lean(module: nn.Module, k: int, seed: int = 0) -> sp.LeanSparseDelta:
    g = torch.Generator().manual_seed(seed)
    idx = torch.sort(torch.randperm(module.weight.numel(), generator=g)[:k]).values
    d = sp.sparse_trainable(module, idx)
    assert isinstance(d, sp.LeanSparseDelta)
    d.to(module.weight.dtype)
    with torch.no_grad():
        d.weights.values.normal_(generator=g)
    return d


@pytest.mark.parametrize("conv1d", [False, True])
def test_lean_path_equals_the_sparse_kind_and_the_dense_masked_gradient(conv1d: bool) -> None:
    module = Conv1D(40, 24) if conv1d else nn.Linear(40, 24, dtype=torch.float64)
    d = _lean(module, 60)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 40, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 5, 24, generator=g, dtype=torch.float64)
    y = module(x)
    out = d(module, x, y)
    t = {"indices": d.indices, "values": d.weights.values.detach()}
    kind_out = af.registry.get_kind("sparse").forward(module, d.entry, t, x, y)  # its dW is formed in fp32
    torch.testing.assert_close(out, kind_out, rtol=1e-6, atol=1e-6)
    (out - target).square().sum().backward()
    # reference: the whole stored weight trainable, W + dW, its gradient read at the kept entries
    w = module.weight.detach().clone().reshape(-1)
    w[d.indices] += t["values"]
    w = w.reshape(module.weight.shape).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = x_ref @ w + module.bias if conv1d else F.linear(x_ref, w, module.bias)
    (ref - target).square().sum().backward()
    torch.testing.assert_close(d.weights.values.grad, w.grad.reshape(-1)[d.indices])
    torch.testing.assert_close(x.grad, x_ref.grad)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any new tensor an op returns (views of inputs excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest, self.op = 0, ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor) and a.layout == torch.strided}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and t.layout == torch.strided and t.numel() > self.largest
                    and t.untyped_storage().data_ptr() not in inputs):
                self.largest, self.op = t.numel(), str(func)
        return out


@pytest.mark.parametrize("collecting", [False, True])
def test_a_training_step_forms_no_weight_sized_tensor(collecting: bool) -> None:
    module = nn.Linear(2048, 1024, bias=False)
    module.weight.requires_grad_(False)
    d = _lean(module, 20_000)
    d.collecting = collecting
    x = torch.randn(16, 2048, requires_grad=True)
    with LargestTensor() as probe:
        d(module, x, module(x)).square().sum().backward()
    assert d.weights.values.grad is not None and module.weight.grad is None
    # activations (16 x 2048), the kept entries, and when collecting a 2^18-element block of the streamed top-k
    limit = max(sp.BLOCK_ELEMENTS, 16 * 2048) if collecting else 16 * 2048
    assert probe.largest <= limit < module.weight.numel() // 4, (probe.largest, probe.op)


def test_first_backward_of_a_phase_picks_the_dense_topk_and_later_ones_accumulate() -> None:
    module = nn.Linear(900, 300)
    d = _lean(module, 2000)  # several row blocks of the streamed top-k
    d.collecting = True
    g = torch.Generator().manual_seed(2)
    dense = []
    for _ in range(3):
        x = torch.randn(7, 900, generator=g)
        out = d(module, x, module(x))
        go = torch.randn(out.shape, generator=g)
        out.backward(go)
        dense.append(go.t() @ x)
    c = d.candidates
    assert torch.equal(c.indices, torch.sort(torch.topk(dense[0].abs().reshape(-1), d.k).indices).values)
    torch.testing.assert_close(c.grads, sum(dense).reshape(-1)[c.indices], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(c.grads_sq, sum(x.square() for x in dense).reshape(-1)[c.indices], rtol=1e-4, atol=1e-3)
    assert torch.equal(c.samples, torch.full((d.k,), 3.0))


def test_streaming_topk_skips_excluded_positions() -> None:
    scores = torch.rand(700, 500, generator=torch.Generator().manual_seed(1))
    exclude = torch.sort(torch.topk(scores.reshape(-1), 50).indices).values
    got = sp.streaming_topk(lambda r0, r1: scores[r0:r1], (700, 500), 1000, exclude=exclude)
    flat = scores.reshape(-1).clone()
    flat[exclude] = -1
    assert set(got.tolist()) == set(torch.topk(flat, 1000).indices.tolist())


CFG = {**sp.SPIEL_DEFAULTS, "total_steps": 100, "grad_accumulation_steps": 2}


def _reference_rigl(indices, values, state, cand, grads, sq, samples, p, numel):  # type: ignore[no-untyped-def]
    """The authors' ``select_rigl`` for one module with dense boolean masks on their unsorted arrays."""
    indices, values, state = indices.clone(), values.clone(), {k: v.clone() for k, v in state.items()}
    n = int(len(values) * p)
    changing = torch.topk(values.abs(), n, largest=False, sorted=True).indices
    outgoing = indices[changing]
    is_out, is_cur, is_in = (torch.zeros(numel, dtype=torch.bool) for _ in range(3))
    is_out[outgoing], is_cur[indices] = True, True
    valid = ~(is_cur & ~is_out)[cand]
    cand, grads, sq, samples = cand[valid], grads[valid], sq[valid], samples[valid]
    best = torch.topk(grads.abs(), min(n, len(grads)), sorted=True).indices
    inc, grads, sq, samples = cand[best], grads[best], sq[best], samples[best]
    is_in[inc] = True
    changing = changing[~is_in[outgoing]]
    keep = ~is_out[inc]
    inc, grads, sq, samples = inc[keep], grads[keep], sq[keep], samples[keep]
    changing = changing[:len(inc)]
    indices[changing], values[changing] = inc, 0.0
    age = samples / 2
    state["exp_avg"][changing] = grads / samples * (1 - 0.9 ** age)
    state["exp_avg_sq"][changing] = sq / samples * (1 - 0.999 ** age)
    state["age"][changing] = age
    return indices, values, state


@pytest.mark.parametrize("conv1d", [False, True])
def test_rigl_reselection_equals_the_reference_as_a_set(conv1d: bool) -> None:
    module = Conv1D(40, 24).float() if conv1d else nn.Linear(40, 24)
    d = _lean(module, 60)
    g = torch.Generator().manual_seed(3)
    opt = sp.SparseAdamW([d.weights.values], lr=1e-2)
    d.weights.values.grad = torch.randn(d.k, generator=g)
    opt.step()
    # the reference works in function layout ([out, in]); our indices are the stored layout's
    f_idx, val = d.to_function(d.indices), d.weights.values.detach().clone()
    state = {k: v.clone() for k, v in opt.state[d.weights.values].items()}
    pool = torch.randperm(24 * 40, generator=g)[:d.k]
    pool[:10] = f_idx[torch.topk(val.abs(), 10, largest=False).indices]  # outgoing ones come back
    pool[10:20] = f_idx[torch.topk(val.abs(), 10).indices]  # kept ones are not regrown
    pool = torch.unique(pool)
    grads = torch.randn(pool.numel(), generator=g)
    sq, samples = grads.square() + torch.rand(pool.numel(), generator=g), torch.full((pool.numel(),), 4.0)
    schedule = sp.SpielSchedule({"m": d}, CFG)  # begins a phase: candidates reset
    d.candidates = sp.Candidates(pool, grads.clone(), sq.clone(), samples.clone())  # as a phase collects them
    replaced = schedule.rigl(d, 0.3, opt)
    ref_idx, ref_val, ref_state = _reference_rigl(f_idx, val, state, pool, grads, sq, samples, 0.3, 24 * 40)
    assert replaced > 0
    stored = d.to_stored(ref_idx)
    perm = torch.argsort(stored)
    assert torch.equal(d.indices, stored[perm])
    torch.testing.assert_close(d.weights.values.detach(), ref_val[perm])
    for key in ("exp_avg", "exp_avg_sq", "age"):
        torch.testing.assert_close(opt.state[d.weights.values][key], ref_state[key][perm])


def test_sm3_step_and_reselection() -> None:
    module = nn.Linear(40, 24)
    d = _lean(module, 60)
    opt = sp.SparseSM3([d], lr=0.1)
    v0 = d.weights.values.detach().clone()
    grad = torch.randn(d.k, generator=torch.Generator().manual_seed(4))
    d.weights.values.grad = grad.clone()
    opt.step()
    torch.testing.assert_close(d.weights.values.detach(), v0 - 0.1 * grad / torch.sqrt(grad.square() + 1e-8))
    st = opt.state[d.weights.values]
    rows, cols = torch.div(d.indices, 40, rounding_mode="floor"), d.indices % 40
    torch.testing.assert_close(st["row_acc"], torch.zeros(24).scatter_reduce(0, rows, grad.square(), "amax"))
    torch.testing.assert_close(st["col_acc"], torch.zeros(40).scatter_reduce(0, cols, grad.square(), "amax"))
    old = set(d.indices.tolist())
    small = set(d.indices[torch.topk(d.weights.values.detach().abs(), 30, largest=False).indices].tolist())
    score = torch.outer(st["row_acc"], st["col_acc"]).reshape(-1).clone()
    score[d.indices] = -1
    want = set(torch.topk(score, 30).indices.tolist())
    assert sp.SpielSchedule({"m": d}, {**CFG, "selection_algorithm": "sm3"}).sm3(d, 0.5, opt) == 30
    assert set(d.indices.tolist()) == (old - small) | want and d.indices.numel() == 60


def test_schedule_phases_and_rates() -> None:
    cfg = {**CFG, "reselection_steps": 10, "selection_accumulation_steps": 3, "total_steps": 40}
    d = _lean(nn.Linear(40, 24), 60)
    opt = sp.SparseAdamW([d.weights.values])
    sched = sp.SpielSchedule({"m": d}, cfg)
    assert d.collecting
    ends = []
    for _ in range(40):
        was = d.collecting
        sched(opt)
        if was and not d.collecting:
            ends.append(sched.completed)
    assert ends == [3, 13, 23, 33]  # begins after steps 9, 19, ...; ends A steps after
    assert sp.reselection_rate(cfg, 3) == 1.0
    assert math.isclose(sp.reselection_rate(cfg, 13), 0.2 * (1 - 13 / 40))
    assert math.isclose(sp.reselection_rate({**cfg, "reselection_rate_policy": "cosine"}, 20), 0.1)
    with pytest.raises(af.FormatError, match="session.optimizer"):
        sched(torch.optim.Adam([d.weights.values]))


@pytest.mark.parametrize("algorithm", ["rigl", "sm3"])
def test_spiel_trains_reselects_and_reloads_exactly(algorithm: str, tmp_path) -> None:
    model = build_tiny(seed=0)
    config = {"target_modules": "all-linear", "density": 0.01, "selection_algorithm": algorithm,
              "reselection_steps": 8, "selection_accumulation_steps": 2, "total_steps": 40}
    session = SPIEL.train(model, config=config)
    n_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in session.parameters()) <= int(0.01 * n_params)
    opt = session.optimizer(lr=2e-2 if algorithm == "rigl" else 0.05)
    batch = lm_task()
    with torch.no_grad():
        start = lm_loss(model, batch).item()
    for _ in range(40):
        loss = lm_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        session.step(opt)
    schedule = session._step_hooks[0]
    assert [s for s, _ in schedule.replaced] == [2, 10, 18, 26, 34] and all(n > 0 for _, n in schedule.replaced)
    with torch.no_grad():
        end, trained = lm_loss(model, batch).item(), model(batch[0])
    assert end < 0.8 * start, (start, end)
    adapter = session.extract()
    session.remove()
    assert adapter.config["selection_algorithm"] == algorithm and adapter.config["reselection_steps"] == 8
    loaded = af.validate(af.save(adapter, tmp_path / "spiel"))  # sorted, distinct, in range
    af.attach(model, loaded)
    with torch.no_grad():
        torch.testing.assert_close(model(batch[0]), trained, atol=1e-5, rtol=1e-5)


def test_spiel_budget_and_config() -> None:
    model = build_tiny(seed=0)
    total = sum(p.numel() for p in model.parameters())
    session = SPIEL.train(model, config={"target_modules": ["q_proj", "down_proj"], "density": 0.02})
    sizes = {p: m.weight.numel() for p, m in model.named_modules() if p in session.layers}
    want = {p: int(int(0.02 * total) * n / sum(sizes.values())) for p, n in sizes.items()}
    assert {p: layer.k for p, layer in session.layers.items()} == want
    session.remove()
    with pytest.raises(af.FormatError, match="'densty' \\(did you mean 'density'"):
        SPIEL.train(model, config={"target_modules": ["q_proj"], "densty": 0.02})
    with pytest.raises(af.FormatError, match="total_steps"):
        s = SPIEL.train(model, config={"target_modules": ["q_proj"]})
        s.step(s.optimizer())


def test_static_methods_get_adamw_and_a_step_that_does_nothing() -> None:
    model = build_tiny(seed=0)
    session = af.registry.get_method("sparse_ft").train(model, config={"target_modules": ["q_proj"]})
    opt = session.optimizer(lr=1e-3)
    assert type(opt) is torch.optim.AdamW and len(opt.param_groups[0]["params"]) == len(session.layers)
    before = {p: layer.indices.clone() for p, layer in session.layers.items()}
    session.step(opt)
    assert all(torch.equal(layer.indices, before[p]) for p, layer in session.layers.items())
    seen = []
    session.on_step(seen.append)
    session.step(opt)
    assert seen == [opt]
    session.remove()
