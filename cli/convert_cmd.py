"""``adapter convert``: between adapterfmt and foreign formats (PEFT, and formats plugins add)."""

from __future__ import annotations

from pathlib import Path

import typer

import adapterfmt as af

from .common import (JsonOpt, OverwriteOpt, cli_errors, console, err_console, out_option, print_json, renamed,
                     require)


@cli_errors
def convert(
    src: str = typer.Argument(..., help="The adapter to convert (format detected: adapterfmt, PEFT folder, ...; "
                              "an adapterfmt adapter also as hf://owner/name\\[@revision]\\[/subfolder])."),
    dst: Path = typer.Argument(None, hidden=True, help="Where to write the result (same as --out)."),
    out: Path = out_option("Where to write the result (also accepted as a second argument: SRC DST)."),
    to: str = typer.Option(None, "--to", help="Target format: adapterfmt (default for a foreign source), peft, "
                           "kohya, diffusers, mlx, gguf, torchtune, or a plugin's format (see `adapter plugins`)."),
    single_file: bool = typer.Option(None, "--single-file/--folder", help="adapterfmt output as one .safetensors "
                                     "file or a folder (default: by DST's suffix)."),
    base: Path = typer.Option(None, "--base", help="Base checkpoint (.safetensors file or folder): shapes a foreign "
                              "file lacks (IA3, prompt tuning, trainable tokens), module names for kohya's "
                              "underscored keys, head counts (config.json) and the base fingerprint."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read a PEFT adapter_model.bin or torchtune "
                                      "adapter_model.pt (pickle) with torch.load(weights_only=True)."),
    n_heads: int = typer.Option(None, "--n-heads", help="Attention heads (GGUF llama / torchtune reorder q/k rows "
                                "for RoPE); default: from the base's config.json."),
    n_kv_heads: int = typer.Option(None, "--n-kv-heads", help="Key/value heads (default: --n-heads)."),
    arch: str = typer.Option(None, "--arch", help="llama.cpp architecture for --to gguf (llama, qwen2, qwen3); "
                             "default: the source GGUF's, else from the base's config.json model_type."),
    task_id: int = typer.Option(None, "--task-id", min=0, help="PEFT Poly: the task whose LoRA to read (Poly "
                                "mixes its skills per task); PEFT multitask prompt tuning: the task applied "
                                "(every task is kept)."),
    overwrite: bool = OverwriteOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Convert an adapter, checking that nothing that changes its function is lost.

    PEFT folder -> adapterfmt: `adapter convert peft_dir -o out.safetensors`; back: `--to peft`. A config
    field or tensor that cannot be represented is an error naming it; nothing is written then.
    """
    dst = require(renamed(out, dst, new="--out", old="DST", warn=False), "say where to write the result: --out")
    options = {"base": base} if base is not None else {}
    if allow_pickle:
        options["allow_pickle"] = True
    options.update({k: v for k, v in (("n_heads", n_heads), ("n_kv_heads", n_kv_heads), ("arch", arch),
                                                ("task_id", task_id))
                    if v is not None})
    report = af.convert(src, dst, to, overwrite=overwrite, single_file=single_file, **options)
    for note in report.notes:
        err_console.print(f"note: {note}", highlight=False, soft_wrap=True)
    if as_json:
        print_json(report.as_dict())
        return
    console.print(f"converted {report.source_format} -> {report.target_format}: {src} -> {dst}", highlight=False)
    console.print(f"method {report.method}, {report.modules} module(s), {report.tensors} tensor(s)")


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
