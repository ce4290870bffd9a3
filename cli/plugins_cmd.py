"""``adapter plugins`` and ``adapter methods``."""

from __future__ import annotations

import typer
from rich.table import Table

from adapterfmt import Method, registry

from .common import JsonOpt, cli_errors, console, print_json


@cli_errors
def plugins(as_json: bool = JsonOpt) -> None:
    """List loaded plugins (built-in and installed), their distribution, version and hooks; broken ones too."""
    rows = registry.plugin_info()
    if as_json:
        print_json(rows)
        return
    t = Table("plugin", "distribution", "version", "hooks", "status")
    for r in rows:
        status = "[green]loaded[/]" if r["status"] == "loaded" else f"[red]broken[/]: {r.get('error', '')}"
        t.add_row(r["name"], r["distribution"] or "?", r["version"] or "?", ", ".join(h.removeprefix("adapterfmt_") for h in r["hooks"]), status)
    console.print(t)


@cli_errors
def methods(as_json: bool = JsonOpt) -> None:
    """List the adaptation methods available, with the delta kinds they store and which verbs they override."""
    rows = []
    for name, m in sorted(registry.methods().items()):
        own = [v for v in registry.VERBS if getattr(type(m), v) is not getattr(Method, v)]
        rows.append({"name": name, "version": m.version, "summary": m.summary, "kinds": list(m.kinds),
                     "overrides": own})
    if as_json:
        print_json(rows)
        return
    t = Table("method", "kinds", "own verbs", "summary")
    for r in rows:
        t.add_row(r["name"], ", ".join(r["kinds"]), ", ".join(r["overrides"]) or "-", r["summary"])
    console.print(t)


def register(app: typer.Typer) -> None:
    app.command("plugins")(plugins)
    app.command("methods")(methods)
