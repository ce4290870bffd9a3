"""EFT / proxy-tuning study: does a small tuned LoRA steer a larger model to its task at decoding time, and
what does the steering cost the larger model's own skill as beta grows?

1. Two tiny Llamas (transformers ``LlamaConfig``), a small one (2 layers, hidden 32) and a large one (4 layers,
   hidden 64), each pretrained from scratch on skill S: after marker ``A``, every number is its predecessor
   + 1 (mod 32). Neither sees task T in pretraining.
2. Task T: after marker ``B``, every number is its predecessor + 5 (mod 32). A LoRA (r 8, all attention and
   MLP maps) is trained on the small model on T, with a share ``--mix`` of S rows in each batch (0: T only, so
   the tuned model may forget S); the same LoRA recipe on the large model is the upper bound
   (proxy-tuning's "directly tuned" model).
3. The large model steered at decoding time with :func:`af.eft_terms` / :class:`af.Composition`:
   scores log p_large + beta (log p_small+LoRA - log p_small), for beta in ``--betas``.

The metric is next-token accuracy (teacher-forced, numbers 3..12 of 200 held-out sequences per task), on T
(the task) and S (the large model's own skill). Gap closed = (steered - large) / (large tuned - large) on T,
the proxy-tuning paper's measure. Mean and sample standard deviation over the seeds (a seed drives both
pretrainings, the LoRA trainings and the data).

    python benchmarks/eft_study.py [--seeds 3] [--mix 0.25] [--betas 0 0.5 1 2 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import adapterfmt as af
from adapterfmt.plugin.registry import get_method

N, LENGTH = 32, 13
"""Numbers 0..31 and sequences of a marker + 12 numbers."""
WORDS = ["<unk>", "<s>", "</s>", "<pad>"] + [f"n{i}" for i in range(N)] + ["A", "B"]
MARK = {"S": WORDS.index("A"), "T": WORDS.index("B")}
STEP = {"S": 1, "T": 5}
VOCAB = 40
SIZES = {"small": (32, 2), "large": (64, 4)}
"""hidden size, layers."""
PRETRAIN = {"steps": 300, "lr": 3e-3, "batch": 32}
LORA = {"steps": 150, "lr": 1e-2, "batch": 32, "config": {"r": 8, "alpha": 16, "target_modules": [
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}}


def batch(task: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` sequences of ``task``: its marker, then numbers each STEP[task] above the previous (mod N)."""
    start = torch.randint(0, N, (n, 1), generator=gen)
    nums = (start + STEP[task] * torch.arange(LENGTH - 1)) % N + 4
    return torch.cat([torch.full((n, 1), MARK[task]), nums], 1)


def loss_of(model: torch.nn.Module, seq: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=seq[:, :-1]).logits[:, 1:]  # predict numbers 2.. (the first one is free)
    return F.cross_entropy(logits.reshape(-1, VOCAB), seq[:, 2:].reshape(-1))


def tokenizer() -> Any:
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def pretrained(size: str, seed: int, folder: Path) -> torch.nn.Module:
    """A model of ``size`` trained from scratch on S, saved with its tokenizer to ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers = SIZES[size]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=32, pad_token_id=3, bos_token_id=1,
                                         eos_token_id=2))
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"])
    gen = torch.Generator().manual_seed(100 + seed)
    for _ in range(PRETRAIN["steps"]):
        opt.zero_grad()
        loss_of(model, batch("S", PRETRAIN["batch"], gen)).backward()
        opt.step()
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return model


def tuned_lora(model: torch.nn.Module, seed: int, mix: float, out: Path) -> Path:
    """A LoRA trained on T (plus a share ``mix`` of S rows) on ``model`` (left unchanged), saved to ``out``."""
    torch.manual_seed(seed)
    session = get_method("lora").train(model, config=dict(LORA["config"]))
    opt = torch.optim.AdamW(session.parameters(), lr=LORA["lr"], weight_decay=0.0)
    gen = torch.Generator().manual_seed(200 + seed)
    for _ in range(LORA["steps"]):
        opt.zero_grad()
        n_s = round(mix * LORA["batch"])
        loss_of(model, torch.cat([batch("T", LORA["batch"] - n_s, gen), batch("S", n_s, gen)])).backward()
        opt.step()
    path = af.save(session.extract(), out)
    session.remove()
    return path


@torch.no_grad()
def accuracy(comp: af.Composition, task: str) -> float:
    """Teacher-forced next-token accuracy of the composition's argmax on held-out sequences of ``task``."""
    seq = batch(task, 200, torch.Generator().manual_seed(9999))
    hits = [comp.logits(seq[:, :n]).argmax(-1) == seq[:, n] for n in range(3, LENGTH)]
    return float(torch.stack(hits).float().mean())


def run(seed: int, betas: list[float], mix: float, root: Path) -> dict[str, float]:
    folders = {size: root / f"{size}-{seed}" for size in SIZES}
    models = {size: pretrained(size, seed, folders[size]) for size in SIZES}
    small_lora = tuned_lora(models["small"], seed, mix, root / f"small-lora-{seed}.safetensors")
    large_lora = tuned_lora(models["large"], seed, mix, root / f"large-lora-{seed}.safetensors")
    out: dict[str, float] = {}
    for name, term in {"small": af.Term(folders["small"]), "small + LoRA": af.Term(folders["small"],
                       adapter=small_lora), "large": af.Term(folders["large"]),
                       "large + LoRA": af.Term(folders["large"], adapter=large_lora)}.items():
        comp = af.Composition([term])
        out[f"{name} T"], out[f"{name} S"] = accuracy(comp, "T"), accuracy(comp, "S")
    steer = af.Composition(af.eft_terms(folders["large"], folders["small"], adapter=small_lora, beta=1.0))
    for b in betas:
        comp = steer.with_coefficients([1.0, b, -b])
        out[f"steered b={b:g} T"], out[f"steered b={b:g} S"] = accuracy(comp, "T"), accuracy(comp, "S")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--mix", type=float, default=0.25, help="share of S rows in the LoRA's training batches")
    ap.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    from transformers.utils import logging

    logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run(seed, args.betas, args.mix, Path(tmp)) for seed in range(args.seeds)]
    rows = list(runs[0])
    gap = [(r[f"steered b={1.0:g} T"] - r["large T"]) / max(r["large + LoRA T"] - r["large T"], 1e-9) for r in runs]
    summary = {k: (statistics.mean(r[k] for r in runs), statistics.stdev(r[k] for r in runs)) for k in rows}
    if args.json:
        print(json.dumps({"runs": runs, "gap_closed_beta_1": gap}, indent=1))
        return
    print("| model | task T accuracy | skill S accuracy |")
    print("|---|---|---|")
    for name in dict.fromkeys(k[:-2] for k in rows):
        t, s = summary[f"{name} T"], summary[f"{name} S"]
        print(f"| {name} | {t[0]:.3f} ± {t[1]:.3f} | {s[0]:.3f} ± {s[1]:.3f} |")
    print(f"\ngap closed on T at beta 1: {statistics.mean(gap):.2f} ± {statistics.stdev(gap):.2f}")
    print(f"{args.seeds} seeds, mix {args.mix:g}, {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
