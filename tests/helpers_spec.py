"""Shared helpers of the spec tests: where the spec lives, running the real ``adapter`` command, file listings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "spec"
EXAMPLES = SPEC / "examples"
ADAPTER_BIN = Path(sys.executable).parent / "adapter"


def example_paths() -> list[Path]:
    """What the shell glob ``spec/examples/*`` expands to."""
    return sorted(EXAMPLES.iterdir())


def run_adapter(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the installed ``adapter`` console script in a fresh process."""
    full_env = {**os.environ, "COLUMNS": "80", **(env or {})}
    return subprocess.run([str(ADAPTER_BIN), *args], capture_output=True, text=True, env=full_env, cwd=cwd,
                          timeout=120)


def invoke(*args: str):
    """Run the CLI in-process (fast); returns typer's Result with ``exit_code``, ``stdout``, ``stderr``."""
    from adapterfmt.cli.main import app

    return CliRunner().invoke(app, list(args))


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden temp files included) by relative path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def save_unchecked(adapter, path: Path) -> Path:
    """Write ``adapter`` as a tool that does not validate might (``af.save`` refuses invalid adapters)."""
    import pytest

    from adapterfmt.format import adapter as adapter_module

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adapter_module, "_check_output_adapter", lambda *args: None)
        return adapter_module.save(adapter, path)
