"""Every hook a plugin can implement. One module, one docstring per hook; call with keyword arguments.

A plugin is a module or object with functions decorated ``@adapterfmt.hookimpl``, registered in code
(built-ins) or found through the entry-point group ``adapterfmt`` (third parties). The five kinds of
extension: new methods, a replaced verb of a method, foreign format codecs for ``convert``, compression
codecs, and apply backends (kernels); plus new delta kinds, understood extensions and CLI commands.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import typer

    from ..deltas import DeltaKind
    from ..verbs.method import Method

hookspec = pluggy.HookspecMarker("adapterfmt")
hookimpl = pluggy.HookimplMarker("adapterfmt")


@hookspec
def adapterfmt_methods() -> list[Method]:
    """Return the adaptation methods this plugin provides (instances of :class:`adapterfmt.Method`).

    A method's name must be unique across plugins; a duplicate is reported as a plugin error.
    """


@hookspec
def adapterfmt_delta_kinds() -> list[DeltaKind]:
    """Return extra delta kinds (subclasses of :class:`adapterfmt.DeltaKind`) this plugin implements."""


@hookspec(firstresult=True)
def adapterfmt_verb(method: str, verb: str) -> Callable[..., Any] | None:
    """Return a callable replacing ``verb`` (train, apply, merge, compress, port) of ``method``, or None.

    The first non-None answer wins, so a plugin can override one verb of a method it does not own;
    the callable takes the same arguments as the :class:`adapterfmt.Method` method it replaces.
    """


@hookspec
def adapterfmt_formats() -> list[Any]:
    """Return foreign format codecs for ``adapter convert`` (objects following :class:`adapterfmt.ForeignFormat`)."""


@hookspec
def adapterfmt_codecs() -> list[Any]:
    """Return tensor compression codecs (objects following :class:`adapterfmt.TensorCodec`)."""


@hookspec
def adapterfmt_backends() -> list[Any]:
    """Return apply backends (objects following :class:`adapterfmt.ApplyBackend`) for live models."""


@hookspec
def adapterfmt_extensions() -> list[str]:
    """Return the namespaced manifest extension names (``vendor.key``) this plugin understands.

    A manifest listing an extension in ``must_understand`` is refused unless some plugin names it here.
    """


@hookspec
def adapterfmt_cli(app: typer.Typer) -> None:
    """Add commands to the ``adapter`` CLI (``app`` is the root :class:`typer.Typer`)."""
