"""``adapter plugin new`` (scaffold a method plugin distribution) and ``adapter plugin check`` (conformance kit)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import typer
from rich.text import Text

from adapterfmt.authoring import scaffold

from .common import (App, JsonOpt, UsageError, cli_errors, console, hidden_alias, out_option, print_json, print_table,
                     renamed)

plugin_app = App(help="Write and check method plugins.", no_args_is_help=True)

STATUS_STYLE = {"pass": Text("pass", style="green"), "fail": Text("FAIL", style="bold red"),
                "skip": Text("skip", style="yellow")}


@plugin_app.command("new")
@cli_errors
def new(
    name: str = typer.Argument(..., help="Method name (lowercase letters, digits, _); also names the package."),
    folder: Path = out_option("Folder to create (default ./adapterfmt-<name>); must not exist."),
    old_folder: Path = hidden_alias("--dir"),
    kind: str = typer.Option("lowrank", "--kind",
                             help=f"Delta kind the method stores ({'|'.join(scaffold.KINDS)}; custom: a new kind)."),
    as_json: bool = JsonOpt,
) -> None:
    """Write a complete, installable plugin distribution: pyproject.toml with the `adapterfmt` entry point,
    a package with a Method subclass (public API only), conformance tests and a README."""
    out = scaffold.new_plugin(name, renamed(folder, old_folder, new="--out", old="--dir"), kind=kind)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    if as_json:
        print_json({"folder": str(out), "files": files, "method": name, "kind": kind})
        return
    console.print(f"wrote [bold]{out}[/] ({', '.join(files)})")
    console.print(f"next: pip install -e {out} && adapter plugin check {name}")


def _factory(spec: str | None) -> Any:
    if spec is None:
        return None
    modname, _, attr = spec.partition(":")
    if not modname or not attr:
        raise UsageError(f"--factory must be module:function, got {spec!r}")
    try:
        return getattr(importlib.import_module(modname), attr)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"--factory {spec}: {e}") from None


@plugin_app.command("check")
@cli_errors
def check(
    method: str = typer.Argument(..., help="An installed method (see `adapter methods`)."),
    factory: str = typer.Option(None, "--factory",
                                help="module:function returning an adapterfmt.authoring.conformance.Example "
                                     "(default: the method's train verb on a tiny model, or built-in kind examples)."),
    config: str = typer.Option(None, "--config", help="Training config for the train verb, as JSON."),
    as_json: bool = JsonOpt,
) -> None:
    """Run the conformance kit on METHOD: every check passes, fails, or is skipped with the reason its
    kinds cannot do it. Exit 1 when a check fails."""
    from adapterfmt.authoring import conformance

    try:
        train_config = None if config is None else json.loads(config)
    except ValueError as e:
        raise UsageError(f"--config is not JSON: {e}") from None
    report = conformance.check_method(method, _factory(factory), train_config=train_config)
    if as_json:
        print_json(report.to_dict())
    else:
        print_table(("check", "result", "detail", "s"),
                    [(r.name, STATUS_STYLE[r.status], r.detail, f"{r.seconds:.2f}") for r in report.results],
                    f"conformance of {method}")
        counts = {s: sum(r.status == s for r in report.results) for s in STATUS_STYLE}
        console.print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped")
    if not report.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(plugin_app, name="plugin")
