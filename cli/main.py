"""The root ``adapter`` command: registers the command modules and plugin-provided commands."""

from __future__ import annotations

import importlib

import typer

from adapterfmt import registry

app = typer.Typer(
    name="adapter",
    help="Inspect, validate, convert, merge, compress, port and share parameter-efficient adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMAND_MODULES = (
    "inspect_cmd",
    "plugins_cmd",
    "demo_cmd",
    "port_cmd",
    "merge_cmd",
    "convert_cmd",
    "compress_cmd",
    "hub_cmd",
    "plugin_cmd",
)
"""Modules of ``adapterfmt.cli`` that each define ``register(app)``; listed in the order of ``--help``."""

for _name in COMMAND_MODULES:
    importlib.import_module(f"adapterfmt.cli.{_name}").register(app)

registry.add_plugin_commands(app)


def main() -> None:
    app()
