"""``adapter demo``: the embedded default job, end to end on a tiny model built in-process."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from adapterfmt.demo import run_demo

from .common import JsonOpt, cli_errors, console, print_json


@cli_errors
def demo(
    workdir: Path = typer.Option(None, "--workdir", help="Where to write the demo's files (default: a temp folder)."),
    as_json: bool = JsonOpt,
) -> None:
    """Build a tiny model, make adapters of every kind and run each capability on them; print what it did."""
    ctx = run_demo(workdir)
    if as_json:
        print_json({"workdir": str(ctx.workdir), "report": ctx.report})
        return
    console.print(f"[bold]adapterfmt demo[/] in {ctx.workdir}")
    for step in dict.fromkeys(r["step"] for r in ctx.report):
        rows = [r for r in ctx.report if r["step"] == step]
        keys = list(dict.fromkeys(k for r in rows for k in r if k != "step"))
        widths = [max(len(k), *(len(_cell(r.get(k, ""))) for r in rows)) + 3 for k in keys]
        if sum(widths) < console.width:
            t = Table(*keys, title=step, title_justify="left")
            for r in rows:
                t.add_row(*(_cell(r.get(k, "")) for k in keys))
        else:  # wide rows read better as one column per row
            t = Table("", *(str(i + 1) for i in range(len(rows))), title=step, title_justify="left",
                      show_header=len(rows) > 1)
            for k in keys:
                t.add_row(k, *(_cell(r.get(k, "")) for r in rows))
        console.print(t)
    console.print("[green]demo finished[/]")


def _cell(value: object) -> str:
    """Floats to 4 significant digits, everything else as text."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
