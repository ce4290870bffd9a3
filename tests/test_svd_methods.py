"""The SVD-structured methods of plugins/methods/svd_lora.py against their real tools: PEFT 0.21.2 (PiSSA,
OLoRA, KaSA: initial factors, forward, KaSA's regulariser, reading KaSA files, PEFT reloading what we write),
and transcriptions of the authors' code where it is not installable: ``sorsa`` 1.0.1 ``sorsa/layer.py``
(``Linear.sorsa_init`` / ``forward`` / ``calc_ortho``), LoLDU ``minloldu/loldu.py``, the NLoRA fork's
``nlora_init`` and LaMDA's ``gradual_freeze_B``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from adapterfmt.plugins.methods.svd_lora import reduce_intruder_dimension
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.config import KasaConfig
from peft.tuners.lora.intruders import reduce_intruder_dimension as peft_repair
from torch import nn

import adapterfmt as af
from adapterfmt.plugin.registry import get_method

ATOL = 1e-5


def base(seed: int = 0, out: int = 24, n_in: int = 16) -> nn.Sequential:
    torch.manual_seed(seed)
    m = nn.Sequential()
    m.add_module("lin", nn.Linear(n_in, out))
    return m


def train(method: str, model: nn.Module, **config) -> af.TrainSession:
    return get_method(method).train(model, config={"target_modules": ["lin"], **config})


def perturb(*params: torch.Tensor, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def attached(model: nn.Module, adapter: af.Adapter, x: torch.Tensor) -> torch.Tensor:
    model = copy.deepcopy(model)
    af.attach(model, adapter)
    return model(x)


X = torch.randn(5, 16, generator=torch.Generator().manual_seed(9))


# ----- PEFT: PiSSA, OLoRA, KaSA ------------------------------------------------------------------------------
@pytest.mark.parametrize("method, init", [("pissa", "pissa"), ("olora", "olora")])
@pytest.mark.parametrize("form", ["explicit", "derived"])
def test_init_and_forward_match_peft(tmp_path, method, init, form):
    pm = get_peft_model(base(), LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], init_lora_weights=init))
    lin = pm.base_model.model.lin
    session = train(method, base(), r=4, alpha=8, base_part=form)
    ours = session.layers["lin"].weights
    torch.testing.assert_close(ours.lora_A.detach(), lin.lora_A["default"].weight.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.lora_B.detach(), lin.lora_B["default"].weight.detach(), atol=1e-6, rtol=0)
    perturb(lin.lora_A["default"].weight, lin.lora_B["default"].weight)
    perturb(ours.lora_A, ours.lora_B)
    adapter = af.load(af.save(session.extract(), tmp_path / "a.safetensors"))
    assert ("recipe" in adapter.modules["lin"]["params"]["base_part"]) == (form == "derived")
    torch.testing.assert_close(attached(base(), adapter, X), pm(X), atol=ATOL, rtol=0)
    # PEFT reloads what we write (a plain LoRA of rank 2r on the original base) with the same outputs
    folder = af.to_peft(adapter, tmp_path / "peft") if form == "explicit" else None
    if folder is not None:
        torch.testing.assert_close(PeftModel.from_pretrained(base(), folder)(X), pm(X), atol=ATOL, rtol=0)
    else:
        with pytest.raises(af.UnsupportedError, match="derived params.base_part"):
            af.to_peft(adapter, tmp_path / "peft")


def kasa_peft(tmp_path):
    pm = get_peft_model(base(), LoraConfig(r=4, lora_alpha=8, target_modules=["lin"],
                                           kasa_config=KasaConfig(beta=1e-2, gamma=1e-2)))
    lin = pm.base_model.model.lin
    perturb(lin.lora_A["default"].weight, lin.lora_B["default"].weight, lin.lora_diag["default"])
    pm.save_pretrained(tmp_path / "kasa")
    return pm, tmp_path / "kasa"


def test_kasa_files_are_read_exactly_and_written_back(tmp_path):
    pm, folder = kasa_peft(tmp_path)
    expected = pm(X)
    assert (expected - base()(X)).abs().max() > 1e-2
    adapter = af.read_foreign(folder, base=base())
    assert sorted(adapter.roles("lin")) == ["init_A", "init_B", "lora_A", "lora_B", "lora_mid"]
    torch.testing.assert_close(attached(base(), adapter, X), expected, atol=ATOL, rtol=0)
    back = af.to_peft(adapter, tmp_path / "back")
    torch.testing.assert_close(PeftModel.from_pretrained(base(), back)(X), expected, atol=ATOL, rtol=0)
    with pytest.raises(af.UnsupportedError, match="kasa_config drops the base weight's smallest"):
        af.read_foreign(folder)


def test_kasa_train_and_regularizer_match_peft(tmp_path):
    pm, _ = kasa_peft(tmp_path)
    lin = pm.base_model.model.lin
    session = train("kasa", base(), r=4, alpha=8, beta=1e-2, gamma=1e-2)
    w = session.layers["lin"].weights
    with torch.no_grad():  # PEFT's random init, then the same training
        for role, theirs in (("lora_A", lin.lora_A["default"].weight), ("lora_B", lin.lora_B["default"].weight),
                             ("lora_mid", lin.lora_diag["default"])):
            getattr(w, role).copy_(theirs)
    torch.testing.assert_close(session.model(X), pm(X), atol=ATOL, rtol=0)
    torch.testing.assert_close(session.regularization(), pm.base_model._get_kasa_loss().detach(), atol=1e-6, rtol=1e-6)
    assert session.regularization().requires_grad


# ----- SORSA: transcription of sorsa 1.0.1 sorsa/layer.py ---------------------------------------------------
def sorsa_reference(w: torch.Tensor, r: int, alpha: float | None):
    """``Linear.sorsa_init``: ``u, s, vt = svd(W^T)``; A = u[:, :r]^T, S = s[:r], B = vt[:r]^T; the weight
    becomes ``W - scale * (B * S) @ A``; ``forward`` adds ``scale * x ((B * S) @ A)^T``."""
    scale = 1 if alpha is None else alpha / r
    u, s, vt = torch.linalg.svd(w.T, full_matrices=False)
    a, sv, b = u[:, :r].T.contiguous(), s[:r], vt[:r, :].T.contiguous()
    return a, sv, b, w - ((b * sv) @ a) * scale, scale


@pytest.mark.parametrize("alpha", [None, 8.0])
@pytest.mark.parametrize("form", ["explicit", "derived"])
def test_sorsa_matches_the_package(tmp_path, alpha, form):
    model = base()
    w = model.lin.weight.detach().clone()
    a, sv, b, residual, scale = sorsa_reference(w, 4, alpha)
    session = train("sorsa", model, r=4, alpha=alpha, base_part=form)
    t = session.layers["lin"].weights
    for mine, theirs in ((t.lora_A, a), (t.lora_mid, sv), (t.lora_B, b)):
        torch.testing.assert_close(mine.detach(), theirs, atol=1e-6, rtol=0)
    perturb(t.lora_A, t.lora_mid, t.lora_B)
    a, sv, b = t.lora_A.detach(), t.lora_mid.detach(), t.lora_B.detach()
    want = F.linear(X, residual) + F.linear(X, (b * sv) @ a) * scale + model.lin.bias
    torch.testing.assert_close(session.model(X), want, atol=ATOL, rtol=1e-5)  # fp32, another order of sums
    adapter = session.extract()
    session.remove()
    torch.testing.assert_close(attached(model, adapter, X), want, atol=ATOL, rtol=1e-5)


def test_sorsa_orthonormality_is_calc_ortho():
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(16, 24))
    model.add_module("lin2", nn.Linear(24, 8))
    session = get_method("sorsa").train(model, config={"target_modules": ["lin", "lin2"], "r": 3, "ortho_weight": 2.0})
    perturb(*session.parameters())
    terms = []  # calc_ortho: the mean of ||A A^T - I|| and ||B^T B - I|| over every sorsa_A / sorsa_B
    for layer in session.layers.values():
        a, b = layer.weights.lora_A, layer.weights.lora_B
        terms += [torch.norm(a @ a.T - torch.eye(a.shape[0]), p="fro"), torch.norm(b.T @ b - torch.eye(b.shape[1]), p="fro")]
    torch.testing.assert_close(session.regularization(), 2.0 * sum(terms) / len(terms))


# ----- LoLDU (minloldu/loldu.py), NLoRA / IntTune (the NLoRA fork), LaMDA (lamda.py) -----------------------
def test_loldu_matches_the_reference(tmp_path):
    model = base(out=24, n_in=16)
    w = model.lin.weight.detach().clone()
    session = train("loldu", model, r=6, alpha=6.0)
    z = session.layers["lin"].weights.lora_mid
    assert session.model(X).sub(base()(X)).abs().max() < 1e-5  # the delta is zero at init
    perturb(z)
    adapter = af.load(af.save(session.extract(), tmp_path / "l.safetensors"))
    assert adapter.roles("lin") == ["lora_mid"] and adapter.nbytes() == 6 * 4
    # minloldu: P, L, U = lu(W); D = diag(U); U /= D; W_res = W - s P L_r diag(D_r) U_r; + s P L_r diag(z) U_r
    p, lo, up = torch.linalg.lu(w)
    d = torch.diagonal(up)
    up = up / d.unsqueeze(-1)
    pl, s = (p @ lo)[:, :6], 6.0 / 6
    merged = w - s * pl @ torch.diag(d[:6]) @ up[:6] + s * pl @ torch.diag(z.detach()) @ up[:6]
    torch.testing.assert_close(attached(base(), adapter, X), F.linear(X, merged, model.lin.bias), atol=ATOL, rtol=0)


def test_nlora_and_inttune_match_the_fork():
    model = base()
    w, r, alpha = model.lin.weight.detach().clone(), 4, 8.0
    nlora = train("nlora", copy.deepcopy(model), r=r, alpha=alpha)
    a, bb, n = w[:r, :], w[:, :r], w[:r, :r]  # nlora_init: no pseudo-inverse, the base untouched
    fork = F.linear(X, w, model.lin.bias) + (alpha / r) * F.linear(F.linear(F.linear(X, a), n), bb)
    torch.testing.assert_close(nlora.model(X), fork, atol=ATOL, rtol=0)
    it = train("inttune", copy.deepcopy(model), r=r, alpha=alpha)
    assert [n for n, _ in it.named_parameters()] == ["lin.lora_mid"]
    perturb(it.layers["lin"].weights.lora_mid)
    n2 = it.layers["lin"].weights.lora_mid.detach()
    adapter = it.extract()
    assert set(adapter.tensor_names()) == {"lin.lora_mid"}
    fork = F.linear(X, w, model.lin.bias) + (alpha / r) * F.linear(F.linear(F.linear(X, a), n2), bb)
    torch.testing.assert_close(attached(model, adapter, X), fork, atol=ATOL, rtol=0)


def test_lamda_freezes_columns_of_b_on_its_schedule():
    session = train("lamda", base(), r=4, alpha=8, max_steps=10, eta=0.1)  # one column per step
    b = session.layers["lin"].weights.lora_B
    assert session.layers["lin"].weights.lora_mid.shape == (4, 4)
    assert "lora_A" in session.layers["lin"].frozen_roles
    opt = torch.optim.SGD(session.parameters(), lr=0.1)
    for step in range(3):
        before = b.detach().clone()
        opt.zero_grad()
        session.model(X).square().mean().backward()
        opt.step()
        session.step(opt)
        moved = (b.detach() - before).abs().sum(0) > 0
        assert moved.tolist() == [i >= step for i in range(4)], step


def test_unknown_config_keys_are_refused():
    with pytest.raises(af.FormatError, match="unknown key"):
        train("kasa", base(), r=4, betta=0.1)


# ----- BA-LoRA: transcription of cyp-jlu-ai/BA-LoRA train.py (CustomTrainer.compute_loss, svd_regularization) --
def ba_lora_reference_terms(fine_logits: torch.Tensor, pre_logits: torch.Tensor, task: str, k: int = 3):
    """``(consistency_loss, diversity_loss, svd_loss)`` as ``compute_loss`` computes them; ``svd_regularization``
    with its crash fixed (``s`` is 1-D after the flatten: ``s[:k]`` / ``s.sum()`` for ``s[:, :k]`` /
    ``s.sum(dim=1)``)."""
    if task == "nlu":
        pre_norm = F.normalize(pre_logits, p=2, dim=-1)
        fine_norm = F.normalize(fine_logits, p=2, dim=-1)
        consistency_loss = F.mse_loss(fine_norm, pre_norm)
        batch_size, dim = fine_logits.size()
        fine_centered = fine_logits - fine_logits.mean(dim=0)
        cov = torch.matmul(fine_centered.T, fine_centered) / (batch_size - 1)
        off_diagonal = cov - torch.diag(torch.diag(cov))
        diversity_loss = torch.sum(off_diagonal ** 2) / dim
    else:
        pre_probs = F.softmax(pre_logits, dim=-1)
        fine_probs = F.softmax(fine_logits, dim=-1)
        consistency_loss = F.kl_div(fine_probs.log(), pre_probs, reduction="batchmean")
        entropy = -torch.sum(fine_probs * torch.log(fine_probs + 1e-10), dim=-1).mean()
        diversity_loss = -entropy
    logits = fine_logits.view(fine_logits.size(0), -1) if fine_logits.dim() > 2 else fine_logits
    with torch.no_grad():
        _, s, _ = torch.linalg.svd(logits, full_matrices=False)
    svd_loss = -(s[:k].sum() / (s.sum() + 1e-10))
    return consistency_loss, diversity_loss, svd_loss


def test_ba_lora_init_is_peft_pissa_with_alpha_r():
    pm = get_peft_model(base(), LoraConfig(r=4, lora_alpha=4, target_modules=["lin"], init_lora_weights="pissa"))
    lin = pm.base_model.model.lin
    session = train("ba_lora", base(), r=4)
    ours = session.layers["lin"].weights
    torch.testing.assert_close(ours.lora_A.detach(), lin.lora_A["default"].weight.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.lora_B.detach(), lin.lora_B["default"].weight.detach(), atol=1e-6, rtol=0)
    perturb(lin.lora_A["default"].weight, lin.lora_B["default"].weight)
    perturb(ours.lora_A, ours.lora_B)
    torch.testing.assert_close(session.model(X), pm(X), atol=ATOL, rtol=0)
    assert session.extract().manifest["modules"]["lin"]["params"]["scale"] == 1.0


@pytest.mark.parametrize("task, shape", [("nlg", (2, 5, 11)), ("nlu", (6, 4))])
def test_ba_lora_regularizer_matches_the_reference(task, shape):
    gen = torch.Generator().manual_seed(3)
    logits, base_logits = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    terms = ba_lora_reference_terms(logits, base_logits, task, k=2)
    assert all(abs(t.item()) > 1e-3 for t in terms)
    for i, want in enumerate(terms):  # one term at a time, then the weighted sum
        lambdas = {f"lambda{j + 1}": float(i == j) for j in range(3)}
        session = train("ba_lora", base(), r=4, task=task, k=2, **lambdas)
        torch.testing.assert_close(session.regularization(logits=logits, base_logits=base_logits), want)
    session = train("ba_lora", base(), r=4, task=task, k=2, lambda1=0.5, lambda2=2.0, lambda3=3.0)
    torch.testing.assert_close(session.regularization(logits=logits, base_logits=base_logits),
                               0.5 * terms[0] + 2.0 * terms[1] + 3.0 * terms[2])


def test_ba_lora_regularizer_trains_the_adapter():
    session = train("ba_lora", base(), r=4, lambda1=1.0, lambda2=1.0, lambda3=1.0)
    base_logits = base()(X)
    logits = session.model(X)
    assert session.regularization(logits=logits, base_logits=base_logits).item() < 0  # KL 0 at init: -entropy + svd
    perturb(*session.parameters())
    reg = session.regularization(logits=session.model(X), base_logits=base_logits)
    reg.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in session.parameters())
    svd_only = train("ba_lora", base(), r=4, lambda1=0.0, lambda2=0.0, lambda3=1.0)
    perturb(*svd_only.parameters())
    svd_only.regularization(logits=svd_only.model(X), base_logits=base_logits).backward()
    assert all(p.grad.abs().sum() == 0 for p in svd_only.parameters())  # the reference's SVD runs under no_grad
    with pytest.raises(af.UnsupportedError, match="base_logits"):
        session.regularization()
    with pytest.raises(af.UnsupportedError, match="nlu"):
        train("ba_lora", base(), r=4, task="nlu").regularization(logits=torch.zeros(2, 3, 4),
                                                                  base_logits=torch.zeros(2, 3, 4))
    with pytest.raises(af.FormatError, match="unknown key"):
        train("ba_lora", base(), r=4, lambda4=0.1)


# ----- intruder-dimension repair: PEFT's peft.tuners.lora.intruders.reduce_intruder_dimension ------------------
def test_intruder_repair_matches_peft(tmp_path):
    def two_linears() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))

    pm = get_peft_model(two_linears(), LoraConfig(r=4, lora_alpha=8, target_modules=["0", "1"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # module 0: a LoRA strong enough to create intruder dimensions; module 1: a weak one
        for name, size in (("0", 1.0), ("1", 0.01)):
            layer = pm.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(size * torch.randn(4, 32, generator=g))
            layer.lora_B["default"].weight.copy_(size * torch.randn(32, 4, generator=g))
    pm.save_pretrained(tmp_path / "peft")
    x = torch.randn(5, 32, generator=g)
    peft_repair(pm, top_k=10, threshold_epsilon=0.5, mitigation_lambda=0.75, logging_sink=None)
    adapter, found = reduce_intruder_dimension(af.load(tmp_path / "peft"), two_linears())
    assert found["0"] and not found["1"]
    for name in ("0", "1"):
        layer = pm.base_model.model.get_submodule(name)
        for role in ("lora_A", "lora_B"):
            torch.testing.assert_close(adapter.module_tensors(name)[role],
                                       getattr(layer, role)["intruder_reduced"].weight.detach(), atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(attached(two_linears(), adapter, x), pm(x), atol=ATOL, rtol=1e-5)  # outputs ~10
    pissa = train("pissa", base(), r=4).extract()
    with pytest.raises(af.UnsupportedError, match="module 'lin'.*base_part"):
        reduce_intruder_dimension(pissa, base())
