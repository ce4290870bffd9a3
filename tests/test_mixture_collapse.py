"""Kind ``mixture`` (spec 6.10.13) under merge, compress and port: a mixture with fixed gates collapses to one exact
LoRA; compress resizes / quantises each expert with the router kept exact, reporting each expert's error; port
keeps every tensor, so the routing is the same on the new base."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from adapterfmt.plugins.methods.mixture import (
    COLLAPSE,
    collapse,
    expert_adapter,
    gemm_forward,
    mixture_adapter,
    pick,
    route,
)
from helpers_spec import invoke
from test_mixture import IN, OUT, RANKS, Holder, _experts
from torch import nn

import adapterfmt as af
from adapterfmt.tiny import TinyConfig, build_tiny


def _tiny_mixture(top_k: int) -> tuple[nn.Module, af.Adapter, dict[str, af.Adapter]]:
    """A tiny Llama-shaped model and a mixture of three experts (ranks 2, 3, 4) on every linear of its layers,
    with zero routers: every logit ties, so top-N gates are 1/N each and top-1 takes the first expert."""
    model = build_tiny(0, TinyConfig(vocab_size=64, hidden=32, layers=2, heads=4, intermediate=64))
    paths = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{n}"]
    gen = torch.Generator().manual_seed(0)
    experts = {}
    for i, name in enumerate(("first", "second", "third")):
        modules, tensors = {}, {}
        for p in paths:
            w = model.get_submodule(p).weight
            modules[p] = af.lowrank_entry(list(w.shape), 0.5 + i)
            tensors[f"{p}.lora_A"] = torch.randn(2 + i, w.shape[1], generator=gen) / 5
            tensors[f"{p}.lora_B"] = torch.randn(w.shape[0], 2 + i, generator=gen) / 5
        experts[name] = af.Adapter(af.new_manifest("lora", modules), tensors)
    routers = {p: torch.zeros(3, model.get_submodule(p).weight.shape[1]) for p in paths}
    return model, mixture_adapter(experts, routers, top_k=top_k), experts


@pytest.mark.parametrize(("top_k", "gates"), [(3, {"first": 1 / 3, "second": 1 / 3, "third": 1 / 3}),
                                              (1, {"first": 1.0})])
def test_collapse_equals_the_mixture_with_those_gates(top_k: int, gates: dict[str, float]) -> None:
    """Zero routers fix every token's gates (uniform for top-3, the first expert for top-1): the collapsed LoRA's
    logits equal the attached mixture's to 1e-5, and its rank is (experts used) x the stored rank (exact, no SVD)."""
    model, mix, _ = _tiny_mixture(top_k)
    lora = collapse(mix, gates)
    assert {e["kind"] for e in lora.modules.values()} == {"lowrank"}
    assert {lora.shape(f"{m}.lora_A")[0] for m in lora.modules} == {4 * len(gates)}
    assert lora.manifest["provenance"][-1]["gates"] == gates
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    with_mix, with_lora = copy.deepcopy(model), copy.deepcopy(model)
    af.attach(with_mix, mix)
    af.attach(with_lora, lora)
    with torch.no_grad():
        got, want, bare = with_lora(ids), with_mix(ids), model(ids)
    assert float((got - want).abs().max()) <= 1e-5
    assert float((want - bare).abs().max()) > 1e-2  # the experts act


def test_collapse_with_any_gates_is_the_dense_sum(tmp_path: Path) -> None:
    """Arbitrary gates (negative too, experts left out weigh 0): the collapsed dW is sum_e g_e s_e B_e A_e of
    the original (unpadded) experts; through the CLI (`adapter merge MIX --gates`) the same file comes out."""
    experts = _experts(4)
    mix = mixture_adapter(experts, {"proj": torch.randn(len(RANKS), IN)}, top_k=2)
    gates = {"math": 0.7, "law": -0.25}
    lora = collapse(mix, gates)
    want = sum(g * experts[n].modules["proj"]["params"]["scale"] * experts[n].tensor("proj.lora_B").double()
               @ experts[n].tensor("proj.lora_A").double() for n, g in gates.items())
    got = lora.modules["proj"]["params"]["scale"] * lora.tensor("proj.lora_B").double() @ \
        lora.tensor("proj.lora_A").double()
    assert float((got - want).abs().max()) <= 1e-6 and lora.shape("proj.lora_A")[0] == 2 * 4
    af.save(mix, tmp_path / "mix.safetensors")
    res = invoke("merge", str(tmp_path / "mix.safetensors"), "--gates", "math=0.7,law=-0.25",
                 "--out", str(tmp_path / "lora.safetensors"))
    assert res.exit_code == 0, res.output
    out = af.load(tmp_path / "lora.safetensors")
    assert torch.equal(out.tensor("proj.lora_A"), lora.tensor("proj.lora_A"))
    assert torch.equal(out.tensor("proj.lora_B"), lora.tensor("proj.lora_B"))
    small = af.registry.verb("mixture", "merge")([mix], gates=gates, strategy="svd", rank=3)
    assert small.shape("proj.lora_A")[0] == 3  # merge's own re-factoring, asked for


def test_merge_refusals_say_how_to_collapse(tmp_path: Path) -> None:
    mix = mixture_adapter(_experts(), {"proj": torch.randn(len(RANKS), IN)}, top_k=2)
    verb = af.registry.verb("mixture", "merge")
    with pytest.raises(af.UnsupportedError, match="cannot be combined in delta space; collapse one with fixed "
                                                  "gates .*--gates name=w"):
        verb([mix])
    with pytest.raises(af.UnsupportedError, match="gates collapse one mixture, with no weights; got 2"):
        verb([mix, mix], gates={"math": 1.0})
    with pytest.raises(af.FormatError, match="gates name no expert 'poetry'"):
        verb([mix], gates={"poetry": 1.0})
    with pytest.raises(af.FormatError, match="every gate is 0"):
        verb([mix], gates={"math": 0.0})
    model = Holder()
    af.attach(model, mix)
    with pytest.raises(af.UnsupportedError, match="cannot be merged into the weights.*--gates"):
        af.merge_into(model, "mixture")
    af.save(mix, tmp_path / "mix.safetensors")
    res = invoke("merge", str(tmp_path / "mix.safetensors"), "--out", str(tmp_path / "x.safetensors"))
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "--gates" in res.stderr
    af.save(_experts()["math"], tmp_path / "lora.safetensors")
    res = invoke("merge", str(tmp_path / "lora.safetensors"), "--gates", "math=1", "--out", str(tmp_path / "y"))
    assert res.exit_code == 2 and "--gates collapses a mixture adapter" in res.stderr
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y").exists()


def test_merging_a_mixture_with_other_adapters_says_to_collapse_it_first(tmp_path: Path) -> None:
    """A mixture among other adapters reaches the generic merge, which used to say "bake them into a base" (a
    bake refuses a mixture too): the refusal names the collapse instead, in one line, in the API and the CLI."""
    mix = mixture_adapter(_experts(), {"proj": torch.randn(len(RANKS), IN)}, top_k=2)
    lora = _experts()["math"]
    with pytest.raises(af.UnsupportedError) as err:
        af.merge_adapters([mix, lora])
    said = str(err.value)
    assert "routed mixture" in said and COLLAPSE in said and "bake them" not in said and "\n" not in said
    af.save(mix, tmp_path / "mix.safetensors")
    af.save(lora, tmp_path / "lora.safetensors")
    res = invoke("merge", str(tmp_path / "mix.safetensors"), str(tmp_path / "lora.safetensors"),
                 "--out", str(tmp_path / "x.safetensors"))
    assert res.exit_code == 1 and res.stderr.count("\n") == 1, res.output
    assert COLLAPSE in res.stderr and "bake them" not in res.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_gate_weights_of_fp64_logits_are_fp64() -> None:
    """``pick`` takes the softmax in promote_types(logits, fp32): fp64 logits 1e-12 apart give fp64 gates that
    tell them apart (fp32 gave 0.5 and 0.5); fp16 logits give fp32 gates."""
    logits = torch.tensor([[0.0, 1e-12, -3.0]], dtype=torch.float64)
    idx, w = pick(logits, 2, 1.0)
    assert idx.tolist() == [[1, 0]] and w.dtype == torch.float64
    assert torch.equal(w, torch.softmax(logits[:, [1, 0]], dim=-1)) and w[0, 0] > w[0, 1]
    assert pick(logits, 1, 1.0)[1].dtype == torch.float64
    assert pick(logits.half(), 2, 1.0)[1].dtype == torch.float32
    mix = mixture_adapter(_experts(), {"proj": torch.randn(len(RANKS), IN)}, top_k=2)
    t = {k: v.double() for k, v in mix.module_tensors("proj").items()}
    x = torch.randn(6, IN, dtype=torch.float64)
    logits, out = gemm_forward(mix.modules["proj"]["params"], t, x, torch.zeros(6, OUT, dtype=torch.float64))
    assert logits.dtype == out.dtype == torch.float64


def _update_bound(x: torch.Tensor, mix: af.Adapter, errors: list[float]) -> torch.Tensor:
    """Per token: sum over its chosen experts of g_e * err_e * ||s_e B_e A_e||_F * ||x|| (the routing is the same,
    so this bounds how far the compressed mixture's output can move)."""
    p, t = mix.modules["proj"]["params"], mix.module_tensors("proj")
    x2 = x.reshape(-1, IN)
    idx, w = route(x2, t["router"], p["top_k"], p["temperature"])
    norms = torch.stack([p["scales"][e] * (t["lora_B"][e].double() @ t["lora_A"][e].double()).norm()
                         for e in range(len(p["experts"]))])
    per_expert = torch.tensor(errors, dtype=torch.float64) * norms
    return (w.double() * per_expert[idx]).sum(-1) * x2.double().norm(dim=-1)


@pytest.mark.parametrize("steps", [[{"method": "resize", "rank": 2}],
                                   [{"method": "resize", "energy": 0.9}, {"method": "quantize", "codec": "nf4"}],
                                   [{"method": "quantize", "bits": 8}]])
def test_compress_acts_per_expert_and_keeps_the_router(steps: list[dict]) -> None:
    """Each expert is compressed as that expert alone would be as a LoRA (resize: the same factors' dW and the
    same reported error), the router is stored exact and unencoded, and the compressed mixture's outputs move
    at most what the reported per-expert errors allow."""
    experts = _experts(5)
    mix = mixture_adapter(experts, {"proj": torch.randn(len(RANKS), IN, generator=torch.Generator().manual_seed(2))},
                          top_k=2)
    small = af.compress_adapter(mix, steps=steps)
    assert torch.equal(small.tensor("proj.router"), mix.tensor("proj.router"))
    assert "router" not in small.modules["proj"].get("encoding", {})
    record = small.manifest["compression"]
    errors = record["expert_errors"]["proj"]
    assert len(errors) == len(RANKS) and max(errors) > 0 and record["module_errors"]["proj"] == max(errors)
    if steps[0]["method"] == "resize":
        resized = af.compress_adapter(mix, steps=steps[:1])
        for i, name in enumerate(RANKS):
            alone = af.compress_adapter(expert_adapter(mix, name), steps=steps[:1])
            assert resized.manifest["compression"]["expert_errors"]["proj"][i] == \
                pytest.approx(alone.manifest["compression"]["module_errors"]["proj"], abs=1e-9)
            mine = expert_adapter(resized, name)
            dw = [a.tensor("proj.lora_B").double() @ a.tensor("proj.lora_A").double() for a in (mine, alone)]
            assert float((dw[0] - dw[1]).abs().max()) <= 1e-6
    x = torch.randn(4, 9, IN, generator=torch.Generator().manual_seed(3))
    outs = []
    for adapter in (mix, small):
        model = Holder()
        af.attach(model, adapter)
        with torch.no_grad():
            outs.append(model.proj(x).double())
    moved = (outs[1] - outs[0]).reshape(-1, OUT).norm(dim=-1)
    assert bool((moved <= _update_bound(x, mix, errors) * (1 + 1e-6) + 1e-6).all())
    assert float(moved.max()) > 0


def test_cli_compress_reports_each_expert(tmp_path: Path) -> None:
    mix = mixture_adapter(_experts(), {"proj": torch.randn(len(RANKS), IN)}, top_k=2)
    af.save(mix, tmp_path / "mix.safetensors")
    res = invoke("compress", str(tmp_path / "mix.safetensors"), str(tmp_path / "small.safetensors"), "--rank", "2")
    assert res.exit_code == 0, res.output
    errors = af.load(tmp_path / "small.safetensors").manifest["compression"]["expert_errors"]["proj"]
    assert "per expert (worst module): " + ", ".join(f"{n} {e:.3e}" for n, e in zip(RANKS, errors)) in res.stdout
    assert errors[0] < 1e-6 < min(errors[1:])  # math has rank 2 already (SVD rounding only); the others lose some


def test_compeft_on_a_mixture_is_refused_in_one_line(tmp_path: Path) -> None:
    mix = mixture_adapter(_experts(), {"proj": torch.randn(len(RANKS), IN)}, top_k=2)
    for target in ("params", "delta"):
        with pytest.raises(af.UnsupportedError, match="compeft does not apply to module 'proj' .kind mixture."):
            af.compress_adapter(mix, steps=[{"method": "compeft", "density": 0.3, "target": target}])
    af.save(mix, tmp_path / "mix.safetensors")
    res = invoke("compress", str(tmp_path / "mix.safetensors"), str(tmp_path / "small.safetensors"),
                 "--steps", '[{"method": "compeft", "density": 0.3}]')
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "compeft does not apply" in res.stderr
    assert not (tmp_path / "small.safetensors").exists()


def test_port_keeps_the_routing_exact() -> None:
    """A mixture depends on no base weight: ported to a base with other weights and the same shapes, every tensor
    is kept and its update (routing included) is the same (to 1e-6); a base of other shapes is refused."""
    mix = mixture_adapter(_experts(6), {"proj": torch.randn(len(RANKS), IN)}, top_k=2)
    old, new = Holder(), Holder()
    with torch.no_grad():
        new.proj.weight.mul_(-2)
    ported = af.registry.verb("mixture", "port")(mix, new_base=new)
    for name, t in mix.tensors().items():
        assert torch.equal(ported.tensor(name), t), name
    assert ported.manifest["provenance"][-1]["tool"] == "adapterfmt port"
    x = torch.randn(5, 7, IN, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = [old.proj(x), new.proj(x)]
        af.attach(old, mix)
        af.attach(new, ported)
        after = [old.proj(x), new.proj(x)]
    assert torch.allclose(after[1] - before[1], after[0] - before[0], atol=1e-6)
    other = nn.Module()
    other.proj = nn.Linear(IN + 1, OUT)
    with pytest.raises(af.BaseMismatchError, match="proj"):
        af.port_adapter(mix, new_base=other)
