"""The model card (``README.md``) that ``adapter push`` writes next to an adapter on the Hub.

Written here rather than with ``huggingface_hub.ModelCard``, whose ``push_to_hub`` validates the card
against a hard-coded huggingface.co URL (so it fails offline and against any other endpoint). The YAML
front matter follows the Hub's model-card metadata: ``base_model``, ``library_name``, ``tags``, plus an
``adapterfmt`` block with the method, ranks and size.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from ..format.adapter import Adapter
from ..verbs.summary import summarize

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def hub_id(name: object) -> bool:
    """Whether a base ``name`` is a Hub model id (``owner/name``, or a legacy one-word id like ``gpt2``): it has
    that shape and is not a path on this machine (``extract`` and ``convert`` record local paths as names)."""
    return (isinstance(name, str) and bool(_HUB_ID.match(name)) and name.count("/") <= 1
            and not Path(name).expanduser().exists())


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def card_metadata(adapter: Adapter, *, peft: bool = False, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The YAML front matter as a dict."""
    info = info or summarize(adapter)
    base = info["base"] or {}
    method = info["method"]
    ranks = sorted({int(r) for r in info["ranks"]})
    meta: dict[str, Any] = {}
    if hub_id(base.get("name")):
        meta["base_model"] = base["name"]
    meta["library_name"] = "adapterfmt"
    tags = ["adapterfmt", method["name"], *sorted(info["kinds"])]
    if peft:
        tags.append("peft")
    meta["tags"] = list(dict.fromkeys(tags))
    meta["adapterfmt"] = {
        "spec_version": info["spec_version"],
        "method": method["name"],
        "method_version": str(method.get("version", "")),
        "rank": ranks[0] if len(ranks) == 1 else (ranks or None),
        "modules": len(info["modules"]),
        "parameters": info["parameters"],
        "size_bytes": info["file_bytes"] if info["file_bytes"] is not None else info["tensor_bytes"],
        "form": info["form"],
    }
    if base.get("revision"):
        meta["adapterfmt"]["base_revision"] = base["revision"]
    return meta


def render_card(adapter: Adapter, *, repo_id: str, peft: bool = False) -> str:
    """The full ``README.md`` text: front matter, a summary table, and how to load the adapter."""
    info = summarize(adapter)
    meta = card_metadata(adapter, peft=peft, info=info)
    af = meta["adapterfmt"]
    base = info["base"] or {}
    rank = af["rank"]
    rank_text = "-" if rank is None else (", ".join(map(str, rank)) if isinstance(rank, list) else str(rank))
    kinds = ", ".join(f"{k} x{v}" for k, v in sorted(info["kinds"].items()))
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()
    lines = [
        "---", front, "---", "",
        f"# {repo_id.split('/')[-1]}", "",
        f"A `{af['method']}` adapter in the [adapterfmt](https://pypi.org/project/adapterfmt/) format "
        f"(spec {af['spec_version']})" + (f" for `{base['name']}`." if "base_model" in meta else "."), "",
        "| | |", "|---|---|",
        f"| method | `{af['method']}` v{af['method_version']} |",
        f"| base model | {('`' + str(base['name']) + '`') if 'base_model' in meta else 'unspecified'}"
        + (f" @ `{base['revision']}`" if base.get("revision") else "") + " |",
        f"| modules | {af['modules']} ({kinds}) |",
        f"| rank | {rank_text} |",
        f"| parameters | {af['parameters']:,} |",
        f"| size | {_human_bytes(af['size_bytes'] or 0)} |",
        "",
        "## How to load it", "",
        "With the `adapter` command (downloads only the adapter's files and verifies every checksum):", "",
        "```bash",
        f"adapter pull {repo_id} --out ./adapter",
        f"adapter inspect hf://{repo_id}",
        "```", "",
        "In Python:", "",
        "```python",
        "import adapterfmt",
        "",
        f'adapter = adapterfmt.load("hf://{repo_id}")  # or hf://{repo_id}@<revision>',
        "adapterfmt.attach(model, adapter)",
        "```", "",
    ]
    if peft:
        lines += [
            "## With PEFT", "",
            "This repository also holds the adapter in PEFT's format (`adapter_config.json`, "
            "`adapter_model.safetensors`):", "",
            "```python",
            "from peft import PeftModel",
            "",
            f'model = PeftModel.from_pretrained(base_model, "{repo_id}")',
            "```", "",
        ]
    return "\n".join(lines)


def parse_front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a card (empty dict when there is none)."""
    m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    return (yaml.safe_load(m.group(1)) or {}) if m else {}
