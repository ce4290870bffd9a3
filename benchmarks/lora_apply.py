"""Applying LoRA adapters on CPU, against PEFT measured in the same run.

A Llama-shaped model of about 220M parameters (fp32, hidden 1024, 12 layers), LoRA r=16 on all linear
layers, batch 8 x 128. Measures, each as the best of ``--repeats`` runs, interleaved between the two
libraries so load on a shared machine hits both alike:

(a) load + attach time of one adapter onto a live model (PEFT: ``PeftModel.from_pretrained``);
(b) unmerged forward time over the base forward time;
(c) a mixed batch of 4 adapters (rows spread over the adapters and the bare base) over a single-adapter
    forward of the same batch (PEFT: ``adapter_names=``).

Targets: (a) at most half of PEFT's; (b) no more overhead than PEFT's; (c) at most 1.05x.
Run: ``python benchmarks/lora_apply.py`` (``--small`` for a quick check of the script itself).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import adapterfmt as af

ROWS = ["a0", "a1", None, "a2", "a3", "a0", None, "a1"]


def build(small: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    if small:
        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4)
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                          num_attention_heads=16, num_key_value_heads=16)
    return LlamaForCausalLM(cfg).eval()


def make_peft_adapters(base: LlamaForCausalLM, root: Path, n: int) -> list[Path]:
    """``n`` PEFT LoRA folders (r=16, all-linear, random B) and their adapterfmt conversions."""
    out = []
    for i in range(n):
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        pm.save_pretrained(root / f"peft{i}")
        af.save(af.read_foreign(root / f"peft{i}", "peft"), root / f"af{i}.safetensors")
        out.append(root / f"peft{i}")
        del pm
    return out


def best(fn: Callable[[], object], times: list[float]) -> None:
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="a tiny model, to check the script quickly")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    ours_model = build(args.small)
    peft_base = copy.deepcopy(ours_model)
    n_params = sum(p.numel() for p in ours_model.parameters())
    ids = torch.randint(0, ours_model.config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_peft_adapters(ours_model, root, 4)
        t: dict[str, list[float]] = {k: [] for k in ("load_ours", "load_peft", "base", "fwd_ours", "fwd_peft",
                                                     "single_ours", "mixed_ours", "single_peft", "mixed_peft")}
        # (a) load + attach, interleaved
        peft_model = None
        for _ in range(args.repeats):
            best(lambda: af.attach(ours_model, af.load(root / "af0.safetensors"), name="a0"), t["load_ours"])
            af.detach(ours_model)
            if peft_model is not None:
                peft_base = peft_model.unload()
            holder: list[PeftModel] = []
            best(lambda: holder.append(PeftModel.from_pretrained(peft_base, root / "peft0", adapter_name="a0")),
                 t["load_peft"])
            peft_model = holder[0].eval()
        # (b) unmerged forward over base
        af.attach(ours_model, af.load(root / "af0.safetensors"), name="a0", activate=False)
        for _ in range(args.repeats):
            af.activate(ours_model, None)
            best(lambda: ours_model(ids), t["base"])
            af.activate(ours_model, "a0")
            best(lambda: ours_model(ids), t["fwd_ours"])
            best(lambda: peft_model(input_ids=ids), t["fwd_peft"])
        # (c) mixed batch of 4 adapters and the base over one adapter on the same batch
        for i in range(1, 4):
            af.attach(ours_model, af.load(root / f"af{i}.safetensors"), name=f"a{i}", activate=False)
            peft_model.load_adapter(root / f"peft{i}", adapter_name=f"a{i}")
        peft_rows = [r or "__base__" for r in ROWS]
        for _ in range(args.repeats):
            best(lambda: ours_model(ids), t["single_ours"])
            with af.adapter_ids(ours_model, ROWS):
                best(lambda: ours_model(ids), t["mixed_ours"])
            best(lambda: peft_model(input_ids=ids), t["single_peft"])
            best(lambda: peft_model(input_ids=ids, adapter_names=peft_rows), t["mixed_peft"])
        with af.adapter_ids(ours_model, ROWS):
            agree = (ours_model(ids).logits - peft_model(input_ids=ids, adapter_names=peft_rows).logits).abs().max()
    m = {k: min(v) for k, v in t.items()}
    print(f"model: Llama-shaped, {n_params / 1e6:.0f}M parameters, fp32; LoRA r=16 all-linear; batch 8x128; "
          f"torch threads {torch.get_num_threads()}")
    print(f"(a) load + attach: adapterfmt {m['load_ours'] * 1e3:.1f} ms, PEFT {m['load_peft'] * 1e3:.1f} ms, "
          f"ratio {m['load_ours'] / m['load_peft']:.3f} (target <= 0.5)")
    print(f"(b) base forward {m['base']:.3f} s; unmerged/base: adapterfmt {m['fwd_ours'] / m['base']:.3f}, "
          f"PEFT {m['fwd_peft'] / m['base']:.3f} (target: adapterfmt <= PEFT)")
    print(f"(c) mixed 4 adapters + base / single adapter: adapterfmt {m['mixed_ours'] / m['single_ours']:.3f} "
          f"({m['mixed_ours']:.3f} s / {m['single_ours']:.3f} s), PEFT {m['mixed_peft'] / m['single_peft']:.3f} "
          f"({m['mixed_peft']:.3f} s / {m['single_peft']:.3f} s) (target: adapterfmt <= 1.05); "
          f"mixed-batch logits vs PEFT: max |diff| {float(agree):.2e}")


if __name__ == "__main__":
    main()
