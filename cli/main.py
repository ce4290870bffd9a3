"""The root ``adapter`` command: registers the command modules and plugin-provided commands."""

from __future__ import annotations

import importlib
import logging
import warnings

import typer

import adapterfmt as af
from adapterfmt.plugin import registry

from .common import App, console, show_warning

warnings.showwarning = show_warning  # a broken plugin's warning, say: one line on stderr
# bitsandbytes (imported by peft and transformers whenever installed) logs at import, on CPUs with AVX512-BF16,
# that an optional kernel package is missing; it changes no result, so the command line does not show it
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage())

app = App(
    name="adapter",
    help="Inspect, validate, convert, merge, compress, port and share parameter-efficient adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMAND_MODULES = (
    "demo_cmd",
    "train_cmd",
    "acquire_cmd",
    "inspect_cmd",
    "convert_cmd",
    "merge_cmd",
    "compress_cmd",
    "port_cmd",
    "fingerprint_cmd",
    "generate_cmd",
    "hub_cmd",
    "plugins_cmd",
    "plugin_cmd",
)
"""Modules of ``adapterfmt.cli`` that each define ``register(app)``; listed in the order of ``--help``."""


def _version(value: bool) -> None:
    if value:
        console.print(f"adapter (adapterfmt) {af.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                 help="Print the version and exit."),
) -> None:
    """Inspect, validate, convert, merge, compress, port and share parameter-efficient adapters."""


for _name in COMMAND_MODULES:
    importlib.import_module(f"adapterfmt.cli.{_name}").register(app)

registry.add_plugin_commands(app)


def main() -> None:
    app()


if __name__ == "__main__":  # `accelerate launch -m adapterfmt.cli.main train ...`
    main()
