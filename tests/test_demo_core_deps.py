"""`adapter demo` (the README's first command) runs on the core dependencies alone: every optional package the
test extra brings is hidden from a fresh interpreter, as on a plain `pip install adapterfmt`."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORT_NAME = {"lycoris-lora": "lycoris", "mlx-lm": "mlx_lm", "pytest-xdist": "xdist"}
NOT_HIDDEN = {"hypothesis", "triton"}
"""Probed by torch itself (hypothesis) or covered by ``tests/test_without_triton.py`` (triton)."""


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()


def optional_packages() -> list[str]:
    """Import names of the test extra's packages that a plain ``pip install adapterfmt`` does not bring."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_name(r) for r in project["dependencies"]}
    extra = {_name(r) for r in project["optional-dependencies"]["test"]} - core - NOT_HIDDEN
    return sorted({IMPORT_NAME.get(n, n.replace("-", "_")) for n in extra} | {"adapterfmt_example_plugin"})


SCRIPT = textwrap.dedent("""
    import sys
    hidden = set(sys.argv[2].split(","))

    class Hide:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in hidden:
                raise ModuleNotFoundError(f"No module named {name!r} (hidden: not a core dependency)")

    sys.meta_path.insert(0, Hide())
    from adapterfmt.cli.main import main
    sys.argv = ["adapter", "demo", "--workdir", sys.argv[1], "--json"]
    main()
""")


def test_demo_runs_without_optional_packages(tmp_path):
    hidden = optional_packages()
    assert {"peft", "transformers", "gguf", "diffusers"} <= set(hidden)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "work"), ",".join(hidden)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"step"' in proc.stdout
