"""Kind ``mixture`` (MeteoRA-style mixtures of LoRA experts, spec 6.10.13): apply against a dense reference written
as a loop over tokens and experts, top-1 routing against the chosen expert alone, experts by name, refusals."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import adapterfmt as af
from adapterfmt.plugins.methods.mixture import expert_adapter, mixture_adapter
from adapterfmt.tiny import TinyConfig, build_tiny

IN, OUT = 24, 20
RANKS = {"math": 2, "code": 4, "law": 3, "chat": 4}


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(IN, OUT)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(9)
            self.proj.weight.copy_(torch.randn(OUT, IN, generator=gen) / 5)
            self.proj.bias.copy_(torch.randn(OUT, generator=gen))


def _experts(seed: int = 0) -> dict[str, af.Adapter]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, r) in enumerate(RANKS.items()):
        entry = af.lowrank_entry([OUT, IN], 0.5 + i)
        out[name] = af.Adapter(af.new_manifest("lora", {"proj": entry}), {
            "proj.lora_A": torch.randn(r, IN, generator=gen) / 3, "proj.lora_B": torch.randn(OUT, r, generator=gen) / 3})
    return out


def _reference(x: torch.Tensor, y: torch.Tensor, experts: dict[str, af.Adapter], router: torch.Tensor, top_k: int,
               temperature: float, sequence: bool) -> torch.Tensor:
    """The spec's math token by token and expert by expert, in float64 (experts unpadded)."""
    out = y.double().clone()
    names = list(experts)
    for b in range(x.shape[0]):
        for pos in range(x.shape[1]):
            xt = x[b, pos].double()
            source = x[b].double().mean(0) if sequence else xt
            logits = [float(router[e].double() @ source) for e in range(len(names))]
            chosen = sorted(range(len(names)), key=lambda e: (-logits[e], e))[:top_k]
            if top_k == 1:
                gates = [1.0]
            else:
                z = [math.exp(logits[e] / temperature) for e in chosen]
                gates = [v / sum(z) for v in z]
            for g, e in zip(gates, chosen, strict=True):
                ad = experts[names[e]]
                a, bb = ad.tensor("proj.lora_A").double(), ad.tensor("proj.lora_B").double()
                out[b, pos] += g * ad.modules["proj"]["params"]["scale"] * (bb @ (a @ xt))
    return out


@pytest.mark.parametrize(("top_k", "temperature", "granularity"),
                         [(2, 1.0, "token"), (3, 0.7, "token"), (1, 1.0, "token"), (2, 2.0, "sequence")])
def test_apply_equals_dense_reference(top_k: int, temperature: float, granularity: str) -> None:
    experts = _experts()
    router = torch.randn(len(RANKS), IN, generator=torch.Generator().manual_seed(5))
    mix = mixture_adapter(experts, {"proj": router}, top_k=top_k, temperature=temperature, granularity=granularity)
    model = Holder()
    x = torch.randn(3, 7, IN, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        y = model.proj(x)
        af.attach(model, mix)
        got = model.proj(x)
    want = _reference(x, y, experts, router, top_k, temperature, granularity == "sequence")
    assert float((got.double() - want).abs().max()) <= 1e-5
    assert float((got - y).abs().max()) > 1e-2  # the experts act


def test_apply_through_the_triton_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Top-1 routing with the rows kernel forced to Triton (the interpreter on the CPU; tests/conftest.py), the
    path every routing takes on CUDA (on the CPU top-k >= 2 runs as two GEMMs, tested above)."""
    pytest.importorskip("triton")
    experts = _experts(1)
    router = torch.randn(len(RANKS), IN, generator=torch.Generator().manual_seed(2))
    mix = mixture_adapter(experts, {"proj": router}, top_k=1)
    model = Holder()
    x = torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(3))
    af.attach(model, mix)
    monkeypatch.setenv("ADAPTERFMT_KERNELS", "triton")
    with torch.no_grad():
        got = model.proj(x)
        af.activate(model, [])
        y = model.proj(x)
    want = _reference(x, y, experts, router, 1, 1.0, False)
    assert float((got.double() - want).abs().max()) <= 1e-5


def test_top1_one_hot_routing_equals_the_chosen_expert_alone_exactly() -> None:
    """Top-1 gates are one-hot (weight 1): each token's output is bit for bit its expert's output alone. The
    batch has more than 64 rows, so the batched torch path groups rows by expert as a lone LoRA computes them
    (its gathered branch for tiny batches scales before the second product, which may round 1 ulp apart)."""
    experts = _experts(2)
    router = torch.randn(len(RANKS), IN, generator=torch.Generator().manual_seed(8))
    mix = mixture_adapter(experts, {"proj": router}, top_k=1)
    x = torch.randn(4, 30, IN, generator=torch.Generator().manual_seed(4))
    model = Holder()
    af.attach(model, mix)
    with torch.no_grad():
        got = model.proj(x)
    chosen = (x @ router.t()).argmax(-1)
    assert len(set(chosen.flatten().tolist())) == len(RANKS)  # every expert serves some tokens
    for i, name in enumerate(RANKS):
        alone = Holder()
        af.attach(alone, expert_adapter(mix, name))
        with torch.no_grad():
            want = alone.proj(x)
        assert torch.equal(got[chosen == i], want[chosen == i]), name


def test_whole_model_top1_with_a_constant_router_is_the_first_expert() -> None:
    """A zero router ties every logit: ties go to the lower index, so every token of every layer takes expert 0,
    and the model's logits equal those of that expert attached alone as a LoRA, exactly."""
    model = build_tiny(0, TinyConfig(vocab_size=64, hidden=32, layers=2, heads=4, intermediate=64))
    paths = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{n}"]
    gen = torch.Generator().manual_seed(0)
    experts = {}
    for name in ("first", "second"):
        modules, tensors = {}, {}
        for p in paths:
            w = model.get_submodule(p).weight
            modules[p] = af.lowrank_entry(list(w.shape), 1.5)
            tensors[f"{p}.lora_A"] = torch.randn(4, w.shape[1], generator=gen) / 10
            tensors[f"{p}.lora_B"] = torch.randn(w.shape[0], 4, generator=gen) / 10
        experts[name] = af.Adapter(af.new_manifest("lora", modules), tensors)
    mix = mixture_adapter(experts, {p: torch.zeros(2, model.get_submodule(p).weight.shape[1]) for p in paths}, top_k=1)
    ids = torch.randint(0, 64, (4, 20), generator=gen)
    with_mix, alone = copy.deepcopy(model), copy.deepcopy(model)
    af.attach(with_mix, mix)
    af.attach(alone, experts["first"])
    with torch.no_grad():
        assert torch.equal(with_mix(ids), alone(ids))
        assert not torch.equal(with_mix(ids), model(ids))


def test_experts_by_name_round_trip(tmp_path: Path) -> None:
    experts = _experts(3)
    mix = mixture_adapter(experts, {"proj": torch.randn(len(RANKS), IN)}, top_k=2)
    loaded = af.validate(af.save(mix, tmp_path / "mix.safetensors"))
    assert loaded.modules["proj"]["params"]["experts"] == list(RANKS)
    for name, r in RANKS.items():
        one = expert_adapter(loaded, name)
        a, b = one.tensor("proj.lora_A"), one.tensor("proj.lora_B")
        assert torch.equal(a[:r], experts[name].tensor("proj.lora_A")) and not a[r:].any()
        assert torch.equal(b[:, :r], experts[name].tensor("proj.lora_B")) and not b[:, r:].any()
        assert one.modules["proj"]["params"]["scale"] == experts[name].modules["proj"]["params"]["scale"]
    with pytest.raises(af.UnsupportedError, match="no expert named 'poetry'|expert named 'poetry'"):
        expert_adapter(loaded, "poetry")


def test_refusals(tmp_path: Path) -> None:
    mix = mixture_adapter(_experts(), {"proj": torch.randn(len(RANKS), IN)}, top_k=2)
    model = Holder()
    af.attach(model, mix)
    with pytest.raises(af.UnsupportedError, match="cannot be merged into the weights"):
        af.merge_into(model, "mixture")
    with pytest.raises(af.UnsupportedError, match="cannot be combined in delta space"):
        af.registry.verb("mixture", "merge")([mix, mix])
    bad = af.Adapter(af.new_manifest("mixture", {"proj": {**mix.modules["proj"],
                                                          "params": {**mix.modules["proj"]["params"], "top_k": 5}}}),
                     mix.tensors())
    with pytest.raises(af.FormatError, match=r"module 'proj': mixture params.top_k must be an integer in \[1, 4\]"):
        af.save(bad, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
    other = nn.Module()
    other.proj = nn.Module()
    other.proj.weight = nn.Parameter(torch.zeros(OUT, IN))
    with pytest.raises(af.BaseMismatchError, match="applies to linear maps .*, not Module"):
        af.attach(other, mix)


@pytest.mark.parametrize(("kind", "said"), [
    ("xlora", "X-LoRA gates every layer's LoRAs per token from a first forward pass of the whole model"),
    ("poly", "Poly mixes its skills' LoRA factors per task, so one task is read as a LoRA: no task given"),
    ("arrow", "arrow_config.task_adapter_names is empty (PEFT's create_arrow_model fills it)"),
])
def test_peft_gated_mixtures_are_refused_in_one_line(kind: str, said: str, tmp_path: Path) -> None:
    """X-LoRA, Poly without a task and an Arrow config without its task adapters (configs written by PEFT
    itself) are refused, not read as something else."""
    from helpers_spec import invoke
    from peft import LoraConfig, PolyConfig, XLoraConfig
    from peft.tuners.lora.config import ArrowConfig
    from safetensors.torch import save_file

    config = {"xlora": lambda: XLoraConfig(task_type="CAUSAL_LM", hidden_size=16, adapters={"a": "a", "b": "b"}),
              "poly": lambda: PolyConfig(task_type="CAUSAL_LM", r=2, n_tasks=2, n_skills=2, target_modules=["q_proj"]),
              "arrow": lambda: LoraConfig(r=2, target_modules=["q_proj"], arrow_config=ArrowConfig(top_k=2))}[kind]()
    folder = tmp_path / kind
    config.save_pretrained(folder)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 16)},
              str(folder / "adapter_model.safetensors"))
    with pytest.raises(af.UnsupportedError, match=re.escape(said)):
        af.load(folder)
    res = invoke("inspect", str(folder))
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and said in res.stderr
