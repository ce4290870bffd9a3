"""Shared pieces of the foreign-format tests (tests/test_formats_*.py): a tiny Llama, random LoRA adapters
built directly as adapterfmt adapters, and the numerical check against a dense reference.

The dense reference is computed by each test from the FOREIGN tensors with that format's documented math
(never through adapterfmt's delta code): ``check_function`` adds those dW to a copy of the base weights
and compares the logits with the adapter read back by the codec and applied by ``af.attach``.
"""

from __future__ import annotations

import copy

import torch
from helpers_peft import VOCAB, build, logits
from torch import nn

import adapterfmt as af

ATOL = 1e-5
LLAMA_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")


def llama() -> nn.Module:
    """Tiny fp32 LlamaForCausalLM: hidden 16, 2 layers, 2 heads, 1 KV head (head_dim 8), vocab 48."""
    return build("llama")


def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))


def llama_modules(layers=(0, 1), names=LLAMA_ATTN + LLAMA_MLP) -> list[str]:
    return [f"model.layers.{i}.{'self_attn' if n in LLAMA_ATTN else 'mlp'}.{n}" for i in layers for n in names]


def lora_adapter(model: nn.Module, modules: list[str], *, r: int | dict[str, int] = 4,
                 scale: float | dict[str, float] = 2.0, seed: int = 0) -> af.Adapter:
    """A LoRA adapter with random (non-zero) A and B on ``modules`` of ``model`` (2-D weights, [out, in])."""
    gen = torch.Generator().manual_seed(seed)
    entries, tensors = {}, {}
    for m in modules:
        w = model.get_submodule(m).weight
        rank = r[m] if isinstance(r, dict) else r
        s = scale[m] if isinstance(scale, dict) else scale
        transposed = isinstance(model.get_submodule(m), nn.Embedding)
        fout, fin = (w.shape[1], w.shape[0]) if transposed else tuple(w.shape)
        entries[m] = af.lowrank_entry(list(w.shape), s, transposed=transposed)
        tensors[f"{m}.lora_A"] = 0.3 * torch.randn(rank, fin, generator=gen)
        tensors[f"{m}.lora_B"] = 0.3 * torch.randn(fout, rank, generator=gen)
    return af.Adapter(af.new_manifest("lora", entries, config={"r": r if isinstance(r, int) else 0}), tensors)


class Pipe(nn.Module):
    """A diffusion-pipeline-shaped toy: text_encoder (embedding + linear) -> unet (conv + linear)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.text_encoder = nn.Module()
        self.text_encoder.text_model = nn.Sequential(nn.Embedding(48, 16), nn.Linear(16, 16))
        self.unet = nn.Module()
        self.unet.down_blocks = nn.ModuleList([nn.Conv2d(4, 6, 3, padding=1)])
        self.unet.proj_out = nn.Linear(24, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        h = self.text_encoder.text_model(ids).view(b, t, 4, 4).permute(0, 2, 1, 3)
        h = self.unet.down_blocks[0](h).permute(0, 2, 1, 3).reshape(b, t, 24)
        return self.unet.proj_out(h)


def check_function(base: nn.Module, adapter: af.Adapter, dense: dict[str, torch.Tensor]) -> None:
    """``adapter`` attached to ``base`` gives the logits of ``base`` with ``W += dense[module]`` (stored
    layout), within fp32 tolerance; and it changes the output."""
    x = ids()
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for m, dw in dense.items():
            ref.get_submodule(m).weight += dw
    expected, plain = logits(ref, x), logits(base, x)
    af.attach(base, adapter, name="fmt")
    try:
        got = logits(base, x)
    finally:
        af.detach(base)
    assert (expected - plain).abs().max() > 1e-3, "the adapter must change the output"
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
