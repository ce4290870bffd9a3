"""Every command's --help renders (help texts are Rich markup: a stray ``[/x]`` breaks them)."""

from __future__ import annotations

import pytest
from adapterfmt.cli.main import app
from helpers_spec import invoke

COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)
GROUPS = sorted(g.name for g in app.registered_groups)


@pytest.mark.parametrize("command", COMMANDS + GROUPS)
def test_help_renders(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
