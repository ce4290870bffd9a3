"""``adapter compress``: resize / ComPEFT / quantize an adapter and report bytes and error."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer

import adapterfmt as af
from adapterfmt.format.atomic import check_output
from adapterfmt.plugin import registry

from .inspect_cmd import compression_text
from .common import (JsonOpt, OverwriteOpt, UsageError, cli_errors, console, deprecated, err_console, hidden_alias,
                     human_bytes, out_option, print_json, print_table, renamed, require)


def _steps(resize: dict[str, float | None], density: float | None, scope: str, scale: str, factor: float,
           group_size: int | None, target: str, bits: int | None, quant_group_size: int | None,
           steps: str | None, codec: str | None = None) -> list[dict[str, Any]]:
    if steps is not None:
        given = [name for name, v in (*resize.items(), ("density", density), ("bits", bits), ("codec", codec))
                 if v is not None]
        if given:
            raise UsageError(f"--steps replaces the step options; --{given[0].replace('_', '-')} was given too")
        text = Path(steps).read_text("utf-8") if Path(steps).is_file() else steps
        try:
            parsed = json.loads(text)
        except ValueError as e:
            raise UsageError(f"--steps is neither a JSON file nor JSON text: {e}") from None
        if not isinstance(parsed, list) or not all(isinstance(s, dict) for s in parsed):
            raise UsageError('--steps must be a JSON list of objects like {"method": "resize", "rank": 8}')
        return parsed
    out: list[dict[str, Any]] = []
    if any(v is not None for v in resize.values()):
        out.append({"method": "resize", **resize})
    if density is not None:
        out.append({"method": "compeft", "density": density, "scope": scope, "scale": scale, "factor": factor,
                    "group_size": group_size, "target": target})
    if bits is not None or codec is not None:
        out.append({"method": "quantize", "bits": bits, "group_size": quant_group_size,
                    **({"codec": codec} if codec else {})})
    if not out:
        raise UsageError("say how to compress: --rank / --energy / --sv-ratio / --sv-cumulative (resize), "
                         "--density (compeft), --bits (quantize) or --steps")
    return out


@cli_errors
def compress(
    src: str = typer.Argument(..., help="The adapter to compress (folder, .safetensors file or hf://...)."),
    dst: Path = typer.Argument(None, hidden=True, help="Where to write the result (same as --out)."),
    out: Path = out_option("Where to write the result: a folder, or a .safetensors file (also accepted as a "
                           "second argument: SRC DST)."),
    rank: int = typer.Option(None, "--rank", min=1, help="resize: the largest rank kept (SVD of each lowrank dW)."),
    energy: float = typer.Option(None, "--energy", min=0.0, max=1.0,
                                 help="resize: smallest rank keeping this fraction of each module's energy, "
                                      "sum s_i^2 / sum s^2 (its squared Frobenius norm; e.g. 0.99)."),
    sv_ratio: float = typer.Option(None, "--sv-ratio", help="resize: keep singular values >= s_max / this."),
    sv_fro: float = hidden_alias("--sv-fro"),
    sv_cumulative: float = typer.Option(None, "--sv-cumulative",
                                        help="resize: smallest rank keeping this fraction of sum(s)."),
    density: float = typer.Option(None, "--density", help="compeft: fraction of magnitudes kept (e.g. 0.1)."),
    scope: str = typer.Option("adapter", "--scope", help="compeft: top-k and scale over the whole 'adapter' "
                                                         "(ComPEFT) or per 'tensor'."),
    scale: str = typer.Option("std", "--scale", help="compeft: 'std' (ComPEFT: alpha x std of the update) or "
                                                     "'stc' (STC baseline: mean kept magnitude; alias 'mean')."),
    factor: float = typer.Option(1.0, "--factor", help="compeft: ComPEFT's alpha in scale = alpha * std."),
    group_size: int = typer.Option(None, "--group-size", min=1, help="compeft: one scale per this many elements."),
    target: str = typer.Option("params", "--target", help="compeft: 'params' (each stored factor) or 'delta' "
                                                          "(each module's dW, stored as a ternary delta)."),
    bits: int = typer.Option(None, "--bits", help="quantize: 8 (int8 per channel) or 4 (int4, group scales)."),
    quant_group_size: int = typer.Option(None, "--quant-group-size", min=1,
                                         help="quantize: int4 group, or nf4 / fp4 block (64)."),
    codec: str = typer.Option(None, "--codec", help="quantize: the codec, int8 or int4 (what --bits 8 / 4 pick), "
                                                    "nf4 (QLoRA's NormalFloat4) or fp4."),
    steps: str = typer.Option(None, "--steps", help='Steps as JSON (file or text), in order, instead of the '
                                                    'options above: [{"method": "resize", "rank": 8}, ...].'),
    base: Path = typer.Option(None, "--base", help="Base model folder: also report the output divergence on it."),
    modules: bool = typer.Option(False, "--modules", help="List every module's error, not just the worst 10."),
    overwrite: bool = OverwriteOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Make an adapter smaller; print bytes on disk before and after and the dW error per module.

    Steps run in the order resize, compeft, quantize (or as given with --steps). The relative error is
    ||dW' - dW|| / ||dW|| per module; with --base, the outputs of the base model with the original and
    the compressed adapter are compared on random token ids.
    """
    from adapterfmt.verbs.summary import file_bytes

    dst = require(renamed(out, dst, new="--out", old="DST", warn=False), "say where to write the result: --out")
    if sv_fro is not None:  # kohya's threshold on the (unsquared) Frobenius norm: --energy x^2 keeps the same rank
        deprecated("--sv-fro", "--energy", f"--sv-fro {sv_fro} keeps the rank --energy {sv_fro ** 2:.6g} keeps "
                   "(energy is the squared-norm fraction)")
    resize = {"rank": rank, "energy": energy, "sv_ratio": sv_ratio, "sv_fro": sv_fro, "sv_cumulative": sv_cumulative}
    plan = _steps({k: v for k, v in resize.items() if v is not None}, density, scope, scale, factor, group_size,
                  target, bits, quant_group_size, steps, codec)
    check_output(dst, overwrite)
    adapter = af.load(src)
    verb = registry.verb(adapter.method, "compress") if adapter.method in registry.methods() else af.compress_adapter
    small = verb(adapter, steps=plan, base=base)
    af.save(small, dst, overwrite=overwrite)
    record = small.manifest["compression"]
    before, after = file_bytes(adapter), file_bytes(af.load(dst))
    report = {"src": str(src), "dst": str(dst), **record, "bytes_before": before, "bytes_after": after,
              "ratio": before / after if before and after else None}
    for note in record.get("notes", []):
        err_console.print(f"note: {note}", highlight=False)
    if as_json:
        print_json(report)
        return
    errs = sorted(record["module_errors"].items(), key=lambda kv: -(kv[1] if kv[1] is not None else float("inf")))
    shown = errs if modules else errs[:10]
    rows = []
    for path, err in shown:
        entry = small.modules[path]
        enc = ", ".join(f"{r}:{s['codec']}" for r, s in sorted(entry.get("encoding", {}).items())) or "plain"
        rows.append((path, entry["kind"], enc, _num(err)))
    print_table(("module", "kind", "stored as", "dW rel. error"), rows, f"compressed {src} -> {dst}")
    if len(errs) > len(shown):
        console.print(f"({len(errs) - len(shown)} more modules; --modules lists all)")
    console.print(f"steps: {compression_text(record).split(';')[0]}", highlight=False)
    console.print(f"on disk: {before:,} B ({human_bytes(before or 0)}) -> {after:,} B ({human_bytes(after)}), "
                  f"ratio [bold]{report['ratio']:.2f}x[/]", highlight=False)
    console.print(f"dW relative error: max {_num(record['dW_rel_error_max'])}, "
                  f"mean {_num(record['dW_rel_error_mean'])}", highlight=False)
    worst: dict[str, float] = {}  # stacked pairs (a mixture's experts), by name, over the modules
    for path, errs_ in record.get("expert_errors", {}).items():
        names = small.modules[path].get("params", {}).get("experts") or [str(i) for i in range(len(errs_))]
        for name, e in zip(names, errs_, strict=True):
            worst[name] = max(worst.get(name, 0.0), math.inf if e is None else e)
    if worst:
        console.print("per expert (worst module): " + ", ".join(f"{n} {_num(e if math.isfinite(e) else None)}"
                                                                for n, e in worst.items()), highlight=False)
    if "output" in record:
        o = record["output"]
        extra = f", KL {_num(o['kl'])}, top-1 agreement {o['top1_agreement']:.3f}" if "kl" in o else ""
        console.print(f"output divergence on {base}: rel. error {_num(o['rel_error'])}, "
                      f"max |dy| {_num(o['max_abs'])}" + extra, highlight=False)


def _num(x: float | None) -> str:
    return "unbounded" if x is None else f"{x:.3e}"


def register(app: typer.Typer) -> None:
    app.command("compress")(compress)
