"""The LoRA family's kinds and methods: hadamard (LoHa), kronecker (LoKr), vera (VeRA), DoRA, AdaLoRA, IA3.

Each kind's unmerged forward and merge are checked against a dense weight computed by hand, and each
method's adapter (built from a PEFT model's own tensors) against PEFT's forward on the same input.
"""

from __future__ import annotations

import copy

import pytest
import torch
from adapterfmt.plugins.methods.lora_variants import adalora_factors, factorization
from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, VeraConfig, get_peft_model
from torch import nn

import adapterfmt as af

TOL = {torch.float32: 2e-5, torch.float64: 1e-10}


def mlp(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6)).to(dtype)


def make(method: str, modules: dict, tensors: dict) -> af.Adapter:
    return af.Adapter(af.new_manifest(method, modules), tensors)


def with_weights(model: nn.Module, new: dict[str, torch.Tensor]) -> nn.Module:
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for path, w in new.items():
            ref.get_submodule(path).weight.copy_(w)
    return ref


def check_against_dense(model: nn.Module, adapter: af.Adapter, dense: dict[str, torch.Tensor],
                        x: torch.Tensor, tol: float) -> None:
    """Unmerged == base with W + dW; merged == unmerged; unmerge restores the weights (atol 1e-6)."""
    expected = with_weights(model, {p: model.get_submodule(p).weight + d for p, d in dense.items()})(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    af.attach(model, adapter, name="a")
    torch.testing.assert_close(model(x), expected, atol=tol, rtol=tol)
    af.merge_into(model, "a")
    torch.testing.assert_close(model(x), expected, atol=tol, rtol=tol)
    af.unmerge(model, "a")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)
    af.detach(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hadamard_math(dtype: torch.dtype, seeded: torch.Generator) -> None:
    model = mlp(dtype)
    t = {r: torch.randn(s, generator=seeded, dtype=dtype) for r, s in
         (("hada_w1_a", (10, 3)), ("hada_w1_b", (3, 12)), ("hada_w2_a", (10, 3)), ("hada_w2_b", (3, 12)))}
    dw = 0.5 * torch.einsum("ir,rj->ij", t["hada_w1_a"], t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    entry = {"kind": "hadamard", "shape": [10, 12], "params": {"scale": 0.5}}
    adapter = af.validate(make("loha", {"0": entry}, {f"0.{k}": v for k, v in t.items()}))
    check_against_dense(model, adapter, {"0": dw}, torch.randn(4, 12, generator=seeded, dtype=dtype), TOL[dtype])


@pytest.mark.parametrize("form", ["full", "pairs"])
def test_kronecker_math(form: str, seeded: torch.Generator) -> None:
    model = mlp()
    f = {r: torch.randn(s, generator=seeded) for r, s in
         (("lokr_w1_a", (2, 1)), ("lokr_w1_b", (1, 3)), ("lokr_w2_a", (5, 2)), ("lokr_w2_b", (2, 4)))}
    w1, w2 = f["lokr_w1_a"] @ f["lokr_w1_b"], f["lokr_w2_a"] @ f["lokr_w2_b"]
    dw = torch.zeros(10, 12)
    for i in range(2):  # kron by its definition: block (i, j) is w1[i, j] * w2
        for j in range(3):
            dw[5 * i:5 * i + 5, 4 * j:4 * j + 4] = 1.5 * w1[i, j] * w2
    t = {"lokr_w1": w1, "lokr_w2": w2} if form == "full" else f
    entry = {"kind": "kronecker", "shape": [10, 12], "params": {"scale": 1.5}}
    adapter = af.validate(make("lokr", {"0": entry}, {f"0.{k}": v for k, v in t.items()}))
    check_against_dense(model, adapter, {"0": dw}, torch.randn(4, 12, generator=seeded), TOL[torch.float32])


def test_kronecker_rejects_both_forms(seeded: torch.Generator) -> None:
    entry = {"kind": "kronecker", "shape": [10, 12], "params": {}}
    t = {"0.lokr_w1": torch.randn(2, 3), "0.lokr_w1_a": torch.randn(2, 1), "0.lokr_w1_b": torch.randn(1, 3),
         "0.lokr_w2": torch.randn(5, 4)}
    with pytest.raises(af.FormatError, match="exactly one of lokr_w1"):
        af.validate(make("lokr", {"0": entry}, t))


def vera_adapter(seeded: torch.Generator, r: int = 4) -> tuple[af.Adapter, dict[str, torch.Tensor]]:
    shared = {"vera_A": torch.randn(r, 12, generator=seeded), "vera_B": torch.randn(10, r, generator=seeded)}
    modules, tensors, dense = {}, dict(shared), {}
    for path, (out, n_in) in {"0": (10, 12), "2": (6, 10)}.items():
        lb, ld = torch.randn(out, generator=seeded), torch.randn(r, generator=seeded)
        modules[path] = {"kind": "vera", "shape": [out, n_in],
                         "params": {"shared": {"vera_A": "vera_A", "vera_B": "vera_B"}}}
        tensors.update({f"{path}.lambda_b": lb, f"{path}.lambda_d": ld})
        dense[path] = torch.diag(lb) @ shared["vera_B"][:out] @ torch.diag(ld) @ shared["vera_A"][:, :n_in]
    return make("vera", modules, tensors), dense


def test_vera_shared_projections_stored_once(tmp_path, seeded: torch.Generator) -> None:
    adapter, dense = vera_adapter(seeded)
    loaded = af.validate(af.save(adapter, tmp_path / "vera"))
    assert sorted(n for n in loaded.tensor_names() if "vera_" in n) == ["vera_A", "vera_B"]
    assert loaded.module_tensors("2")["vera_A"].shape == (4, 12)
    check_against_dense(mlp(), loaded, dense, torch.randn(5, 12, generator=seeded), TOL[torch.float32])


def test_vera_missing_shared_tensor_is_reported(seeded: torch.Generator) -> None:
    adapter, _ = vera_adapter(seeded)
    tensors = {n: adapter.tensor(n) for n in adapter.tensor_names() if n != "vera_B"}
    with pytest.raises(af.FormatError, match="shared tensor 'vera_B' is missing"):
        af.validate(make("vera", adapter.modules, tensors))


# ----- against PEFT ---------------------------------------------------------------------------------------
def peft_layers(cfg, randomize: tuple[str, ...] = ()) -> tuple[nn.Module, nn.Module]:
    """(base model, PEFT model on a copy of it) with the named adapter parameters randomised."""
    base = mlp()
    peft_model = get_peft_model(copy.deepcopy(base), cfg)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if any(f".{r}." in name for r in randomize):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if "magnitude" in name or "ia3" in name else 0))
    return base, peft_model.eval()


def layer(peft_model: nn.Module, path: str) -> nn.Module:
    return peft_model.base_model.model.get_submodule(path)


def assert_same_function(base: nn.Module, adapter: af.Adapter, peft_model: nn.Module) -> None:
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(3))
    af.attach(base, af.validate(adapter))
    with torch.no_grad():
        torch.testing.assert_close(base(x), peft_model(x), atol=1e-5, rtol=1e-5)
        af.merge_into(base, adapter.method)
        torch.testing.assert_close(base(x), peft_model(x), atol=1e-5, rtol=1e-5)


def test_loha_matches_peft() -> None:
    base, pm = peft_layers(LoHaConfig(target_modules=["0", "2"], r=2, alpha=3, init_weights=False))
    modules, tensors = {}, {}
    for path in ("0", "2"):
        lay = layer(pm, path)
        modules[path] = af.module_entry("hadamard", base.get_submodule(path), {"scale": lay.scaling["default"]})
        for role in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            tensors[f"{path}.{role}"] = getattr(lay, role)["default"].detach().clone()
    assert_same_function(base, make("loha", modules, tensors), pm)


def test_lokr_matches_peft() -> None:
    base, pm = peft_layers(LoKrConfig(target_modules=["0", "2"], r=2, alpha=3, init_weights=False),
                           randomize=("lokr_w1",))
    modules, tensors = {}, {}
    for path in ("0", "2"):
        lay = layer(pm, path)
        modules[path] = af.module_entry("kronecker", base.get_submodule(path), {"scale": lay.scaling["default"]})
        for role in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"):
            if "default" in getattr(lay, role):
                tensors[f"{path}.{role}"] = getattr(lay, role)["default"].detach().clone()
    assert_same_function(base, make("lokr", modules, tensors), pm)


def test_vera_matches_peft() -> None:
    base, pm = peft_layers(VeraConfig(target_modules=["0", "2"], r=4), randomize=("vera_lambda_b", "vera_lambda_d"))
    shared = {"vera_A": "vera_A", "vera_B": "vera_B"}
    tensors = {"vera_A": pm.base_model.vera_A["default"].clone(), "vera_B": pm.base_model.vera_B["default"].clone()}
    modules = {}
    for path in ("0", "2"):
        lay = layer(pm, path)
        modules[path] = af.module_entry("vera", base.get_submodule(path), {"shared": shared})
        tensors[f"{path}.lambda_b"] = lay.vera_lambda_b["default"].detach().clone()
        tensors[f"{path}.lambda_d"] = lay.vera_lambda_d["default"].detach().clone()
    assert_same_function(base, make("vera", modules, tensors), pm)


def test_ia3_matches_peft() -> None:
    base, pm = peft_layers(IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]), randomize=("ia3_l",))
    modules, tensors = {}, {}
    for path, side in (("0", "output"), ("2", "input")):
        modules[path] = af.module_entry("vector", base.get_submodule(path), {"op": "scale", "side": side})
        tensors[f"{path}.vector"] = layer(pm, path).ia3_l["default"].detach().reshape(-1).clone()
    assert_same_function(base, make("ia3", modules, tensors), pm)


def test_adalora_matches_peft() -> None:
    cfg = AdaLoraConfig(target_modules=["0", "2"], init_r=4, target_r=2, lora_alpha=6, total_step=10)
    base, pm = peft_layers(cfg, randomize=("lora_A", "lora_B", "lora_E"))
    with torch.no_grad():  # AdaLoRA's pruning zeroes singular values
        layer(pm, "0").lora_E["default"][1] = 0
    modules, tensors = {}, {}
    for path in ("0", "2"):
        lay = layer(pm, path)
        t, scale = adalora_factors(lay.lora_A["default"].detach(), lay.lora_B["default"].detach(),
                                   lay.lora_E["default"].detach(), alpha=lay.scaling["default"],
                                   ranknum=float(lay.ranknum["default"]))
        modules[path] = af.lowrank_entry([*base.get_submodule(path).weight.shape], scale)
        tensors.update({f"{path}.{r}": v for r, v in t.items()})
    assert tensors["0.lora_A"].shape[0] == 3  # the pruned rank is dropped
    assert_same_function(base, make("adalora", modules, tensors), pm)


def test_dora_matches_peft() -> None:
    base, pm = peft_layers(LoraConfig(target_modules=["0", "2"], r=2, lora_alpha=3, use_dora=True),
                           randomize=("lora_B", "lora_magnitude_vector"))
    modules, tensors = {}, {}
    for path in ("0", "2"):
        lay = layer(pm, path)
        modules[path] = af.lowrank_entry([*base.get_submodule(path).weight.shape], lay.scaling["default"])
        tensors[f"{path}.lora_A"] = lay.lora_A["default"].weight.detach().clone()
        tensors[f"{path}.lora_B"] = lay.lora_B["default"].weight.detach().clone()
        tensors[f"{path}.magnitude"] = lay.lora_magnitude_vector["default"].weight.detach().clone()
    assert_same_function(base, make("dora", modules, tensors), pm)


# ----- training ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,config", [
    ("loha", {"r": 2, "alpha": 4}), ("lokr", {"r": 2, "alpha": 4}), ("vera", {"r": 8}),
    ("ia3", {"feedforward_modules": ["2"]}), ("dora", {"r": 2, "alpha": 4}),
])
def test_variant_trains_and_reloads(method: str, config: dict, tmp_path) -> None:
    model = mlp()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 12, generator=gen)
    teacher = copy.deepcopy(model)
    with torch.no_grad():  # a task every method can learn: the first layer's outputs rescaled
        teacher[0].weight.mul_(1 + torch.rand(10, 1, generator=gen))
        target, start = teacher(x), model(x)
    session = af.registry.get_method(method).train(model, config={"target_modules": ["0", "2"], **config})
    with torch.no_grad():  # every method starts at the base model
        torch.testing.assert_close(model(x), start)
    opt = torch.optim.Adam(session.parameters(), lr=3e-2)
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        trained = model(x)
    adapter = session.extract()
    session.remove()
    loaded = af.load(af.save(adapter, tmp_path / method))
    af.attach(model, loaded)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained, atol=1e-6, rtol=1e-6)


def test_vera_training_shares_one_projection_pair() -> None:
    session = af.registry.get_method("vera").train(mlp(), config={"target_modules": ["0", "2"], "r": 4})
    adapter = session.extract()
    assert adapter.tensor("vera_A").shape == (4, 12) and adapter.tensor("vera_B").shape == (10, 4)
    assert [n for n in adapter.tensor_names() if "vera" in n] == ["vera_A", "vera_B"]


def test_factorization() -> None:
    assert factorization(12) == (3, 4) and factorization(13) == (1, 13) and factorization(64, 4) == (4, 16)
