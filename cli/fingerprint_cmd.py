"""``adapter fingerprint``: record a base model's fingerprint in an adapter that lacks one."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import JsonOpt, OverwriteOpt, UsageError, cli_errors, console, out_option, print_json


@cli_errors
def fingerprint(
    adapter: str = typer.Argument(..., help="The adapter (folder or .safetensors file; a foreign one with --out)."),
    base: Path = typer.Option(..., "--base", help="Its base checkpoint: a .safetensors file or a folder of them."),
    out: Path = out_option("Write the result here instead of replacing ADAPTER (atomically) in place."),
    base_name: str = typer.Option(None, "--base-name", help="Base name to record (default: the recorded one, else "
                                  "the --base path)."),
    overwrite: bool = OverwriteOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Record --base's fingerprint in an adapter (one converted without --base has none), after checking that
    every module fits it by name and shape; merge, bake and port then check the base they are given."""
    import adapterfmt as af

    loaded = af.load(adapter)
    if out is None and (loaded.converted_from or loaded.source is None or str(adapter).startswith("hf://")):
        raise UsageError(f"{adapter} is not a local adapterfmt adapter to rewrite in place: give --out")
    target = out or loaded.source
    recorded = af.record_base(loaded, base, base_name=base_name)
    af.save(recorded, target, overwrite=out is None or overwrite,
            single_file=None if out is not None else loaded.source.is_file())
    fp = recorded.base["fingerprint"]
    if as_json:
        print_json({"out": str(target), "base": recorded.base, "modules": len(recorded.modules)})
        return
    console.print(f"recorded the fingerprint of {base} (structure {fp['structure'][:16]}) in {target}; "
                  f"{len(recorded.modules)} module(s) fit it", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("fingerprint")(fingerprint)
