"""Tiny models built from configs (no download) and a PEFT oracle harness for the conversion tests.

``case(model_name, peft_config)`` builds the base twice from one seed, gives every trainable PEFT
parameter random values (so nothing sits at its zero init), saves the PEFT adapter and returns what
the tests compare against: PEFT's own logits on fixed inputs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

VOCAB = 48


class Custom(nn.Module):
    """Embedding -> MLP -> Conv2d -> head: the custom-module case (nn.Embedding, nn.Linear, nn.Conv2d)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16))
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Linear(24, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        h = self.mlp(self.emb(ids)).view(b, t, 4, 4).permute(0, 2, 1, 3)
        h = self.conv(h).permute(0, 2, 1, 3).reshape(b, t, 24)
        return self.head(h)


def build(name: str, seed: int = 0) -> nn.Module:
    """A tiny fp32 model in eval mode: ``llama`` (``llama-bias``: with attention and MLP biases), ``gpt2``
    (Conv1D), ``bert`` (encoder classifier) or ``custom``."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name in ("llama", "llama-bias"):
            from transformers import LlamaConfig, LlamaForCausalLM

            bias = name == "llama-bias"
            model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                                                 max_position_embeddings=64, tie_word_embeddings=False,
                                                 attention_bias=bias, mlp_bias=bias))
        elif name == "gpt2":
            from transformers import GPT2Config, GPT2LMHeadModel

            model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=64,
                                               bos_token_id=0, eos_token_id=0))
        elif name == "bert":
            from transformers import BertConfig, BertForSequenceClassification

            model = BertForSequenceClassification(BertConfig(hidden_size=16, intermediate_size=32,
                                                             num_hidden_layers=2, num_attention_heads=2,
                                                             vocab_size=VOCAB, max_position_embeddings=64,
                                                             num_labels=3))
        elif name == "custom":
            model = Custom()
        else:
            raise ValueError(name)
    return model.float().eval()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def randomize(peft_model: nn.Module, seed: int = 1) -> None:
    """Give every trainable parameter of a PEFT model random values away from its init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=gen)
                if "magnitude" in name or "ia3_l" in name or "lora_E" in name:
                    p.copy_(p * (1 + 0.3 * noise) + 0.1 * noise)
                else:
                    p.copy_(0.3 * noise)


@dataclass
class Case:
    name: str
    base: nn.Module
    """A fresh base model (never touched by PEFT)."""
    folder: Path
    expected: torch.Tensor
    """PEFT's logits with the adapter active."""
    ids: torch.Tensor


def case(tmp: Path, model_name: str, config: object, seed: int = 0) -> Case:
    from peft import get_peft_model

    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(build(model_name, seed), copy.deepcopy(config))
        randomize(pm, seed + 1)
        pm.eval()
        expected = logits(pm, ids)
        folder = tmp / f"peft-{model_name}"
        pm.save_pretrained(folder)
    return Case(model_name, build(model_name, seed), folder, expected, ids)


def load_peft(model_name: str, folder: Path, seed: int = 0) -> tuple[nn.Module, list[str], list[str]]:
    """Load a PEFT folder onto a fresh base with PEFT; returns the model and the adapter keys PEFT
    reported missing and unexpected."""
    from peft import PeftConfig, PeftModel
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = PeftConfig.from_pretrained(folder)
        written = json.loads((folder / "adapter_config.json").read_text())
        stray = set(written) - {f.name for f in dataclasses.fields(type(config))}
        assert not stray, f"adapter_config.json keys {type(config).__name__} does not take: {sorted(stray)}"
        pm = PeftModel.from_pretrained(build(model_name, seed), folder, config=config)
        result = set_peft_model_state_dict(pm, load_file(folder / "adapter_model.safetensors"))
    # PEFT's own rule: adapter keys are those naming the adapter; the prompt encoder is not part of a checkpoint
    # (VeRA's per-layer vera_A / vera_B are views of the shared base_model.vera_A / vera_B)
    missing = [k for k in result.missing_keys if ".default" in k and "prompt_encoder" not in k
               and not k.endswith((".vera_A.default", ".vera_B.default"))]
    # a prompt's one tensor is loaded into the prompt encoder strictly (shape-checked), past load_state_dict
    unexpected = [k for k in result.unexpected_keys if not (config.is_prompt_learning and k == "prompt_embeddings")]
    return pm.eval(), missing, unexpected
