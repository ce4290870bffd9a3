"""``adapter plugin new``: the skeleton of an installable method plugin distribution.

:func:`new_plugin` writes, atomically and never over an existing folder::

    <folder>/pyproject.toml                 the ``adapterfmt`` entry point, setuptools build
    <folder>/README.md                      install, check, publish
    <folder>/adapterfmt_<name>/__init__.py  a Method subclass (public API only) with a ``train`` verb
    <folder>/tests/test_conformance.py      the conformance kit, one test per check

The method stores its adapters as an existing delta kind (``lowrank``, ``dense``, ``vector``) or, with
``custom``, as a new delta kind the plugin defines itself (a low-rank product to edit into your math).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from string import Template

from .._version import __version__
from ..errors import FormatError, OutputExistsError, PluginError
from ..format.atomic import atomic_dir

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")

_HEADER = '''"""$name: $summary

An adapterfmt method plugin, written against the public API only (``import adapterfmt as af``). Its
``train`` verb injects trainable deltas into the modules the config selects; apply, merge, compress and
port are the generic verbs of the delta kind its adapters are stored as ($kind).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

import adapterfmt as af

'''

_METHOD = '''
class $cls(af.Method):
    name = "$name"
    version = "1"
    summary = "$summary"
    kinds = ("$kind",)
    defaults: dict[str, Any] = $defaults
    config_schema = {"type": "object", "properties": {$schema**af.TARGETS_SCHEMA}}

    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> af.TrainSession:
        """Inject a trainable delta into every module ``config["target_modules"]`` selects."""
        cfg = {**self.defaults, **config}
        self.check_config(cfg)
        return af.inject(model, method=self.name, config=cfg, build=lambda path, module: self.layer(module, cfg),
                         supported=$supported)

    @staticmethod
    def layer(module: nn.Module, cfg: dict[str, Any]) -> af.TrainableDelta:
        """One module's delta: its entry and its initial (trainable) tensors."""
$layer

@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [$cls()]
$kind_hook'''

_LOWRANK_LAYER = '''        entry = af.module_entry("lowrank", module, {"scale": cfg["alpha"] / cfg["r"]})
        out, *rest = af.function_shape(entry)
        dtype = af.adapter_dtype(module)
        lora_a = torch.empty(cfg["r"], *rest, dtype=dtype)
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
        lora_b = torch.zeros(out, cfg["r"], dtype=dtype)  # zero: training starts at the base model
        return af.TrainableDelta(entry, {"lora_A": lora_a, "lora_B": lora_b})
'''

_DENSE_LAYER = '''        entry = af.module_entry("dense", module, {"mode": "add", "scale": cfg["scale"]})
        delta = torch.zeros(module.weight.shape, dtype=af.adapter_dtype(module))  # stored layout
        return af.TrainableDelta(entry, {"delta": delta})
'''

_VECTOR_LAYER = '''        entry = af.module_entry("vector", module, {"op": "scale", "side": cfg["side"]})
        out, n_in = af.function_shape(entry)[:2]
        size = out if cfg["side"] == "output" else n_in
        return af.TrainableDelta(entry, {"vector": torch.ones(size, dtype=af.adapter_dtype(module))})
'''

_CUSTOM_LAYER = '''        entry = af.module_entry("$name", module, {"scale": cfg["alpha"] / cfg["r"]})
        out, n_in = module.weight.shape
        dtype = af.adapter_dtype(module)
        right = torch.empty(cfg["r"], n_in, dtype=dtype)
        nn.init.kaiming_uniform_(right, a=math.sqrt(5))
        left = torch.zeros(out, cfg["r"], dtype=dtype)  # zero: training starts at the base model
        return af.TrainableDelta(entry, {"left": left, "right": right})
'''

_CUSTOM_KIND = '''class $kcls(af.DeltaKind):
    """Delta kind ``$name``: roles ``left`` [out, r] and ``right`` [r, in] of an ``nn.Linear`` weight [out, in];
    dW = scale * left @ right. Replace the math with your method's; merge / unmerge add / subtract
    :meth:`delta` unless you override them (and ``is_additive`` if your change is not W + dW)."""

    name = "$name"
    required_roles = ("left", "right")

    def check(self, module: str, entry: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
        (out, n_in), left, right = entry["shape"], shapes["left"], shapes["right"]
        if len(left) != 2 or len(right) != 2 or left[0] != out or right[1] != n_in or left[1] != right[0]:
            raise af.FormatError(f"module {module!r}: left {list(left)} and right {list(right)} must be "
                                 f"[{out}, r] and [r, {n_in}]")

    @staticmethod
    def scale(entry: dict[str, Any]) -> float:
        return float(entry.get("params", {}).get("scale", 1.0))

    def delta(self, entry: dict[str, Any], t: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.scale(entry) * (t["left"].float() @ t["right"].float())

    def forward(self, module: nn.Module, entry: dict[str, Any], t: dict[str, torch.Tensor], x: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
        if not isinstance(module, nn.Linear):
            raise af.UnsupportedError(f"$name applies to nn.Linear only, not {type(module).__name__}")
        h = x @ t["right"].to(x.dtype).t()
        return y + (self.scale(entry) * (h @ t["left"].to(x.dtype).t())).to(y.dtype)

'''

_KIND_HOOK = '''

@af.hookimpl
def adapterfmt_delta_kinds() -> list[af.DeltaKind]:
    return [$kcls()]
'''

_RANK = '"r": {"type": "integer", "minimum": 1}, "alpha": {"type": "number"}, '
KINDS: dict[str, dict[str, str]] = {
    "lowrank": {"layer": _LOWRANK_LAYER, "defaults": '{"r": 8, "alpha": 8}', "schema": _RANK,
                "supported": '(nn.Linear, "Conv1D")', "summary": "dW = scale * B @ A (stored as lowrank)"},
    "dense": {"layer": _DENSE_LAYER, "defaults": '{"scale": 1.0}', "schema": '"scale": {"type": "number"}, ',
              "supported": '(nn.Linear, "Conv1D")', "summary": "a full weight delta (stored as dense)"},
    "vector": {"layer": _VECTOR_LAYER, "defaults": '{"side": "output"}',
               "schema": '"side": {"enum": ["output", "input"]}, ', "supported": '(nn.Linear, "Conv1D")',
               "summary": "learned per-channel scaling (stored as vector)"},
    "custom": {"layer": _CUSTOM_LAYER, "defaults": '{"r": 8, "alpha": 8}', "schema": _RANK,
               "supported": "(nn.Linear,)", "summary": "its own delta kind, dW = scale * left @ right"},
}
"""What ``--kind`` chooses: the delta kind the new method stores its adapters as (``custom``: a new one)."""

_PYPROJECT = '''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "adapterfmt method plugin: $name ($summary)"
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["adapterfmt>=$afversion", "torch"]

[project.optional-dependencies]
test = ["pytest>=8"]

[project.entry-points.adapterfmt]
$name = "$package"

[tool.setuptools]
packages = ["$package"]
'''

_TEST = '''"""The adapterfmt conformance kit on $name: every verb of the toolkit works for it (one test per check)."""

import pytest

from adapterfmt.authoring.conformance import conformance_cases


@pytest.mark.parametrize("case", conformance_cases("$name"), ids=str)
def test_conformance(case):
    case()  # fails with what went wrong, or skips with why the method's kinds cannot do the check
'''

_README = '''# $dist

An [adapterfmt](https://pypi.org/project/adapterfmt/) method plugin: **$name** — $summary.

The method lives in `$package/__init__.py`; the entry point in `pyproject.toml` (group `adapterfmt`)
makes every `adapter` command and library call know it once the package is installed.

```bash
pip install -e .                 # then: adapter methods  (lists $name)
adapter plugin check $name       # the conformance kit: a table of checks, exit 1 on a failure
pytest tests/                    # the same checks as tests
```

Train, save and use an adapter:

```python
import adapterfmt as af

session = af.registry.verb("$name", "train")(model, config={"target_modules": ["q_proj", "v_proj"]})
...  # your training loop over session.parameters()
adapter = session.extract()
af.save(adapter, "my-adapter")
af.attach(fresh_model, af.load("my-adapter"))
```

Publish with `python -m build && twine upload dist/*`.
'''


def dist_name(name: str) -> str:
    return "adapterfmt-" + name.replace("_", "-")


def _class_name(name: str) -> str:
    return "".join(p.capitalize() for p in name.split("_") if p)


def render(name: str, kind: str = "lowrank") -> dict[str, str]:
    """The files of a new plugin distribution, ``{relative path: text}``."""
    if not NAME_RE.match(name):
        raise FormatError(f"plugin name {name!r} must be lowercase letters, digits and _, starting with a letter")
    if kind not in KINDS:
        raise FormatError(f"unknown --kind {kind!r} (one of {', '.join(KINDS)})")
    spec = KINDS[kind]
    package = f"adapterfmt_{name}"
    cls, kcls = _class_name(name) + "Method", _class_name(name) + "Kind"
    values = {"name": name, "dist": dist_name(name), "package": package, "cls": cls, "kcls": kcls,
              "kind": name if kind == "custom" else kind, "summary": spec["summary"],
              "afversion": __version__, "defaults": spec["defaults"], "schema": spec["schema"],
              "supported": spec["supported"], "layer": Template(spec["layer"]).substitute(name=name),
              "kind_hook": Template(_KIND_HOOK).substitute(kcls=kcls) if kind == "custom" else ""}
    module = Template(_HEADER).substitute(values)
    if kind == "custom":
        module += "\n" + Template(_CUSTOM_KIND).substitute(values)
    module += Template(_METHOD).substitute(values)
    return {"pyproject.toml": Template(_PYPROJECT).substitute(values),
            "README.md": Template(_README).substitute(values),
            f"{package}/__init__.py": module,
            "tests/test_conformance.py": Template(_TEST).substitute(values)}


def new_plugin(name: str, folder: str | os.PathLike[str] | None = None, *, kind: str = "lowrank") -> Path:
    """Write a new plugin distribution for method ``name`` into ``folder`` (default ``./adapterfmt-<name>``),
    atomically; an existing folder is refused. Returns the folder."""
    from ..plugin.registry import methods

    files = render(name, kind)
    if name in methods():
        raise PluginError(f"a method named {name!r} is already installed; pick another name")
    folder = Path(folder) if folder is not None else Path(dist_name(name))
    if folder.exists():
        raise OutputExistsError("exists; `plugin new` never writes over anything: choose another --out", path=folder)
    with atomic_dir(folder) as tmp:
        for rel, text in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text, encoding="utf-8")
    return folder


__all__ = ["KINDS", "render", "new_plugin", "dist_name"]
