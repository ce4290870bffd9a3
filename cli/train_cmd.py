"""``adapter train``: train an adapter of any method with a train verb, on Accelerate (one or many processes)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import typer

from .common import (
    CallbackBar,
    JsonOpt,
    OverwriteOpt,
    UsageError,
    cli_errors,
    console,
    hidden_alias,
    out_option,
    print_json,
    renamed,
)

LAUNCHED_ENV = "WORLD_SIZE"
"""Set by ``accelerate launch`` / ``torchrun`` in each process they start."""


def _read_config(path: Path | None) -> dict[str, Any] | None:
    """The method's config from a YAML or JSON file (a mapping)."""
    if path is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path} is not YAML or JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path} must hold a mapping of the method's options")
    return data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(ctx: typer.Context, processes: int, mixed_precision: str | None) -> int:
    """Run this same command under ``accelerate launch`` with ``processes`` processes; its exit code."""
    forward: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name == "processes" or value is None or value is False or not param.opts:
            continue
        forward += [param.opts[0]] if value is True else [param.opts[0], str(value)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", mixed_precision or "no", "--dynamo_backend", "no",
           "--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // processes)),
           "--main_process_port", str(_free_port()), "-m", "adapterfmt.cli.main", "train", *forward]
    return subprocess.run(cmd, check=False).returncode


class _Bar(CallbackBar):
    """The rich progress bar: steps, loss, tokens per second, time left; a line per eval loss (stderr)."""

    def __init__(self, quiet: bool) -> None:
        from rich.progress import TextColumn

        super().__init__("train", quiet, TextColumn("loss {task.fields[loss]}"),
                         TextColumn("{task.fields[speed]} tok/s"))
        self.quiet = quiet

    def __call__(self, report: Any) -> None:
        if report.eval_loss is not None and not self.quiet:
            self.progress.console.print(f"step {report.step}: eval loss {report.eval_loss:.4f}", highlight=False)
        self.update(report.step, report.max_steps, start=report.step - 1, loss=f"{report.loss:.4f}",
                    speed=f"{report.tokens / max(report.seconds, 1e-9):.0f}")


@cli_errors
def train(
    ctx: typer.Context,
    method: str = typer.Option(None, "--method", help="The method (`adapter plugins` lists them); needs a train "
                               "verb."),
    base: Path = typer.Option(None, "--base", help="A local transformers causal-LM folder (config.json, "
                              "safetensors, tokenizer); default: the demo's tiny model. --model is an alias."),
    model: Path = hidden_alias("--model"),
    data: Path = typer.Option(None, "--data", help="JSONL ('text', or 'prompt' + 'completion': loss on the "
                              "completion only; an optional 'task' names the record's expert for methods that "
                              "route, e.g. mixture), or a folder saved by `datasets` (needs it installed)."),
    out: Path = out_option("Where to write the adapter (.safetensors: one file; else a folder)."),
    config: Path = typer.Option(None, "--config", help="The method's options as YAML or JSON (its config schema; "
                                "unknown keys are refused; relative file paths in it are relative to its "
                                "folder)."),
    max_steps: int = typer.Option(None, "--max-steps", min=1, help="Optimizer steps (default 100)."),
    lr: float = typer.Option(None, "--lr", min=0.0, help="Peak learning rate (default 2e-4)."),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Examples per step over all processes "
                                   "(default 8)."),
    max_length: int = typer.Option(None, "--max-length", min=2, help="Tokens per example at most (default 512)."),
    warmup_steps: int = typer.Option(None, "--warmup-steps", min=0, help="Linear warmup steps (default 0)."),
    schedule: str = typer.Option(None, "--schedule", help="constant, linear or cosine decay (default linear)."),
    weight_decay: float = typer.Option(None, "--weight-decay", min=0.0, help="AdamW weight decay (default 0)."),
    max_grad_norm: float = typer.Option(None, "--max-grad-norm", min=0.0, help="Clip the gradient norm (0: no "
                                        "clipping) (default 1)."),
    seed: int = typer.Option(None, "--seed", help="Seed of the initialisation and the data order (default 0)."),
    mixed_precision: str = typer.Option(None, "--mixed-precision", help="no, fp16 or bf16 (default no)."),
    quantize: str = typer.Option(None, "--quantize", help="Load --base quantised by bitsandbytes and train over it "
                                 "(QLoRA): nf4 or fp4 (4-bit, double-quantised, computing in float32 or the "
                                 "--mixed-precision dtype) or int8 (LLM.int8()). A base folder saved quantised is "
                                 "detected from its config.json."),
    calibration_batches: int = typer.Option(None, "--calibration-batches", min=0, help="Batches handed to methods "
                                            "that choose what to train from gradients (default 8)."),
    eval_data: Path = typer.Option(None, "--eval", help="Held-out data (same formats): its loss at each checkpoint "
                                   "and at the end."),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", min=0, help="Write a resumable checkpoint every "
                                         "N steps (0: none)."),
    checkpoints: Path = typer.Option(None, "--checkpoints", help="Where checkpoints go (default OUT.checkpoints)."),
    resume: Path = typer.Option(None, "--resume", help="Continue from a checkpoint (a step-N folder, or the folder "
                                "of checkpoints: its latest); options not given are the recorded ones."),
    processes: int = typer.Option(None, "--processes", min=1, help="Start this many data-parallel processes "
                                  "(`accelerate launch`)."),
    cpu: bool = typer.Option(False, "--cpu", help="Train on the CPU even when a GPU is available."),
    fsdp: bool = typer.Option(False, "--fsdp", help="With several processes: shard the base's weights over them "
                              "(PyTorch FSDP2; the adapter stays whole and comes out the same). Refused for methods "
                              "with a training schedule (IST, DiffoRA, TriAdaptLoRA, SpIEL) and for "
                              "bitsandbytes bases; use it instead of `accelerate launch --use_fsdp` (refused)."),
    force: bool = typer.Option(False, "--force", help="With --resume: continue although an input (data, base, "
                               "tokenizer, a source adapter the config names) changed since the checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    overwrite: bool = OverwriteOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Train an adapter on a text dataset: any method with a train verb, on Hugging Face Accelerate (devices,
    mixed precision, data parallelism: `--processes N`, or run under `accelerate launch -m adapterfmt.cli.main
    train ...`), with resumable checkpoints; the adapter records the data's sha256, the steps and the options."""
    base = renamed(base, model, new="--base", old="--model", warn=False)
    from adapterfmt.verbs.trainer import PRECISIONS, QUANTIZE, SCHEDULES, TrainOptions, train_adapter

    for flag, value, allowed in (("--schedule", schedule, SCHEDULES),
                                 ("--mixed-precision", mixed_precision, PRECISIONS),
                                 ("--quantize", quantize, QUANTIZE)):
        if value is not None and value not in allowed:
            raise UsageError(f"{flag} {value!r} is not one of {', '.join(allowed)}")
    if processes is not None and processes > 1 and LAUNCHED_ENV not in os.environ:
        raise typer.Exit(_launch(ctx, processes, mixed_precision))
    if resume is None and (method is None or data is None or out is None):
        raise UsageError("give --method, --data and --out (or --resume a checkpoint)")

    opts = TrainOptions(method=method, data=data, out=out, base=base, config=_read_config(config),
                        config_dir=config.resolve().parent if config is not None else None,
                        max_steps=max_steps, lr=lr, batch_size=batch_size, max_length=max_length,
                        warmup_steps=warmup_steps, schedule=schedule, weight_decay=weight_decay,
                        max_grad_norm=max_grad_norm, seed=seed, mixed_precision=mixed_precision, quantize=quantize,
                        calibration_batches=calibration_batches, eval_data=eval_data,
                        checkpoint_every=checkpoint_every, checkpoints=checkpoints, resume=resume, cpu=cpu,
                        fsdp=fsdp, force=force, overwrite=overwrite)
    with _Bar(quiet or as_json) as bar:
        result = train_adapter(opts, progress=bar)
    if os.environ.get("RANK", "0") != "0":
        return
    if as_json:
        print_json({"out": str(result.out), "steps": result.steps, "loss": result.loss, "eval_loss": result.eval_loss,
                    "evals": [{"step": k, "loss": v} for k, v in result.evals], "tokens": result.tokens,
                    "seconds": result.seconds, "tokens_per_second": result.tokens_per_second,
                    "processes": result.processes, "resumed_from": result.resumed_from,
                    "checkpoints": [str(p) for p in result.checkpoints], "data_sha256": result.data_sha256})
        return
    resumed = f", resumed at step {result.resumed_from}" if result.resumed_from else ""
    evaluated = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    console.print(f"trained {result.steps} steps on {result.processes} process(es){resumed}: loss {result.loss:.4f}"
                  f"{evaluated}; {result.tokens} tokens, {result.tokens_per_second:.0f} tok/s", highlight=False)
    for path in result.checkpoints:
        console.print(f"checkpoint: {path}", highlight=False)
    console.print(f"adapter: {result.out}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
