"""Start-up cost (issue 14): ``import adapterfmt``, ``adapter --help`` and ``adapter inspect`` of a core-kind
adapter import neither torch nor the built-in plugins; public names that need torch resolve on first use; what
made that possible stays true (the built-in plugins add no CLI command, the header reader's dtype sizes equal
torch's)."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import os
import subprocess
import sys

import torch
from helpers_spec import SPEC, invoke

import adapterfmt as af
from adapterfmt.format import safetensors_io
from adapterfmt.plugin import registry

HEAVY = ("torch", "numpy", "triton", "transformers", "adapterfmt.deltas", "adapterfmt.verbs.apply",
         "adapterfmt.plugins.methods.lora")


def _loaded_after(code: str) -> dict[str, bool]:
    """Which of HEAVY a fresh interpreter has imported after running ``code`` (third-party plugins blocked:
    an installed plugin's own imports are its own start-up cost)."""
    blocked = ",".join(ep.name for ep in md.entry_points(group=registry.ENTRY_POINT_GROUP))
    probe = f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {list(HEAVY)!r}}}))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                       env={**os.environ, registry.BLOCK_ENV: blocked})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_import_adapterfmt_is_light():
    assert not any(_loaded_after("import adapterfmt").values())


def test_adapter_help_imports_no_torch_and_no_builtin_plugin():
    code = ("import contextlib, io\nfrom adapterfmt.cli.main import app\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n        app(['--help'])\n    except SystemExit as e:\n        assert e.code == 0, e.code\n"
            "assert 'inspect' in out.getvalue() and 'merge' in out.getvalue()")
    assert not any(_loaded_after(code).values())


def test_adapter_inspect_imports_no_torch_and_no_builtin_plugin():
    """Reading and checking a core-kind adapter needs the delta kinds' shape rules only, not their torch maths:
    no plugin is loaded and no tensor is read (lowrank has no rules on stored values)."""
    code = ("import contextlib, io\nfrom adapterfmt.cli.main import app\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            f"    try:\n        app(['inspect', {str(SPEC / 'examples/lowrank')!r}])\n"
            "    except SystemExit as e:\n        assert e.code == 0, e.code\n"
            "assert 'lowrank: 6' in out.getvalue() and 'verified' in out.getvalue(), out.getvalue()")
    loaded = _loaded_after(code)
    assert loaded.pop("adapterfmt.deltas")  # the kinds' shape checks, imported without torch
    assert not any(loaded.values()), loaded


def test_lazy_names_are_public_and_resolve_to_their_module_objects():
    lazy = dict(af._WHERE)
    assert set(lazy) <= set(af.__all__)
    assert set(af.__all__) <= set(dir(af))
    for name, module in lazy.items():
        value = getattr(af, name)
        assert value is getattr(importlib.import_module(module, "adapterfmt"), name), name
    from adapterfmt import Method, attach  # `from adapterfmt import X` of a lazy name

    assert attach is af.attach and Method is af.Method


def test_unknown_names_still_raise_attribute_error():
    try:
        af.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("af.no_such_name resolved")
    from adapterfmt import kernels  # a sub-package, imported as before

    assert kernels.lora_linear


def test_builtin_plugins_add_no_cli_command():
    """``adapter`` adds plugin commands from the entry-point plugins only; a built-in with a command would be
    silently missing from the CLI."""
    for name, module in registry.BUILTIN_PLUGINS.items():
        assert not hasattr(importlib.import_module(module), "adapterfmt_cli"), name


def test_header_dtype_sizes_equal_torchs():
    dtypes = safetensors_io.DTYPES
    assert set(dtypes) == set(safetensors_io.ITEMSIZE)
    for name, dtype in dtypes.items():
        assert torch.empty((), dtype=dtype).element_size() == safetensors_io.ITEMSIZE[name], name
    assert safetensors_io.DTYPE_NAMES[torch.bfloat16] == "BF16"


def test_merge_help_lists_every_strategy():
    from adapterfmt.verbs.merge import STRATEGIES

    r = invoke("merge", "--help")
    assert r.exit_code == 0
    text = " ".join(r.stdout.split())
    for s in STRATEGIES:
        assert s in text, s
