"""The golden example adapters of ``spec/examples/``: tiny, deterministic, every delta kind and codec, both file forms.

Values are small multiples of 1/16, exact in every float dtype, computed by formula rather than by a random
generator, so the files depend on nothing but this module and the writer. ``python -m adapterfmt.format.golden
spec/examples`` regenerates them; the tests regenerate them into a temp folder and compare bytes.

:func:`golden_base` is the base model the examples target; its fingerprint is the test vector of the spec.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter import Adapter, save
from .codecs import encode
from .fingerprint import fingerprint_module
from .manifest import new_manifest
from .ternary import ternary_encode

BASE_NAME = "adapterfmt-golden-base"


def ramp(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``((i * 5 + seed * 3) mod 17 - 8) / 16`` over the flat index ``i``: values in [-0.5, 0.5], exact in fp16/bf16."""
    n = math.prod(shape)
    i = torch.arange(n, dtype=torch.int64)
    return (((i * 5 + seed * 3) % 17 - 8).to(torch.float32) / 16).reshape(shape).to(dtype)


class GoldenBase(nn.Module):
    """A tiny module tree with Llama-style names: an embedding, linear layers (with and without bias), a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(16, 8)
        layer = nn.Module()
        layer.self_attn = nn.Module()
        layer.self_attn.q_proj = nn.Linear(8, 8, bias=False)
        layer.self_attn.v_proj = nn.Linear(8, 4, bias=True)
        layer.mlp = nn.Module()
        layer.mlp.up_proj = nn.Linear(8, 12, bias=False)
        layer.mlp.down_proj = nn.Linear(12, 8, bias=True)
        self.model.layers = nn.ModuleList([layer])
        self.vision = nn.Module()
        self.vision.conv = nn.Conv2d(3, 4, 3, bias=True)


def golden_base() -> GoldenBase:
    """The base model of the golden examples, with formula weights (``ramp`` seeded by parameter order)."""
    model = GoldenBase()
    with torch.no_grad():
        for seed, (_, p) in enumerate(sorted(model.named_parameters())):
            p.copy_(ramp(*p.shape, seed=seed + 1))
    return model.eval()


Q, V, UP, DOWN = (f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj",
                                                    "mlp.down_proj"))
EMBED, CONV = "model.embed_tokens", "vision.conv"
Built = tuple[str, dict[str, Any], dict[str, dict[str, Any]], dict[str, torch.Tensor]]


def _lowrank() -> Built:
    """LoRA in each layout: plain (fp32), bf16, with a LoRA bias, DoRA magnitude, embedding, conv."""
    modules = {
        Q: {"kind": "lowrank", "shape": [8, 8], "params": {"scale": 2.0}},
        UP: {"kind": "lowrank", "shape": [12, 8], "params": {"scale": 0.5}},
        V: {"kind": "lowrank", "shape": [4, 8], "params": {"scale": 1.0}},
        DOWN: {"kind": "lowrank", "shape": [8, 12], "params": {"scale": 2.0}},
        EMBED: {"kind": "lowrank", "shape": [16, 8], "params": {"scale": 2.0, "transposed": True}},
        CONV: {"kind": "lowrank", "shape": [4, 3, 3, 3], "params": {"scale": 1.0}},
    }
    t = {
        f"{Q}.lora_A": ramp(2, 8, seed=1), f"{Q}.lora_B": ramp(8, 2, seed=2),
        f"{UP}.lora_A": ramp(2, 8, seed=3, dtype=torch.bfloat16), f"{UP}.lora_B": ramp(12, 2, seed=4, dtype=torch.bfloat16),
        f"{V}.lora_A": ramp(1, 8, seed=5), f"{V}.lora_B": ramp(4, 1, seed=6), f"{V}.bias": ramp(4, seed=7),
        f"{DOWN}.lora_A": ramp(2, 12, seed=8), f"{DOWN}.lora_B": ramp(8, 2, seed=9),
        f"{DOWN}.magnitude": 1 + ramp(8, seed=10).abs(),
        f"{EMBED}.lora_A": ramp(2, 16, seed=11), f"{EMBED}.lora_B": ramp(8, 2, seed=12),
        f"{CONV}.lora_A": ramp(2, 3, 3, 3, seed=13), f"{CONV}.lora_B": ramp(4, 2, 1, 1, seed=14),
    }
    return "lora", {"r": 2, "alpha": 4}, modules, t


def _lowrank_svd() -> Built:
    """Spec 1.2's middle factor and base part: PiSSA derived (``svd_top``) on up_proj; an explicit part with
    vector middle factors (SORSA-shaped) on down_proj; LoLDU (``ldu``, only the diagonal stored) on v_proj,
    whose ``rows`` [2, 1] are the first pivots of partial-pivoting LU of its weight; IntTune (``nystrom``,
    scale 0, only the r x r middle factor stored) on q_proj."""
    modules = {
        UP: {"kind": "lowrank", "shape": [12, 8],
             "params": {"scale": 0.5, "base_part": {"scale": 1.0, "recipe": "svd_top", "rank": 2}}},
        DOWN: {"kind": "lowrank", "shape": [8, 12], "params": {"scale": 0.5, "base_part": {"scale": 0.5}}},
        V: {"kind": "lowrank", "shape": [4, 8],
            "params": {"scale": 0.25, "base_part": {"scale": 0.25, "recipe": "ldu", "rank": 2, "rows": [2, 1]}}},
        Q: {"kind": "lowrank", "shape": [8, 8],
            "params": {"scale": 2.0, "base_part": {"scale": 0.0, "recipe": "nystrom", "rank": 2}}},
    }
    t = {
        f"{UP}.lora_A": ramp(2, 8, seed=1), f"{UP}.lora_B": ramp(12, 2, seed=2),
        f"{DOWN}.lora_A": ramp(2, 12, seed=3), f"{DOWN}.lora_B": ramp(8, 2, seed=4), f"{DOWN}.lora_mid": 1 + ramp(2, seed=5),
        f"{DOWN}.init_A": ramp(2, 12, seed=6), f"{DOWN}.init_B": ramp(8, 2, seed=7), f"{DOWN}.init_mid": 1 + ramp(2, seed=8),
        f"{V}.lora_mid": 0.5 + ramp(2, seed=9),
        f"{Q}.lora_mid": ramp(2, 2, seed=10),
    }
    return "lowrank_svd", {}, modules, t


def _dense() -> Built:
    """A task vector (mode add, fp16, with a bias delta) and a replaced weight (mode replace)."""
    modules = {
        DOWN: {"kind": "dense", "shape": [8, 12], "params": {"mode": "add", "scale": 0.5}},
        Q: {"kind": "dense", "shape": [8, 8], "params": {"mode": "replace"}},
    }
    t = {f"{DOWN}.delta": ramp(8, 12, seed=1, dtype=torch.float16), f"{DOWN}.bias_delta": ramp(8, seed=2, dtype=torch.float16),
         f"{Q}.value": ramp(8, 8, seed=3)}
    return "task_vector", {}, modules, t


def _sparse() -> Built:
    """Sorted flat row-major indices (int64) and fp32 values, with a scale."""
    idx = torch.tensor([0, 3, 9, 10, 31, 47, 63, 64, 95], dtype=torch.int64)
    modules = {UP: {"kind": "sparse", "shape": [12, 8], "params": {"scale": 0.25}}}
    return "sparse_ft", {}, modules, {f"{UP}.indices": idx, f"{UP}.values": ramp(9, seed=4)}


def _vector() -> Built:
    """IA3-style output and input scaling, LoFiT-style output offset."""
    modules = {
        Q: {"kind": "vector", "shape": [8, 8], "params": {"op": "scale", "side": "output"}},
        DOWN: {"kind": "vector", "shape": [8, 12], "params": {"op": "scale", "side": "input"}},
        V: {"kind": "vector", "shape": [4, 8], "params": {"op": "offset", "side": "output"}},
    }
    t = {f"{Q}.vector": 1 + ramp(8, seed=1), f"{DOWN}.vector": 1 + ramp(12, seed=2), f"{V}.vector": ramp(4, seed=3)}
    return "ia3", {}, modules, t


def _mask() -> Built:
    """Structured pruning (spec 6.13): a head of q_proj's input removed, a group of v_proj's outputs (and their
    bias) removed, one of down_proj's input groups of 3 removed."""
    modules = {
        Q: {"kind": "mask", "shape": [8, 8], "params": {"side": "input", "group": 4}},
        V: {"kind": "mask", "shape": [4, 8], "params": {"side": "output", "group": 2}},
        DOWN: {"kind": "mask", "shape": [8, 12], "params": {"side": "input", "group": 3}},
    }
    t = {f"{Q}.keep": torch.tensor([1, 0], dtype=torch.uint8), f"{V}.keep": torch.tensor([0, 1], dtype=torch.uint8),
         f"{DOWN}.keep": torch.tensor([1, 1, 0, 1], dtype=torch.uint8)}
    return "light_peft", {}, modules, t


def _prompt() -> Built:
    """Three virtual tokens (bf16) prepended to the output of the input embedding."""
    modules = {EMBED: {"kind": "prompt", "shape": [16, 8], "params": {"position": "prefix"}}}
    return "prompt_tuning", {"num_virtual_tokens": 3}, modules, {f"{EMBED}.embeddings": ramp(3, 8, seed=5, dtype=torch.bfloat16)}


def _multitask_prompt() -> Built:
    """A plugin kind (spec 6.10.16): a shared prompt of 3 tokens, 2 tasks of rank 2, task 1 applied."""
    modules = {EMBED: {"kind": "multitask_prompt", "shape": [16, 8], "params": {"position": "prefix", "task": 1}}}
    t = {f"{EMBED}.embeddings": ramp(3, 8, seed=10), f"{EMBED}.task_cols": ramp(2, 3, 2, seed=11),
         f"{EMBED}.task_rows": ramp(2, 2, 8, seed=12)}
    return "multitask_prompt_tuning", {"num_virtual_tokens": 3, "num_tasks": 2, "num_ranks": 2, "task": 1}, modules, t


def _bottleneck() -> Built:
    """Plugin kinds (spec 6.10.15): a bottleneck of rank 2 on q_proj's output (gelu_tanh, scale 0.5) and a
    parallel one of rank 3 on the MLP, reading up_proj's input and adding to down_proj's output (relu, scale 2)."""
    mlp = "model.layers.0.mlp"
    modules = {Q: {"kind": "bottleneck", "shape": [8], "params": {"activation": "gelu_tanh", "scale": 0.5}},
               mlp: {"kind": "parallel_bottleneck", "shape": [8],
                     "params": {"activation": "relu", "scale": 2.0, "reads": "up_proj", "adds": "down_proj"}}}
    t = {f"{Q}.down": ramp(2, 8, seed=1), f"{Q}.down_bias": ramp(2, seed=2), f"{Q}.up": ramp(8, 2, seed=3),
         f"{Q}.up_bias": ramp(8, seed=4), f"{mlp}.down": ramp(3, 8, seed=5), f"{mlp}.down_bias": ramp(3, seed=6),
         f"{mlp}.up": ramp(8, 3, seed=7), f"{mlp}.up_bias": ramp(8, seed=8)}
    return "bottleneck", {}, modules, t


def _lycoris() -> Built:
    """Plugin kinds 6.10.1-6.10.4: LoHa (``hadamard``) on q_proj and on the conv (columns are ``[in, kh, kw]``
    flattened), LoKr (``kronecker``, a whole first factor and a pair second) on up_proj, VeRA (``vera``, one
    shared pair sliced per module) on v_proj and down_proj, replaced embedding ``rows``."""
    shared = {"vera_A": "vera_A", "vera_B": "vera_B"}
    modules = {Q: {"kind": "hadamard", "shape": [8, 8], "params": {"scale": 0.5}},
               CONV: {"kind": "hadamard", "shape": [4, 3, 3, 3], "params": {}},
               UP: {"kind": "kronecker", "shape": [12, 8], "params": {"scale": 0.25}},
               V: {"kind": "vera", "shape": [4, 8], "params": {"shared": shared}},
               DOWN: {"kind": "vera", "shape": [8, 12], "params": {"shared": shared}},
               EMBED: {"kind": "rows", "shape": [16, 8], "params": {}}}
    t = {f"{Q}.hada_w1_a": ramp(8, 2, seed=1), f"{Q}.hada_w1_b": ramp(2, 8, seed=2),
         f"{Q}.hada_w2_a": ramp(8, 2, seed=3), f"{Q}.hada_w2_b": ramp(2, 8, seed=4),
         f"{CONV}.hada_w1_a": ramp(4, 1, seed=5), f"{CONV}.hada_w1_b": ramp(1, 27, seed=6),
         f"{CONV}.hada_w2_a": ramp(4, 1, seed=7), f"{CONV}.hada_w2_b": ramp(1, 27, seed=8),
         f"{UP}.lokr_w1": ramp(3, 2, seed=9), f"{UP}.lokr_w2_a": ramp(4, 1, seed=10), f"{UP}.lokr_w2_b": ramp(1, 4, seed=11),
         "vera_A": ramp(2, 12, seed=12), "vera_B": ramp(8, 2, seed=13),
         f"{V}.lambda_b": ramp(4, seed=14), f"{V}.lambda_d": ramp(2, seed=15),
         f"{DOWN}.lambda_b": ramp(8, seed=16), f"{DOWN}.lambda_d": ramp(2, seed=17),
         f"{EMBED}.indices": torch.tensor([2, 5, 11], dtype=torch.int64), f"{EMBED}.values": ramp(3, 8, seed=18)}
    return "lycoris", {}, modules, t


def _rotation() -> Built:
    """Multiplicative plugin kinds (6.10.7): OFT (``cayley``: exact, 2 blocks of 4, on q_proj's input; PEFT's
    Neumann series, one shared block of 3, on the conv's flattened input), BOFT (``butterfly``: 2 factors of 4
    blocks of 2, with ``output_scale``) on up_proj, HRA (``householder``) on down_proj's input and,
    orthogonalised, on v_proj's output."""
    modules = {Q: {"kind": "cayley", "shape": [8, 8], "params": {}},
               CONV: {"kind": "cayley", "shape": [4, 3, 3, 3], "params": {"series": [2.0, 2.0, 1.0]}},
               UP: {"kind": "butterfly", "shape": [12, 8], "params": {}},
               DOWN: {"kind": "householder", "shape": [8, 12], "params": {}},
               V: {"kind": "householder", "shape": [4, 8], "params": {"side": "output", "orthogonalize": True}}}
    t = {f"{Q}.skew": ramp(2, 6, seed=1), f"{CONV}.skew": ramp(1, 3, seed=2),
         f"{UP}.blocks": ramp(2, 4, 2, 2, seed=3), f"{UP}.output_scale": 1 + ramp(12, seed=4),
         f"{DOWN}.vectors": ramp(12, 2, seed=5), f"{V}.vectors": ramp(4, 2, seed=6)}
    return "rotation", {}, modules, t


def _structured() -> Built:
    """Structured additive plugin kinds (6.10.8-6.10.12): FourierFT (``fourier``) on q_proj, VB-LoRA
    (``vector_bank``, a shared bank of 5 vectors of 4, top 2) on up_proj, RandLoRA (``randlora``, shared bases;
    n_in > out, so the product is transposed) on down_proj, C3A (``circulant``, blocks of 2) on v_proj, MiSS
    (``block_share`` tile) on the embedding (``transposed``)."""
    modules = {Q: {"kind": "fourier", "shape": [8, 8], "params": {"scale": 4.0}},
               UP: {"kind": "vector_bank", "shape": [12, 8], "params": {"topk": 2, "shared": {"vector_bank": "bank"}}},
               DOWN: {"kind": "randlora", "shape": [8, 12],
                      "params": {"scale": 0.5, "shared": {"basis_A": "basis_A", "basis_B": "basis_B"}}},
               V: {"kind": "circulant", "shape": [4, 8], "params": {"scale": 0.125}},
               EMBED: {"kind": "block_share", "shape": [16, 8], "params": {"mode": "tile", "transposed": True}}}
    t = {f"{Q}.spectrum": ramp(5, seed=1), f"{Q}.indices": torch.tensor([9, 0, 35, 62, 17], dtype=torch.int64),
         "bank": ramp(5, 4, seed=2), f"{UP}.logits_A": ramp(2, 2, 5, seed=3), f"{UP}.logits_B": ramp(3, 2, 5, seed=4),
         "basis_A": ramp(2, 1, 8, seed=5), "basis_B": ramp(12, 2, 2, seed=6),
         f"{DOWN}.lambda": ramp(2, 2, seed=7), f"{DOWN}.gamma": ramp(2, 8, seed=8),
         f"{V}.kernel": ramp(2, 4, 2, seed=9), f"{EMBED}.block": ramp(3, 4, seed=10)}
    return "structured", {}, modules, t


def _blocks() -> Built:
    """S2FT (``block``, 6.10.6): 2 rows of q_proj, 3 columns of down_proj, 2 rows (function layout) of the
    transposed embedding; MiSS ``block_share`` mode ``bat`` (6.10.12, blocks of 4) on up_proj."""
    modules = {Q: {"kind": "block", "shape": [8, 8], "params": {"axis": "rows", "scale": 0.5}},
               DOWN: {"kind": "block", "shape": [8, 12], "params": {"axis": "columns"}},
               EMBED: {"kind": "block", "shape": [16, 8], "params": {"axis": "rows", "transposed": True}},
               UP: {"kind": "block_share", "shape": [12, 8], "params": {"mode": "bat"}}}
    i64 = torch.int64
    t = {f"{Q}.indices": torch.tensor([1, 6], dtype=i64), f"{Q}.block": ramp(2, 8, seed=1),
         f"{DOWN}.indices": torch.tensor([0, 4, 11], dtype=i64), f"{DOWN}.block": ramp(8, 3, seed=2),
         f"{EMBED}.indices": torch.tensor([3, 7], dtype=i64), f"{EMBED}.block": ramp(2, 16, seed=3),
         f"{UP}.block": ramp(3, 4, 4, seed=4)}
    return "s2ft", {}, modules, t


def _prompt_space() -> Built:
    """DePT (``dept``, 6.10.5) on the embedding: 2 virtual tokens and a rank-2 offset over 5 positions; prefix
    tuning (``prefix``, 6.10.14) on ``model``: 2 key/value positions for 1 layer of 2 key/value heads of
    dimension 2. The golden base has no decoder stack, so the ``prefix`` entry validates but attaches only to a
    transformers stack of that geometry (the tests use a tiny Llama with the golden base's module shapes)."""
    modules = {EMBED: {"kind": "dept", "shape": [16, 8], "params": {"position": "prefix", "scale": 0.5}},
               "model": {"kind": "prefix", "shape": [1, 2, 2], "params": {}}}
    t = {f"{EMBED}.embeddings": ramp(2, 8, seed=1), f"{EMBED}.offset_A": ramp(5, 2, seed=2),
         f"{EMBED}.offset_B": ramp(2, 8, seed=3), "model.keys": ramp(1, 2, 2, 2, seed=4),
         "model.values": ramp(1, 2, 2, 2, seed=5)}
    return "prompt_space", {}, modules, t


def _mixture() -> Built:
    """MeteoRA (``mixture``, 6.10.13): 3 rank-2 experts routed per token (top 2, temperature 0.5, expert
    scales) on up_proj; per sequence, top 1 of ``abs`` logits, on down_proj."""
    experts = ["code", "math", "chat"]
    modules = {UP: {"kind": "mixture", "shape": [12, 8],
                    "params": {"experts": experts, "scales": [1.0, 0.5, 2.0], "top_k": 2, "temperature": 0.5}},
               DOWN: {"kind": "mixture", "shape": [8, 12],
                      "params": {"experts": experts, "top_k": 1, "granularity": "sequence", "logits": "abs"}}}
    t = {f"{UP}.router": ramp(3, 8, seed=1), f"{UP}.lora_A": ramp(3, 2, 8, seed=2), f"{UP}.lora_B": ramp(3, 12, 2, seed=3),
         f"{DOWN}.router": ramp(3, 12, seed=4), f"{DOWN}.lora_A": ramp(3, 2, 12, seed=5),
         f"{DOWN}.lora_B": ramp(3, 8, 2, seed=6)}
    return "mixture", {}, modules, t


QSCALE_QUANT = {"method": "rtn", "bits": 4, "group_size": 2, "zero_point": "asymmetric"}
"""The ``qscale`` example's grid; the golden base's weights lie on it (two values per group are min and max)."""


def _qscale() -> Built:
    """PEQA (``qscale``, 6.12): new scales (``ratio``) on q_proj; L4Q (``ratio`` with a LoRA, codes recomputed)
    on up_proj; the base's quantisation record in ``base.quantization``."""
    modules = {Q: {"kind": "qscale", "shape": [8, 8], "params": {"quant": QSCALE_QUANT}},
               UP: {"kind": "qscale", "shape": [12, 8], "params": {"quant": QSCALE_QUANT, "scale": 0.5}}}
    t = {f"{Q}.ratio": 1 + ramp(8, 4, seed=1) / 4, f"{UP}.ratio": 1 + ramp(12, 4, seed=2) / 4,
         f"{UP}.lora_A": ramp(2, 8, seed=3), f"{UP}.lora_B": ramp(12, 2, seed=4)}
    return "qscale", {}, modules, t


def _ternary() -> Built:
    """ComPEFT sign patterns: a bitmap mask with one scale per tensor, varint gaps with one scale per group."""
    flat = torch.arange(96)
    down, down_p = ternary_encode(ramp(8, 12, seed=1), flat % 3 == 0, layout="bitmap")
    up, up_p = ternary_encode(ramp(12, 8, seed=2), (flat == 5) | (flat == 6) | (flat == 40) | (flat == 90),
                              group_size=32, layout="gaps")
    modules = {DOWN: {"kind": "ternary", "shape": [8, 12], "params": {**down_p, "scale": 0.5}},
               UP: {"kind": "ternary", "shape": [12, 8], "params": up_p}}
    t = {**{f"{DOWN}.{r}": v for r, v in down.items()}, **{f"{UP}.{r}": v for r, v in up.items()}}
    return "task_vector", {}, modules, t


def _encoded() -> Built:
    """Compressed storage: roles stored through the int8, int4 and ternary codecs (``encoding``)."""
    modules = {Q: {"kind": "lowrank", "shape": [8, 8], "params": {"scale": 2.0}, "encoding": {}},
               DOWN: {"kind": "dense", "shape": [8, 12], "params": {"mode": "add"}, "encoding": {}}}
    t: dict[str, torch.Tensor] = {}
    for module, role, codec, tensor, options in [
        (Q, "lora_A", "int8", ramp(2, 8, seed=1), {}),
        (Q, "lora_B", "int4", ramp(8, 2, seed=2), {"group_size": 4}),
        (DOWN, "delta", "ternary", ramp(8, 12, seed=3), {"density": 0.25}),
    ]:
        parts, spec = encode(codec, tensor, **options)
        modules[module]["encoding"][role] = spec
        t.update({f"{module}.{role}.{part}": v for part, v in parts.items()})
    return "lora", {"r": 2}, modules, t


def _codebook() -> Built:
    """Compressed storage through the 4-bit code books: ``nf4`` (block 4) and ``fp4`` (a last partial block)."""
    modules = {Q: {"kind": "lowrank", "shape": [8, 8], "params": {"scale": 2.0}, "encoding": {}}}
    t: dict[str, torch.Tensor] = {}
    for role, codec, tensor, block in [("lora_A", "nf4", ramp(2, 8, seed=8), 4),
                                       ("lora_B", "fp4", ramp(8, 2, seed=9), 6)]:
        parts, spec = encode(codec, tensor, block_size=block)
        modules[Q]["encoding"][role] = spec
        t.update({f"{Q}.{role}.{part}": v for part, v in parts.items()})
    return "lora", {"r": 2}, modules, t


def _extensions() -> Built:
    """Optional manifest parts: a namespaced extension (not must-understand) and a provenance chain."""
    modules = {Q: {"kind": "lowrank", "shape": [8, 8], "params": {"scale": 1.0}}}
    return "lora", {"r": 1}, modules, {f"{Q}.lora_A": ramp(1, 8, seed=6), f"{Q}.lora_B": ramp(8, 1, seed=7)}


EXAMPLES: dict[str, Callable[[], Built]] = {
    "lowrank": _lowrank, "lowrank_svd": _lowrank_svd, "dense": _dense, "sparse": _sparse, "vector": _vector,
    "mask": _mask, "prompt": _prompt, "multitask_prompt": _multitask_prompt, "bottleneck": _bottleneck, "ternary": _ternary, "encoded": _encoded, "codebook": _codebook,
    "extensions": _extensions, "lycoris": _lycoris, "rotation": _rotation, "structured": _structured, "blocks": _blocks,
    "prompt_space": _prompt_space, "mixture": _mixture, "qscale": _qscale,
}
"""Example name -> builder; each is written as ``<name>/`` (folder form) and ``<name>.safetensors``."""


def example(name: str) -> Adapter:
    """Golden example ``name`` as an in-memory :class:`Adapter`."""
    method, config, modules, tensors = EXAMPLES[name]()
    extra: dict[str, Any] = {}
    provenance = [{"tool": "adapterfmt.format.golden", "example": name}]
    if name == "extensions":
        extra["extensions"] = {"example.note": {"text": "readers that do not know example.* ignore this"},
                               "acme.training": {"steps": 100, "lr": 0.0001}}
        provenance.insert(0, {"tool": "peft", "version": "0.21.2", "source": "hf://acme/q-proj-lora"})
    base = {"name": BASE_NAME, "revision": "1", "fingerprint": fingerprint_module(golden_base())}
    if name == "qscale":
        base["quantization"] = QSCALE_QUANT
    return Adapter(new_manifest(method, modules, config=config, base=base, provenance=provenance, **extra), tensors)


def write_examples(folder: str | Path, *, overwrite: bool = True) -> list[Path]:
    """Write every golden example in both forms into ``folder``; returns the paths written."""
    folder = Path(folder)
    out = []
    for name in EXAMPLES:
        adapter = example(name)
        out.append(save(adapter, folder / name, single_file=False, overwrite=overwrite))
        out.append(save(adapter, folder / f"{name}.safetensors", single_file=True, overwrite=overwrite))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Regenerate the golden example adapters of spec/examples/.")
    parser.add_argument("folder", type=Path, nargs="?", default=Path("spec/examples"))
    for p in write_examples(parser.parse_args().folder):
        print(p)


if __name__ == "__main__":
    main()
