"""``adapter train --quantize`` (QLoRA from the command line): a LoRA trained over a transformers base loaded by
bitsandbytes (nf4 / fp4 / int8) resumes exactly from a checkpoint, attached to the same quantised base gives the
training run's logits, records the quantised base (fingerprint, provenance); a folder saved quantised trains as
saved; what cannot sit on a quantised module is refused in one line."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from helpers_methods import one_thread  # noqa: F401 (fixture)
from helpers_spec import invoke
from torch import nn

import adapterfmt as af
from adapterfmt.format.fingerprint import fingerprint_checkpoint, fingerprint_module
from adapterfmt.verbs.trainer import Run, TrainOptions

pytestmark = pytest.mark.usefixtures("one_thread")
TARGETS = ["q_proj", "v_proj", "down_proj"]
LORA = {"target_modules": TARGETS, "r": 4, "alpha": 8}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama folder (linear layers with multiples of 32 outputs, as bitsandbytes' CPU kernels need), data
    and configs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("qlora")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=128, max_position_embeddings=64,
                                 tie_word_embeddings=False)).save_pretrained(tmp / "fp")
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran"]
    with open(tmp / "data.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"text": " ".join(words[(i * k) % 8] for k in range(3 + i % 5))}) + "\n")
    (tmp / "lora.yaml").write_text(json.dumps(LORA))
    (tmp / "ia3.yaml").write_text(json.dumps({"target_modules": ["down_proj"]}))
    return tmp


def quantized(folder: Path, kind: str | None) -> nn.Module:
    """``folder`` loaded by transformers through bitsandbytes as ``--quantize kind`` loads it (None: as saved)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = {"int8": BitsAndBytesConfig(load_in_8bit=True), None: None}.get(kind) or BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu",
                                                    **({"quantization_config": cfg} if kind else {}))


def tensors(path: Path) -> dict[str, torch.Tensor]:
    a = af.load(path)
    return {n: a.tensor(n) for n in a.tensors()}


def train(setup: Path, out: str, *args: object):
    return invoke("train", "--data", str(setup / "data.jsonl"), "--out", str(setup / out), "--max-steps", "4",
                  "--batch-size", "3", "--lr", "1e-2", "--cpu", "-q", *map(str, args))


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_qlora_resumes_exactly_and_the_adapter_gives_the_runs_logits(setup, kind):
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    opts = TrainOptions(method="lora", data=setup / "data.jsonl", out=setup / f"{kind}.safetensors", base=setup / "fp",
                        config=LORA, max_steps=4, batch_size=3, lr=1e-2, quantize=kind, checkpoint_every=2, cpu=True,
                        eval_data=setup / "data.jsonl")  # an eval-mode forward at the checkpoint
    run = Run(opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.prepare()
        run.loop()
    assert type(run.model.model.layers[0].self_attn.q_proj).__name__ == ("Linear8bitLt" if kind == "int8"
                                                                         else "Linear4bit")
    with torch.no_grad():
        expected = run.model(ids).logits

    resumed = train(setup, f"{kind}-resumed.safetensors", "--resume", setup / f"{kind}.safetensors.checkpoints" /
                    "step-00000002")
    assert resumed.exit_code == 0, resumed.stderr
    final, again = tensors(setup / f"{kind}.safetensors"), tensors(setup / f"{kind}-resumed.safetensors")
    assert sorted(final) == sorted(again) and all(torch.equal(final[k], again[k]) for k in final)
    assert all(t.abs().max() > 0 for k, t in final.items() if k.endswith("lora_B"))  # it trained

    adapter = af.load(setup / f"{kind}.safetensors")
    fresh = quantized(setup / "fp", kind).train()  # train mode: bitsandbytes' CPU eval path rounds scales to bf16
    fingerprint = fingerprint_module(fresh)
    with torch.no_grad():
        plain = fresh(ids).logits
    af.attach(fresh, adapter)
    with torch.no_grad():
        got = fresh(ids).logits
    assert torch.equal(got, expected) and (got - plain).abs().max() > 1e-3
    prov = adapter.manifest["provenance"][-1]
    assert prov["options"]["quantize"] == kind and prov["base_quantization"]["format"] == kind
    assert prov["base_quantization"]["library"] == "bitsandbytes"
    fresh.save_pretrained(setup / f"saved-{kind}")  # the quantised base as transformers saves it: same fingerprint
    assert adapter.manifest["base"]["fingerprint"] == fingerprint == fingerprint_checkpoint(setup / f"saved-{kind}")
    assert adapter.manifest["base"]["fingerprint"] != fingerprint_checkpoint(setup / "fp")


def test_a_folder_saved_quantised_trains_as_saved(setup):
    """A base transformers saved in nf4 trains, with a note, to the adapter ``--quantize nf4`` gives on the
    full-precision folder (the same codes); ``--quantize`` naming another format is refused."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized(setup / "fp", "nf4").save_pretrained(setup / "q4")
    cfg = ("--method", "lora", "--config", setup / "lora.yaml")
    saved = train(setup, "saved.safetensors", "--base", setup / "q4", *cfg)
    assert saved.exit_code == 0, saved.stderr
    assert "saved quantised by bitsandbytes (nf4, config.json quantization_config)" in saved.stderr
    given = train(setup, "given.safetensors", "--base", setup / "fp", "--quantize", "nf4", *cfg)
    assert given.exit_code == 0, given.stderr
    a, b = tensors(setup / "saved.safetensors"), tensors(setup / "given.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert af.load(setup / "saved.safetensors").manifest["provenance"][-1]["base_quantization"]["format"] == "nf4"
    r = train(setup, "x.safetensors", "--base", setup / "q4", "--quantize", "int8", *cfg)
    assert r.exit_code == 1 and "saved quantised as nf4, not int8" in r.stderr, r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] == r.stderr.strip().splitlines()[-1:]


@pytest.mark.parametrize(("args", "code", "message"), [
    (("--base", "fp", "--quantize", "nf4", "--method", "ia3", "--config", "ia3.yaml"), 1,
     "holds its weight quantised; kind 'vector'"),
    (("--base", "fp", "--quantize", "int8", "--method", "dora", "--config", "lora.yaml"), 1,
     "DoRA on a bitsandbytes Linear8bitLt: its int8 product also quantises the input"),
    (("--quantize", "nf4", "--method", "lora", "--config", "lora.yaml"), 1,
     "--quantize nf4 loads a transformers base through bitsandbytes; the tiny model is not one"),
    (("--base", "fp", "--quantize", "q3", "--method", "lora", "--config", "lora.yaml"), 2,
     "--quantize 'q3' is not one of nf4, fp4, int8"),
    (("--base", "fp", "--quantize", "nf4", "--method", "lora", "--config", "lora.yaml", "--fsdp"), 1,
     "--fsdp shards float weights; a base quantised by bitsandbytes (nf4) is not sharded"),
])
def test_refusals_are_one_line(setup, args, code, message):
    args = tuple(setup / a if a in ("fp", "ia3.yaml", "lora.yaml") else a for a in args)
    r = train(setup, "refused.safetensors", *args)
    assert r.exit_code == code and message in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith(("error:", "usage error:"))]
    assert len(errors) == 1 and message in errors[0]
    assert not (setup / "refused.safetensors").exists()
