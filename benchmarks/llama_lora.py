"""Shared by the merge and bake benchmarks: a random Llama checkpoint of a chosen size, built from a config
(no download), and random r=16 all-linear PEFT LoRAs for it, saved by PEFT and converted by adapterfmt."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

HIDDEN, INTERMEDIATE, VOCAB = 1024, 2816, 32000


def llama(layers: int, vocab: int = VOCAB, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=16, vocab_size=vocab,
                      max_position_embeddings=512, tie_word_embeddings=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM(cfg).float().eval()


def save_checkpoint(model: torch.nn.Module, folder: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 512}')
    return folder


def lora(model: torch.nn.Module, folder: Path, seed: int, r: int = 16) -> torch.nn.Module:
    """Wrap ``model`` in a PEFT LoRA (r, alpha = r: scale 1) with random non-zero B; save it to ``folder``."""
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters()):
            if "lora_B" in name:
                p.copy_(0.01 * torch.randn(p.shape, generator=gen))
            elif "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(folder)
    return pm


def largest_tensor_bytes(folder: Path) -> int:
    from adapterfmt.format.fingerprint import read_checkpoint_headers

    return max(t.end - t.start for h in read_checkpoint_headers(folder) for t in h.tensors.values())


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
