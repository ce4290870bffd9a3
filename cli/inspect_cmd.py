"""``adapter inspect`` and ``adapter validate``."""

from __future__ import annotations

import typer
from rich.text import Text

import adapterfmt as af

from .common import JsonOpt, cli_errors, console, err_console, human_bytes, print_json, print_table


@cli_errors
def inspect(
    path: str = typer.Argument(..., help="Adapter folder, .safetensors file, or hf://owner/name@revision."),
    as_json: bool = JsonOpt,
    modules: bool = typer.Option(False, "--modules", help="List every module, not just the totals."),
) -> None:
    """Show what an adapter is: method, spec version, base and fingerprint, modules, ranks, size, checksums."""
    from adapterfmt.verbs.summary import summarize

    info = summarize(af.validate(path))
    if as_json:
        print_json(info)
        return
    base = info["base"]
    fp = (base.get("fingerprint") or {})
    rows = [
        ("path", f"{info['path']} ({info['form']})"),
        ("method", f"{info['method']['name']} v{info['method']['version']}"),
        ("spec version", info["spec_version"]),
        ("base", f"{base.get('name') or '?'}" + (f" @ {base['revision']}" if base.get("revision") else "")),
        ("fingerprint", f"{fp.get('structure', '-')[:16]}"
                        + (f" (values {fp['values'][:16]})" if fp.get("values") else "")),
        ("modules", f"{len(info['modules'])} ({', '.join(f'{k}: {v}' for k, v in info['kinds'].items())})"),
        *([("ranks", ", ".join(f"r={k} x{v}" for k, v in info["ranks"].items()))] if info["ranks"] else []),
        ("parameters", f"{info['parameters']:,}"),
        ("size", f"{human_bytes(info['file_bytes'] or 0)} on disk, {human_bytes(info['tensor_bytes'])} of tensors"),
        *([("compression", compression_text(info["compression"]))] if info["compression"] else []),
    ]
    for key, value in rows:  # one line each: long values (paths) stay whole
        console.print(Text(f"{key:<13} {value}"))
    console.print(Text(f"{'checksums':<13} ").append(str(info["checksums"]), style="green"))
    if modules:
        print_table(("module", "kind", "shape", "rank", "params", "stored as"),
                    [(m["module"], m["kind"], "x".join(map(str, m["shape"])), str(m["rank"] or "-"),
                      f"{m['params']:,}", ", ".join(f"{r}:{c}" for r, c in (m["encoding"] or {}).items()) or "plain")
                     for m in info["modules"]])


def compression_text(record: dict) -> str:
    """One line for a ``compression`` record: the steps, the tensor-byte ratio and the dW error."""
    if "steps" not in record:
        return ", ".join(f"{k}={v}" for k, v in record.items() if not isinstance(v, dict | list))
    steps = " -> ".join(s.get("method", "?") + "(" + ", ".join(f"{k}={v}" for k, v in s.items() if k != "method") + ")"
                        for s in record["steps"])
    err = record.get("dW_rel_error_max")
    return (f"{steps}; tensors {record.get('source_tensor_bytes', 0):,} -> {record.get('tensor_bytes', 0):,} B "
            f"({record.get('tensor_ratio')}x); dW rel. error max {'unbounded' if err is None else f'{err:.3e}'}, "
            f"mean {record.get('dW_rel_error_mean', 0):.3e}")


@cli_errors
def validate(
    paths: list[str] = typer.Argument(..., help="Adapters to check (folders, .safetensors files or "
                                      "hf://owner/name\\[@revision]\\[/subfolder])."),
    as_json: bool = JsonOpt,
) -> None:
    """Check adapters completely: format, schema, checksums, tensors present and none extra, shapes.

    Exit code 0 when all are valid, 1 when any is invalid, 2 on usage errors.
    """
    results = []
    for p in paths:
        try:
            af.validate(p)
            results.append({"path": str(p), "valid": True, "error": None, "error_type": None})
        except af.AdapterError as e:
            results.append({"path": str(p), "valid": False, "error": str(e), "error_type": type(e).__name__})
    if as_json:
        print_json(results)
    else:
        for r in results:
            if r["valid"]:
                console.print(f"[green]valid[/]   {r['path']}", highlight=False)
            else:
                err_console.print(f"[bold red]invalid[/] {r['error_type']}: {r['error']}")
    if not all(r["valid"] for r in results):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
    app.command("validate")(validate)
