"""Shared CLI plumbing: the command classes (flags shown as flags, an option given twice refused), one-line
errors (exit 1) and usage errors (exit 2), deprecated option spellings, JSON output, tables that fit the
terminal, progress bars. The conventions are written down in docs/CLI.md."""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from adapterfmt import AdapterError, AdapterNote

console = Console(soft_wrap=True, highlight=False)
"""stdout; lines are never wrapped by us (a path stays whole when piped or in a narrow terminal)."""
err_console = Console(stderr=True, soft_wrap=True, highlight=False)
F = TypeVar("F", bound=Callable[..., Any])

DEBUG_ENV = "ADAPTERFMT_DEBUG"
ALIASES_REMOVED_IN = "0.3"
"""The version that drops the deprecated option spellings (kept hidden for one minor version)."""


class UsageError(Exception):
    """Options that do not fit together, or an option value the command cannot use: exit code 2."""


def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: object = None, line: str | None = None) -> None:
    """A warning as one line on stderr (``note:`` for an :class:`adapterfmt.AdapterNote`, else ``warning:``),
    not Python's two-line source listing."""
    note = issubclass(category, AdapterNote)
    err_console.print(f"[{'cyan' if note else 'yellow'}]{'note' if note else 'warning'}:[/] {message}",
                      highlight=False, soft_wrap=True, markup=True)


def cli_errors(fn: F) -> F:
    """Turn library errors into one red line on stderr and exit code 1, and :class:`UsageError` into one line
    and exit code 2 (a traceback with ADAPTERFMT_DEBUG=1); library notes and warnings become one line each."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", AdapterNote)
                warnings.showwarning = show_warning
                return fn(*args, **kwargs)
        except (AdapterError, OSError, UsageError) as e:
            if os.environ.get(DEBUG_ENV) == "1":
                raise
            usage = isinstance(e, UsageError)
            err_console.print(f"[bold red]{'usage error' if usage else 'error'}:[/] {e}")
            raise typer.Exit(2 if usage else 1) from None

    return wrapper  # type: ignore[return-value]


def print_json(data: Any) -> None:
    """Machine-readable output on stdout (no colour, no wrapping)."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


T = TypeVar("T")


def progress(items: Iterable[T], description: str, total: int | None = None, *, quiet: bool = False) -> Iterator[T]:
    """Iterate with a progress bar on stderr (hidden when quiet or not a terminal)."""
    if quiet:
        yield from items
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err_console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


class CallbackBar:
    """A progress bar on stderr driven by a callback (hidden when ``quiet`` or not a terminal): ``label``, a bar,
    done / total, ``columns`` (rich columns reading ``task.fields``), time left. :meth:`update` sets the counts."""

    def __init__(self, label: str, quiet: bool, *columns: Any) -> None:
        self.progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), *columns, TimeRemainingColumn(),
                                 console=err_console, transient=True, disable=quiet or not err_console.is_terminal)
        self.task: Any = None

    def __enter__(self) -> CallbackBar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def update(self, completed: int, total: int, *, start: int = 0, **fields: Any) -> None:
        """``completed`` of ``total`` done (a bar first shown at ``start``), with the columns' ``fields``."""
        if self.task is None:
            self.task = self.progress.add_task("", total=total, completed=start, **fields)
        self.progress.update(self.task, completed=completed, **fields)


JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace the output if it exists.")


def out_option(help: str) -> Any:
    """The ``--out`` / ``-o`` option every command that writes something takes."""
    return typer.Option(None, "--out", "-o", help=help)


def hidden_alias(name: str) -> Any:
    """A deprecated spelling of an option: not in ``--help``, still accepted (see :func:`renamed`)."""
    return typer.Option(None, name, hidden=True)


def deprecated(old: str, new: str, hint: str = "") -> None:
    """The one stderr line a deprecated spelling prints."""
    err_console.print(f"[yellow]deprecated:[/] {old} is now {new} ({old} goes in adapterfmt {ALIASES_REMOVED_IN})"
                      + (f"; {hint}" if hint else ""))


def renamed(value: T | None, alias_value: T | None, *, new: str, old: str, warn: bool = True) -> T | None:
    """The value of option ``new``, or of its other spelling ``old`` (deprecated: one line on stderr, unless
    not ``warn``); both given is a usage error."""
    if alias_value is None:
        return value
    if value is not None:
        raise UsageError(f"{old} and {new} name the same thing: give one")
    if warn:
        deprecated(old, new)
    return alias_value


def one_of(**given: Any) -> None:
    """Refuse options that exclude each other (keyword: option name without dashes, value None when absent)."""
    named = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
    if len(named) > 1:
        raise UsageError(f"{' and '.join(named)} exclude each other: give one")


def require(value: T | None, message: str) -> T:
    """``value``, or a usage error saying what is missing."""
    if value is None:
        raise UsageError(message)
    return value


# ----- tables that fit -------------------------------------------------------------------------------------
Cell = str | Text
"""A table cell: plain text (never read as markup), or a styled :class:`rich.text.Text`."""


def _text(cell: Cell) -> Text:
    return cell if isinstance(cell, Text) else Text(str(cell))


def table_fits(columns: Sequence[str], rows: Sequence[Sequence[Cell]]) -> bool:
    """Whether a boxed table of these cells fits the console's width without wrapping any cell."""
    widths = [max([len(c), *(_text(r[i]).cell_len for r in rows)]) for i, c in enumerate(columns)]
    return sum(widths) + 3 * len(widths) + 1 <= console.width


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Cell]], title: str | None = None, *,
                show_header: bool = True) -> None:
    """A table when it fits the console (80 columns when piped), else one line per row
    (``first-cell  column: value  ...``); no cell is cut or broken mid-word either way."""
    if title:
        console.print(Text(title))
    if table_fits(columns, rows):
        t = Table(show_header=show_header)
        for c in columns:
            t.add_column(c, no_wrap=True, overflow="ignore")
        for r in rows:
            t.add_row(*map(_text, r))
        console.print(t, soft_wrap=False)
        return
    for r in rows:
        line = _text(r[0]).copy()
        for c, cell in zip(columns[1:], r[1:], strict=True):
            line.append(f"  {c}: " if c else "  ")
            line.append_text(_text(cell))
        console.print(line)


# ----- the command classes ---------------------------------------------------------------------------------
class _Conventions:
    """Mixed into typer's command and group classes: boolean flags read as flags in ``--help`` (typer shows
    ``<bool>``), an option given twice is a usage error instead of "the last one wins", and a command list shows
    each command's first paragraph unbroken (typer's rich mode keeps the docstring's line breaks there)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        if self.help and not self.short_help:
            self.short_help = " ".join(inspect.cleandoc(self.help).split("\n\n")[0].split())

    def get_params(self, ctx: typer.Context) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for p in params:
            if getattr(p, "is_flag", False) and not getattr(p, "count", False):
                p.metavar = ""
        return params

    def make_parser(self, ctx: typer.Context) -> Any:
        parser = super().make_parser(ctx)  # type: ignore[misc]
        parse = parser.parse_args

        def parse_once(args: list[str]) -> Any:
            opts, rest, order = parse(args=args)
            seen: set[str] = set()
            for p in order:
                if getattr(p, "param_type_name", "") != "option" or p.multiple or p.count:
                    continue
                if p.name in seen:
                    ctx.fail(f"{'/'.join([*p.opts, *p.secondary_opts])} given more than once")
                seen.add(p.name)
            return opts, rest, order

        parser.parse_args = parse_once
        return parser


class Command(_Conventions, TyperCommand):
    """Every ``adapter`` command."""


class Group(_Conventions, TyperGroup):
    """``adapter`` and its command groups."""


class App(typer.Typer):
    """A typer app whose commands (plugin commands included) follow the conventions above."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cls=Group, **kwargs)

    def command(self, *args: Any, cls: type[TyperCommand] | None = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or Command, **kwargs)
