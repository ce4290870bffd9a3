"""``adapter demo``: the embedded default job, end to end on a tiny model built in-process."""

from __future__ import annotations

from pathlib import Path

import typer

import adapterfmt as af

from .common import JsonOpt, cli_errors, console, print_json, print_table, table_fits


@cli_errors
def demo(
    workdir: Path = typer.Option(None, "--workdir", help="Where to write the demo's files (default: a new temp "
                                 "folder); a folder that holds files needs --overwrite."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the demo's files in a --workdir that holds "
                                   "files."),
    as_json: bool = JsonOpt,
) -> None:
    """Build a tiny model, make adapters of every kind and run each capability on them; print what it did."""
    if workdir is not None and workdir.is_dir() and any(workdir.iterdir()) and not overwrite:
        raise af.OutputExistsError("the folder holds files the demo would replace; pass --overwrite", path=workdir)
    from adapterfmt.demo.run import run_demo

    ctx = run_demo(workdir)
    if as_json:
        print_json({"workdir": str(ctx.workdir), "report": ctx.report})
        return
    console.print(f"[bold]adapterfmt demo[/] in {ctx.workdir}")
    for step in dict.fromkeys(r["step"] for r in ctx.report):
        rows = [r for r in ctx.report if r["step"] == step]
        keys = list(dict.fromkeys(k for r in rows for k in r if k != "step"))
        cells = [[_cell(r.get(k, "")) for k in keys] for r in rows]
        if table_fits(keys, cells):
            print_table(keys, cells, step)
        else:  # wide rows read better as one column per row
            print_table(["", *(str(i + 1) for i in range(len(rows)))],
                        [[k, *(c[j] for c in cells)] for j, k in enumerate(keys)], step, show_header=len(rows) > 1)
    console.print("[green]demo finished[/]")


def _cell(value: object) -> str:
    """Floats to 4 significant digits, everything else as text."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
