"""``adapter train`` against PEFT + transformers' Trainer: step time and peak memory, same model, method, batch.

Both train LoRA r=16 (alpha 16, no dropout) on every linear layer but the head of the same random Llama
checkpoint (built from a config, no download; the shape is printed), on the same token sequences (random
ASCII text, one token per byte: ``adapter train``'s byte-level tokenizer, and the same ids handed to the
Trainer), batch 4 x 128 tokens, AdamW lr 2e-4, linear decay, gradient clipping at 1.0, fp32, CPU. Each side
runs in its own process (so peak RSS is its own: model load, imports and training), alternately, ``--repeats``
times; the step time is the median over the steps after ``--warmup``, and the ratios are formed in the same run.

    python benchmarks/train.py                 # ~95M-parameter Llama (10 layers, hidden 768), 2 x (2 + 6) steps each
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

SEQ, BATCH, R, LR = 128, 4, 16, 2e-4


def build(folder: Path, layers: int, hidden: int, intermediate: int, vocab: int, examples: int) -> dict[str, object]:
    """The Llama checkpoint folder (no tokenizer files) and ``data.jsonl``; returns the shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=vocab,
                      max_position_embeddings=2 * SEQ, tie_word_embeddings=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM(cfg)
        model.save_pretrained(folder / "base")
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz      .,"
    with open(folder / "data.jsonl", "w") as f:
        for _ in range(examples):
            f.write(json.dumps({"text": "".join(rng.choice(letters) for _ in range(SEQ))}) + "\n")
    return {"layers": layers, "hidden": hidden, "intermediate": intermediate, "vocab": vocab,
            "parameters": sum(p.numel() for p in model.parameters())}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_adapterfmt(folder: Path, steps: int) -> dict[str, object]:
    from adapterfmt.verbs.trainer import TrainOptions, train_adapter

    marks: list[float] = []
    losses: list[float] = []
    opts = TrainOptions(method="lora", base=folder / "base", data=folder / "data.jsonl", out=folder / "a.safetensors",
                        config={"target_modules": "all-linear", "r": R, "alpha": R}, max_steps=steps, lr=LR,
                        batch_size=BATCH, max_length=SEQ, overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train_adapter(opts, progress=lambda r: (marks.append(time.perf_counter()), losses.append(r.loss)))
    import adapterfmt as af

    trainable = sum(t.numel() for t in af.load(result.out).tensors().values())
    return {"marks": marks, "trainable": trainable, "loss": statistics.mean(losses)}


def run_trainer(folder: Path, steps: int) -> dict[str, object]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    texts = [json.loads(line)["text"] for line in (folder / "data.jsonl").read_text().splitlines()]
    data = [{"input_ids": torch.tensor(list(t.encode())), "labels": torch.tensor(list(t.encode()))} for t in texts]
    marks: list[float] = []

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
            marks.append(time.perf_counter())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(folder / "base")
        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=R, lora_dropout=0.0, target_modules="all-linear"))
        args = TrainingArguments(output_dir=str(folder / "trainer"), per_device_train_batch_size=BATCH,
                                 max_steps=steps, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0,
                                 weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", logging_strategy="no",
                                 save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                                 disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Marks()])
        out = trainer.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"marks": marks, "trainable": trainable, "loss": out.training_loss}


def worker(which: str, folder: Path, steps: int) -> None:
    result = (run_adapterfmt if which == "adapterfmt" else run_trainer)(folder, steps)
    print(json.dumps({**result, "peak_rss_mib": peak_rss_mib()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--steps", type=int, default=6, help="measured steps per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker", choices=["adapterfmt", "trainer"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    total = args.warmup + args.steps
    if args.worker:
        worker(args.worker, args.folder, total)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shape = build(folder, args.layers, args.hidden, args.intermediate, args.vocab, examples=BATCH * total)
        print(f"Llama {shape}; LoRA r={R} all-linear; batch {BATCH} x {SEQ} tokens; {args.warmup} warmup + "
              f"{args.steps} measured steps; torch threads {torch.get_num_threads()}")
        runs: dict[str, list[dict]] = {"adapterfmt": [], "trainer": []}
        for _ in range(args.repeats):
            for which in runs:
                out = subprocess.run([sys.executable, __file__, "--worker", which, "--folder", str(folder),
                                      "--steps", str(args.steps), "--warmup", str(args.warmup)],
                                     capture_output=True, text=True, check=True)
                runs[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
        summary = {}
        for which, rs in runs.items():
            steps = [b - a for r in rs for a, b in zip(r["marks"][args.warmup - 1:], r["marks"][args.warmup:])]
            summary[which] = {"step_s": statistics.median(steps), "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                              "trainable": rs[0]["trainable"], "loss": rs[0]["loss"]}
            print(f"{which:10s}  step {summary[which]['step_s']:.3f} s (median of {len(steps)})  peak RSS "
                  f"{summary[which]['peak_rss_mib']:.0f} MiB  trainable {summary[which]['trainable']:,}  "
                  f"mean training loss {summary[which]['loss']:.4f}")
        a, t = summary["adapterfmt"], summary["trainer"]
        print(f"ratio adapter train / Trainer: step time {a['step_s'] / t['step_s']:.2f}x, peak memory "
              f"{a['peak_rss_mib'] / t['peak_rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
