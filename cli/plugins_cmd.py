"""``adapter plugins`` and ``adapter methods``."""

from __future__ import annotations

import typer
from rich.text import Text

import adapterfmt as af
from adapterfmt.plugin import registry

from .common import JsonOpt, cli_errors, print_json, print_table


@cli_errors
def plugins(as_json: bool = JsonOpt) -> None:
    """List loaded plugins (built-in and installed), their distribution, version and hooks; broken ones too."""
    rows = registry.plugin_info()
    if as_json:
        print_json(rows)
        return
    cells = []
    for r in rows:
        status = (Text("loaded", style="green") if r["status"] == "loaded"
                  else Text("broken", style="red").append(f": {r.get('error', '')}", style=""))
        cells.append((r["name"], r["distribution"] or "?", r["version"] or "?",
                      ", ".join(h.removeprefix("adapterfmt_") for h in r["hooks"]), status))
    print_table(("plugin", "distribution", "version", "hooks", "status"), cells)


@cli_errors
def methods(as_json: bool = JsonOpt) -> None:
    """List the adaptation methods available, with the delta kinds they store and which verbs they override."""
    rows = []
    for name, m in sorted(registry.methods().items()):
        own = [v for v in registry.VERBS if getattr(type(m), v) is not getattr(af.Method, v)]
        rows.append({"name": name, "version": m.version, "summary": m.summary, "kinds": list(m.kinds),
                     "overrides": own})
    if as_json:
        print_json(rows)
        return
    print_table(("method", "kinds", "own verbs", "summary"),
                [(r["name"], ", ".join(r["kinds"]), ", ".join(r["overrides"]) or "-", r["summary"]) for r in rows])


def register(app: typer.Typer) -> None:
    app.command("plugins")(plugins)
    app.command("methods")(methods)
