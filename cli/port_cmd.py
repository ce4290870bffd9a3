"""``adapter extract`` (a patch from a full fine-tune) and ``adapter port`` (re-target a patch to a new base)."""

from __future__ import annotations

from pathlib import Path

from typing import Literal

import typer

import adapterfmt as af
from adapterfmt.format.atomic import check_output
from adapterfmt.plugin import registry

from .common import (JsonOpt, OverwriteOpt, UsageError, cli_errors, console, err_console, hidden_alias, one_of,
                     out_option, print_json, print_table, progress, renamed, require)

FORM_OPTIONS = {"lowrank": ("rank", "energy", "max_rank"), "sparse": ("density", "top_k"), "dense": ()}
"""The options each extract --form takes; the first two of lowrank and sparse exclude each other, one is needed."""


@cli_errors
def extract(
    base: Path = typer.Option(..., "--base", help="Base checkpoint: a .safetensors file or a folder of them."),
    finetuned: Path = typer.Option(..., "--finetuned", help="The fully fine-tuned checkpoint (same architecture)."),
    out: Path = out_option("Where to write the patch (folder, or a .safetensors file)."),
    form: Literal["lowrank", "sparse", "dense"] = typer.Option("lowrank", "--form", help="lowrank (SVD per "
                                                               "module), sparse (top-k) or dense."),
    rank: int = typer.Option(None, "--rank", min=1, help="lowrank: the rank of every module."),
    energy: float = typer.Option(None, "--energy", min=0.0, max=1.0,
                                 help="lowrank: keep the smallest rank holding this fraction of each difference's "
                                      "energy, sum s_i^2 / sum s^2 (its squared Frobenius norm; e.g. 0.99)."),
    max_rank: int = typer.Option(None, "--max-rank", min=1, help="lowrank: cap on a module's rank with --energy."),
    density: float = typer.Option(None, "--density", min=0.0, max=1.0,
                                  help="sparse: fraction of each tensor's entries kept."),
    top_k: int = typer.Option(None, "--top-k", min=1, help="sparse: entries kept per tensor."),
    dtype: str = typer.Option(None, "--dtype", help="Stored dtype (F32, BF16, F16); default: the checkpoint's."),
    base_name: str = typer.Option(None, "--base-name", help="Base name to record (default: the --base path)."),
    overwrite: bool = OverwriteOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Extract the patch finetuned - base, streaming tensor by tensor; report what each module captured.

    Modules whose difference is zero are left out. 'captured' is 1 - ||D - D_stored||^2 / ||D||^2.
    """
    out = require(out, "say where to write the patch: --out")
    given = {"rank": rank, "energy": energy, "max_rank": max_rank, "density": density, "top_k": top_k}
    for name, value in given.items():
        if value is not None and name not in FORM_OPTIONS[form]:
            raise UsageError(f"--{name.replace('_', '-')} does not apply to --form {form}")
    if form != "dense":
        first, second = FORM_OPTIONS[form][:2]
        one_of(**{first: given[first], second: given[second]})
        if given[first] is None and given[second] is None:
            raise UsageError(f"--form {form} needs --{first} or --{second.replace('_', '-')}")
    if max_rank is not None and energy is None:
        raise UsageError("--max-rank caps the rank --energy picks: give --energy too")
    check_output(out, overwrite)
    adapter, report = af.extract_adapter(
        base, finetuned, form=form, rank=rank, energy=energy, max_rank=max_rank, density=density, top_k=top_k,
        dtype=dtype, base_name=base_name,
        progress=lambda items, total: progress(items, "extracting", total, quiet=as_json))
    af.save(adapter, out, overwrite=overwrite)
    if as_json:
        print_json({"out": str(out), "method": adapter.method, **report.as_dict()})
        return
    rows = [(m.module, m.kind, str(m.rank or "-"), f"{m.stored:,} / {m.numel:,}", f"{m.captured:.6f}",
             f"{m.rel_error:.2e}") for m in report.modules]
    print_table(("module", "kind", "rank", "stored", "captured", "rel. error"), rows,
                f"extracted {form} patch -> {out}")
    console.print(f"{len(report.modules)} module(s) stored, {report.unchanged} unchanged tensor(s) left out")
    if report.unplaced:
        console.print(f"[yellow]not representable in this form (change lost):[/] {', '.join(report.unplaced)}")
    if report.stored_dense:
        err_console.print(f"note: stored dense, its lowrank factors would be no smaller: "
                          f"{', '.join(report.stored_dense)}", highlight=False)


@cli_errors
def port(
    patch: str = typer.Argument(..., help="The adapter to re-target (folder, .safetensors file or hf://...)."),
    base: Path = typer.Option(None, "--base", help="The new base checkpoint (.safetensors file or folder)."),
    to: Path = hidden_alias("--to"),
    out: Path = out_option("Where to write the ported adapter."),
    old_base: Path = typer.Option(None, "--old-base", help="The base the patch was made for: enables mapping "
                                  "by position and recomputing base-dependent tensors (DoRA, replace patches)."),
    mapping: Path = typer.Option(None, "--mapping", help="JSON/YAML file of old module path -> new module path "
                                 "(a key ending in '.' renames a prefix)."),
    base_name: str = typer.Option(None, "--base-name", help="Base name to record (default: the --base path)."),
    overwrite: bool = OverwriteOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Re-target a patch to a new base: compare fingerprints, map modules, check shapes, recompute.

    Refuses (writing nothing) when a module is missing or its shape differs, naming the first few and the count.
    """
    from adapterfmt.verbs.port import port_record

    base = require(renamed(base, to, new="--base", old="--to"), "name the new base: --base")
    out = require(out, "say where to write the ported adapter: --out")
    check_output(out, overwrite)
    adapter = af.load(patch)
    options = {"old_base": old_base, "mapping": mapping, "base_name": base_name}
    verb = registry.verb(adapter.method, "port") if adapter.method in registry.methods() else af.port_adapter
    ported = verb(adapter, new_base=base, **options)
    af.save(ported, out, overwrite=overwrite)
    record = port_record(ported)
    if as_json:
        print_json({"out": str(out), **record})
        return
    console.print(f"ported {patch} -> {out}")
    console.print(f"new base: {record['to_base']}  change: [bold]{record['change']}[/] "
                  f"(fingerprint: {record['fingerprint']})")
    console.print("modules mapped by " + ", ".join(f"{k}: {v}" for k, v in record["mapped_by"].items()))
    for old, new in record["renamed"].items():
        console.print(f"  {old} -> {new}", highlight=False)
    for action, mods in record["actions"].items():
        console.print(f"{action}: {', '.join(mods)}", highlight=False)
    for note in record.get("notes", ()):
        console.print(f"note: {note}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("extract")(extract)
    app.command("port")(port)
