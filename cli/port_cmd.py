"""``adapter extract`` (a patch from a full fine-tune) and ``adapter port`` (re-target a patch to a new base)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

import adapterfmt as af
from adapterfmt import registry
from adapterfmt.atomic import check_output
from adapterfmt.extract import extract_adapter
from adapterfmt.port import port_adapter, port_record

from .common import JsonOpt, OverwriteOpt, cli_errors, console, print_json, progress


@cli_errors
def extract(
    base: Path = typer.Option(..., "--base", help="Base checkpoint: a .safetensors file or a folder of them."),
    finetuned: Path = typer.Option(..., "--finetuned", help="The fully fine-tuned checkpoint (same architecture)."),
    out: Path = typer.Option(..., "--out", help="Where to write the patch (folder, or a .safetensors file)."),
    form: str = typer.Option("lowrank", "--form", help="lowrank (SVD per module), sparse (top-k) or dense."),
    rank: int = typer.Option(None, "--rank", min=1, help="lowrank: the rank of every module."),
    energy: float = typer.Option(None, "--energy", help="lowrank: keep the smallest rank holding this fraction "
                                                          "of each difference's energy (e.g. 0.99)."),
    max_rank: int = typer.Option(None, "--max-rank", min=1, help="lowrank: cap on a module's rank with --energy."),
    density: float = typer.Option(None, "--density", help="sparse: fraction of each tensor's entries kept."),
    top_k: int = typer.Option(None, "--top-k", min=1, help="sparse: entries kept per tensor."),
    dtype: str = typer.Option(None, "--dtype", help="Stored dtype (F32, BF16, F16); default: the checkpoint's."),
    base_name: str = typer.Option(None, "--base-name", help="Base name to record (default: the --base path)."),
    overwrite: bool = OverwriteOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Extract the patch finetuned - base, streaming tensor by tensor; report what each module captured.

    Modules whose difference is zero are left out. 'captured' is 1 - ||D - D_stored||^2 / ||D||^2.
    """
    check_output(out, overwrite)
    adapter, report = extract_adapter(
        base, finetuned, form=form, rank=rank, energy=energy, max_rank=max_rank, density=density, top_k=top_k,
        dtype=dtype, base_name=base_name,
        progress=lambda items, total: progress(items, "extracting", total, quiet=as_json))
    af.save(adapter, out, overwrite=overwrite)
    if as_json:
        print_json({"out": str(out), "method": adapter.method, **report.as_dict()})
        return
    t = Table("kind", "rank", "stored", "captured", "rel. error", title=f"extracted {form} patch -> {out}",
              title_justify="left")
    t.add_column("module", overflow="fold")
    for m in report.modules:
        t.add_row(m.kind, str(m.rank or "-"), f"{m.stored:,} / {m.numel:,}", f"{m.captured:.6f}",
                  f"{m.rel_error:.2e}", m.module)
    console.print(t)
    console.print(f"{len(report.modules)} module(s) stored, {report.unchanged} unchanged tensor(s) left out")
    if report.unplaced:
        console.print(f"[yellow]not representable in this form (change lost):[/] {', '.join(report.unplaced)}")


@cli_errors
def port(
    patch: str = typer.Argument(..., help="The adapter to re-target (folder, .safetensors file or hf://...)."),
    to: Path = typer.Option(..., "--to", help="The new base checkpoint (.safetensors file or folder)."),
    out: Path = typer.Option(..., "--out", help="Where to write the ported adapter."),
    old_base: Path = typer.Option(None, "--old-base", help="The base the patch was made for: enables mapping "
                                  "by position and recomputing base-dependent tensors (DoRA, replace patches)."),
    mapping: Path = typer.Option(None, "--mapping", help="JSON/YAML file of old module path -> new module path "
                                 "(a key ending in '.' renames a prefix)."),
    base_name: str = typer.Option(None, "--base-name", help="Base name to record (default: the --to path)."),
    overwrite: bool = OverwriteOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Re-target a patch to a new base: compare fingerprints, map modules, check shapes, recompute.

    Refuses (writing nothing) when a module is missing or its shape differs, listing every one.
    """
    check_output(out, overwrite)
    adapter = af.load(patch)
    options = {"old_base": old_base, "mapping": mapping, "base_name": base_name}
    verb = registry.verb(adapter.method, "port") if adapter.method in registry.methods() else port_adapter
    ported = verb(adapter, new_base=to, **options)
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
