"""Merge recipes: one YAML or JSON file naming a merge's inputs, their weights and its options.

```yaml
strategy: ties          # any strategy of adapterfmt.verbs.merge
density: 0.5            # rank, energy, density, seed, sign, dtype as merge_adapters takes them
adapters:
  - path: math-lora     # relative paths are read from the recipe's folder
    weight: 0.7
  - code-lora           # weight 1
into: base-checkpoint   # optional: bake into this checkpoint instead of writing an adapter
out: merged             # optional (the CLI's --out wins)
```
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from ..errors import FormatError, MissingFileError

OPTION_KEYS = ("strategy", "rank", "energy", "density", "seed", "sign", "dtype")
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["adapters"],
    "additionalProperties": False,
    "properties": {
        "adapters": {"type": "array", "minItems": 1, "items": {"anyOf": [
            {"type": "string"},
            {"type": "object", "required": ["path"], "additionalProperties": False,
             "properties": {"path": {"type": "string"}, "weight": {"type": "number"}}}]}},
        "strategy": {"type": "string"},
        "rank": {"type": "integer", "minimum": 1},
        "energy": {"type": "number"},
        "density": {"type": "number"},
        "seed": {"type": "integer"},
        "sign": {"enum": ["total", "frequency"]},
        "dtype": {"type": "string"},
        "into": {"type": "string"},
        "out": {"type": "string"},
        "force": {"type": "boolean"},
        "shard_size": {"type": "integer", "minimum": 1},
    },
}


@dataclass
class Recipe:
    adapters: list[str]
    weights: list[float]
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword options of :func:`adapterfmt.verbs.merge.merge_adapters` (strategy, rank, ...)."""
    into: Path | None = None
    out: Path | None = None
    force: bool = False
    shard_size: int | None = None


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and check a recipe; paths in it are resolved against the recipe's folder."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("no such recipe file", path=path)
    text = path.read_text("utf-8")
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml and json both: report the parse error on one line
        raise FormatError(f"recipe is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                          f"{str(e).splitlines()[0]}", path=path) from None
    err = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(SCHEMA).iter_errors(data))
    if err is not None:
        where = "/".join(map(str, err.absolute_path)) or "(top level)"
        raise FormatError(f"recipe field {where}: {err.message}", path=path)
    here = path.parent

    def resolve(p: str) -> str:
        return p if p.startswith("hf://") or Path(p).is_absolute() else str(here / p)

    items = [a if isinstance(a, dict) else {"path": a} for a in data["adapters"]]
    return Recipe(
        adapters=[resolve(a["path"]) for a in items],
        weights=[float(a.get("weight", 1.0)) for a in items],
        options={k: data[k] for k in OPTION_KEYS if k in data},
        into=Path(resolve(data["into"])) if "into" in data else None,
        out=Path(resolve(data["out"])) if "out" in data else None,
        force=bool(data.get("force", False)),
        shard_size=data.get("shard_size"),
    )
