"""``adapter merge``: combine adapters in delta space, or bake them into a base checkpoint."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import typer

import adapterfmt as af
from adapterfmt.format.atomic import check_output
from adapterfmt.plugin import registry

from .common import (JsonOpt, OverwriteOpt, UsageError, cli_errors, console, err_console, hidden_alias, human_bytes,
                     out_option, print_json, print_table, progress, renamed, require)

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--weights must be comma-separated numbers, got {text!r}") from None


def _gates(text: str) -> dict[str, float]:
    out = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--gates must be name=weight pairs separated by commas, got {text!r}") from None
    return out


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in UNITS:
        raise UsageError(f"--shard-size must be a size like 5GB or 500MiB, got {text!r}")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


@cli_errors
def merge(
    adapters: list[str] = typer.Argument(None, help="Adapters to combine (folders, .safetensors files, hf://...)."),
    out: Path = out_option("Output: an adapter, or with --base a checkpoint folder (or one .safetensors file)."),
    weights: str = typer.Option(None, "--weights", help="Comma-separated weights, one per adapter (negative "
                                "allowed: task arithmetic). Default 1 each. Write --weights=-1,1 for a "
                                "leading minus."),
    strategy: str = typer.Option(None, "--strategy", help="One of linear, cat, svd, ties, dare_linear, dare_ties, "
                                 "magnitude_prune (dare = dare_linear). Default linear."),
    rank: int = typer.Option(None, "--rank", min=1, help="Re-factor to this rank by SVD (svd: default the "
                             "largest input rank; with --energy: the cap)."),
    energy: float = typer.Option(None, "--energy", min=0.0, max=1.0, help="Re-factor to the smallest rank keeping "
                                 "this fraction of each module's energy, sum s_i^2 / sum s^2 (its squared Frobenius "
                                 "norm; e.g. 0.99)."),
    density: float = typer.Option(None, "--density", help="ties / dare / magnitude_prune: fraction of entries kept."),
    seed: int = typer.Option(None, "--seed", help="dare: seed of the drop masks (default 0)."),
    sign: str = typer.Option(None, "--sign", help="ties: sign election by 'total' (default) or 'frequency'."),
    dtype: str = typer.Option(None, "--dtype", help="Stored dtype of a merged adapter (F32, BF16, F16)."),
    gates: str = typer.Option(None, "--gates", help="Collapse one mixture adapter to a LoRA with these fixed gate "
                              "weights: name=w,... per expert (experts left out weigh 0)."),
    recipe: Path = typer.Option(None, "--recipe", help="YAML/JSON recipe with the inputs, weights and options "
                                "(command-line options win)."),
    base: Path = typer.Option(None, "--base", help="Bake into this base checkpoint (safetensors folder or file), "
                              "streaming tensor by tensor, instead of writing an adapter."),
    into: Path = hidden_alias("--into"),
    shard_size: str = typer.Option(None, "--shard-size", help="With --base: re-shard the output (e.g. 5GB); "
                                   "default: the base's layout."),
    force: bool = typer.Option(False, "--force", help="Merge inputs made for different bases / bake into a "
                               "checkpoint whose fingerprint differs or that lacks some modules."),
    overwrite: bool = OverwriteOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Combine adapters exactly in delta space (each module's dW), or bake them into a checkpoint.

    Examples: `adapter merge a b --strategy svd --rank 16 --out ab`;
    `adapter merge a b --weights 0.5,0.5 --base base-model --out merged-model`.
    """
    from adapterfmt.verbs.bake import bake
    from adapterfmt.verbs.recipe import Recipe, load_recipe

    base = renamed(base, into, new="--base", old="--into")
    r = load_recipe(recipe) if recipe else Recipe(adapters=[], weights=[])
    paths = list(adapters or []) or r.adapters
    if not paths:
        raise UsageError("name the adapters to merge (or give --recipe)")
    w = _floats(weights) if weights is not None else (r.weights if not adapters else None)
    cli = {"strategy": strategy, "rank": rank, "energy": energy, "density": density, "seed": seed, "sign": sign,
           "dtype": dtype}
    options = {**r.options, **{k: v for k, v in cli.items() if v is not None}}
    out = require(out or r.out, "say where to write the result: --out (or out: in the recipe)")
    base = base or r.into
    force = force or r.force
    if base is None and shard_size is not None:
        raise UsageError("--shard-size applies to a bake (--base); a merged adapter is one file or folder")
    if base is not None and gates is not None:
        raise UsageError("--gates collapses a mixture into an adapter; a bake cannot take a mixture")
    if base is not None and "dtype" in options:
        raise UsageError("--dtype applies to merged adapters; a bake keeps the checkpoint's dtypes")
    check_output(out, overwrite)
    if base is not None:
        size = _size(shard_size) if shard_size else r.shard_size
        report = bake(paths, base, out, weights=w, force=force, overwrite=overwrite, shard_size=size,
                      progress=lambda items, total: progress(items, "baking", total, quiet=as_json), **options)
        _print_bake(report.as_dict(), as_json)
        return
    loaded = [af.load(p) for p in paths]
    methods = {a.method for a in loaded}
    if gates is not None:
        if methods != {"mixture"}:
            raise UsageError("--gates collapses a mixture adapter (method mixture); the inputs are "
                             + ", ".join(sorted(methods)))
        options["gates"] = _gates(gates)
    one = next(iter(methods))
    verb = registry.verb(one, "merge") if len(methods) == 1 and one in registry.methods() else af.merge_adapters
    strategy_ = options.pop("strategy", "linear")
    merged = verb(loaded, weights=w, strategy=strategy_, force=force, **options)
    af.save(merged, out, overwrite=overwrite)
    _print_merge(merged, out, strategy_, as_json)


def _print_merge(merged: af.Adapter, out: Path, strategy: str, as_json: bool) -> None:
    kinds = Counter(e["kind"] for e in merged.modules.values())
    ranks = sorted({merged.shape(f"{m}.lora_A")[0] for m, e in merged.modules.items() if e["kind"] == "lowrank"})
    prov = next((p for p in reversed(merged.manifest.get("provenance", [])) if p.get("tool") == "adapterfmt merge"),
                {})
    infos, notes = prov.get("modules", {}), prov.get("notes", [])
    record: dict[str, Any] = {"out": str(out), "strategy": strategy, "method": merged.method,
                              "modules": len(merged.modules), "kinds": dict(kinds), "ranks": ranks,
                              "bytes": merged.nbytes(), "module_report": infos, "notes": notes}
    for note in notes:
        err_console.print(f"note: {note}", highlight=False)
    if as_json:
        print_json(record)
        return
    console.print(f"merged ({strategy}) -> {out}: {record['modules']} module(s), method {merged.method}, "
                  + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
                  + (f", ranks {ranks}" if ranks else "") + f", {human_bytes(record['bytes'])}", highlight=False)
    refactored = sorted(((m, i) for m, i in infos.items() if "energy" in i), key=lambda mi: -mi[1]["rel_error"])
    if refactored:
        print_table(("module", "rank", "of", "energy kept", "dW rel. error"),
                    [(m, str(i["rank"]), str(i.get("rank_in", "-")), f"{i['energy']:.6f}", f"{i['rel_error']:.3e}")
                     for m, i in refactored[:10]], "re-factored modules (worst first)")
        if len(refactored) > 10:
            console.print(f"({len(refactored) - 10} more in --json)")


def _print_bake(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(report)
        return
    print_table(("file",), [(f,) for f in report["files"]], f"baked -> {report['out']}")
    rate = report["bytes"] / report["seconds"] / 1e6 if report["seconds"] else 0.0
    console.print(f"{len(report['changed'])} of {report['tensors']} tensors changed, "
                  f"{human_bytes(report['bytes'])} in {report['seconds']:.2f} s ({rate:.0f} MB/s); "
                  f"base fingerprint: {', '.join(report['fingerprints'])}", highlight=False)
    if report["copied"]:
        console.print(f"copied: {', '.join(report['copied'])}", highlight=False)
    if report["skipped"]:
        console.print(f"[yellow]left out (other weight formats):[/] {', '.join(report['skipped'])}", highlight=False)
    if report["not_found"]:
        console.print(f"[yellow]not found in the checkpoint (not baked):[/] {', '.join(report['not_found'])}",
                      highlight=False)
    requantized = sorted(report["requantized"].items(), key=lambda kv: -kv[1]["relative_error"])
    if requantized:
        print_table(("module", "format", "max |error|", "error / |dW|"),
                    [(m, r["quant_type"], f"{r['max_abs_error']:.3e}", f"{r['relative_error']:.3f}")
                     for m, r in requantized[:10]], "re-quantised with bitsandbytes (worst first)")
        if len(requantized) > 10:
            console.print(f"({len(requantized) - 10} more in --json)")
    for note in report["notes"]:
        console.print(f"note: {note}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("merge")(merge)
