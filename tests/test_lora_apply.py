"""Applying LoRA adapters to live models: PEFT's function on Linear / Conv1D / Embedding / Conv2d (rsLoRA,
per-module rank and alpha, LoRA bias), merge == unmerged, exact unmerge, switching, and mixed batches
(several adapters and the bare base in one forward pass) through the batched per-row path."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import adapterfmt as af
from adapterfmt.deltas.base import ROWS_CACHE_ATTR
from adapterfmt.tiny import build_tiny


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)).eval()


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


def from_peft(base: nn.Module, peft_model: nn.Module, method: str = "lora") -> af.Adapter:
    """Our adapter holding a PEFT LoRA's own tensors (randomised B so the test sees the delta)."""
    modules, tensors = {}, {}
    for path, module in base.named_modules():
        lay = peft_model.base_model.model.get_submodule(path) if path else None
        if lay is None or "default" not in (getattr(lay, "scaling", None) if isinstance(getattr(lay, "scaling", None), dict) else {}):
            continue
        entry = af.module_entry("lowrank", module, {"scale": lay.scaling["default"]})
        if isinstance(module, nn.Embedding):
            a, b = lay.lora_embedding_A["default"], lay.lora_embedding_B["default"]
        else:
            a, b = lay.lora_A["default"].weight, lay.lora_B["default"].weight
            if lay.lora_B["default"].bias is not None:
                tensors[f"{path}.bias"] = lay.lora_B["default"].bias.detach().clone()
        modules[path] = entry
        tensors[f"{path}.lora_A"], tensors[f"{path}.lora_B"] = a.detach().clone(), b.detach().clone()
    return af.validate(af.Adapter(af.new_manifest(method, modules), tensors))


def peft_lora(base: nn.Module, seed: int = 1, **cfg) -> nn.Module:
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(**cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return pm.eval()


CASES = {
    "llama_all_linear_rslora_patterns": (tiny_llama, dict(target_modules="all-linear", r=4, lora_alpha=8,
                                                          use_rslora=True, rank_pattern={"down_proj": 2},
                                                          alpha_pattern={"q_proj": 3})),
    "llama_bias_layers": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "embed_tokens"], r=3, lora_alpha=6,
                                           lora_bias=False, layers_to_transform=None)),
    "gpt2_conv1d_embedding": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc", "wte"], r=4, lora_alpha=4,
                                              fan_in_fan_out=True)),
    "llama_lora_bias": (tiny_llama, dict(target_modules=["q_proj", "o_proj"], r=2, lora_alpha=2, lora_bias=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lora_matches_peft(case: str) -> None:
    build, cfg = CASES[case]
    base = build()
    pm = peft_lora(base, **cfg)
    if cfg.get("lora_bias"):
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name and name.endswith("bias"):
                    p.normal_(0, 0.3)
    adapter = from_peft(base, pm)
    ids = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        af.attach(base, adapter)
        torch.testing.assert_close(base(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
        if cfg.get("lora_bias"):  # the targeted layers have no bias to fold a LoRA bias into
            with pytest.raises(af.UnsupportedError, match="without a bias"):
                af.merge_into(base, "lora")
            torch.testing.assert_close(base(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)  # rolled back
            return
        af.merge_into(base, "lora")
        pm.merge_adapter()  # merging into a tied embedding changes the output head too, in PEFT as here
        torch.testing.assert_close(base(input_ids=ids).logits, pm(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_conv2d_lora_matches_peft() -> None:
    base = ConvNet()
    pm = peft_lora(base, target_modules=["conv"], r=2, lora_alpha=4)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = pm(x)
        af.attach(base, from_peft(base, pm))
        torch.testing.assert_close(base(x), want, atol=1e-5, rtol=1e-5)


# ----- many adapters on the tiny model ---------------------------------------------------------------------
def random_lora(model: nn.Module, seed: int, r: int, *, targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"),
                bias: bool = False) -> af.Adapter:
    gen = torch.Generator().manual_seed(seed)
    modules, tensors = {}, {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] in targets:
            out, n_in = module.weight.shape
            modules[path] = af.lowrank_entry([out, n_in], 0.5 + seed / 10)
            tensors[f"{path}.lora_A"] = torch.randn(r, n_in, generator=gen) * 0.2
            tensors[f"{path}.lora_B"] = torch.randn(out, r, generator=gen) * 0.2
            if bias:
                tensors[f"{path}.bias"] = torch.randn(out, generator=gen) * 0.2
    return af.Adapter(af.new_manifest("lora", modules), tensors)


@pytest.fixture
def three() -> tuple[nn.Module, dict[str, af.Adapter]]:
    model = build_tiny(seed=0)
    return model, {"a": random_lora(model, 1, 4), "b": random_lora(model, 2, 2, bias=True),
                   "c": random_lora(model, 3, 8, targets=("k_proj", "up_proj", "v_proj"))}


def single_outputs(model: nn.Module, adapters: dict[str, af.Adapter], x: torch.Tensor) -> dict[str | None, torch.Tensor]:
    out = {None: model(x)}
    for name, adapter in adapters.items():
        af.attach(model, adapter, name=name)
        out[name] = model(x)
        af.detach(model, name)
    return out


@torch.no_grad()
def test_mixed_batch_equals_each_rows_own_adapter(three) -> None:
    model, adapters = three
    x = torch.randint(0, 128, (7, 9), generator=torch.Generator().manual_seed(0))
    rows = ["a", None, "c", "b", "a", None, "b"]
    want = single_outputs(model, adapters, x)
    for name, adapter in adapters.items():
        af.attach(model, adapter, name=name)
    with af.adapter_ids(model, rows):
        got = model(x)
    for i, name in enumerate(rows):
        torch.testing.assert_close(got[i], want[name][i], atol=1e-5, rtol=1e-5)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert ROWS_CACHE_ATTR in q.__dict__  # served by the batched per-row path, not by grouping rows
    af.detach(model, "b")
    assert ROWS_CACHE_ATTR not in q.__dict__  # the stacked factors are dropped when the set changes
    with af.adapter_ids(model, ["c", "a"]):
        got = model(x[:2])
    torch.testing.assert_close(got[0], want["c"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want["a"][1], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_mixed_batch_with_dora_groups_rows(three) -> None:
    model, adapters = three
    dora = random_lora(model, 5, 2)
    for path in dora.modules:
        dora._memory[f"{path}.magnitude"] = 1 + 0.1 * torch.rand(model.get_submodule(path).weight.shape[0])
    adapters = {"a": adapters["a"], "d": af.validate(af.Adapter(dora.manifest, dora.tensors()))}
    x = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(1))
    want = single_outputs(model, adapters, x)
    for name, adapter in adapters.items():
        af.attach(model, adapter, name=name)
    with af.adapter_ids(model, ["d", None, "a"]):
        got = model(x)
    for i, name in enumerate(["d", None, "a"]):
        torch.testing.assert_close(got[i], want[name][i], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_switch_disable_remove_merge_unmerge(three) -> None:
    model, adapters = three
    x = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    want = single_outputs(model, adapters, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name, adapter in adapters.items():
        af.attach(model, adapter, name=name, activate=False)
    assert af.attached(model) == ["a", "b", "c"]
    torch.testing.assert_close(model(x), want[None])
    for name in adapters:
        af.activate(model, name)
        torch.testing.assert_close(model(x), want[name], atol=1e-5, rtol=1e-5)
    af.activate(model, None)
    torch.testing.assert_close(model(x), want[None])
    af.activate(model, "c")
    af.merge_into(model, "c")
    af.activate(model, None)  # merged weights act whatever is active
    torch.testing.assert_close(model(x), want["c"], atol=1e-5, rtol=1e-5)
    af.unmerge(model, "c")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)
    af.detach(model)
    assert af.attached(model) == [] and not any(m._forward_hooks for m in model.modules())
    torch.testing.assert_close(model(x), want[None])


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merged_equals_unmerged_and_unmerge_restores(dtype: torch.dtype) -> None:
    model = tiny_gpt2().to(dtype)
    # (not wte: GPT-2 ties it to the output head, so merging into it changes the head as well)
    pm = peft_lora(model, target_modules=["c_attn", "c_fc", "c_proj"], r=4, lora_alpha=8, fan_in_fan_out=True)
    adapter = from_peft(model, pm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    af.attach(model, adapter)
    unmerged = model(input_ids=ids).logits
    af.merge_into(model, "lora")
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(model(input_ids=ids).logits, unmerged, atol=tol, rtol=tol)
    af.unmerge(model, "lora")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)
