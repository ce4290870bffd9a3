"""What the ``adapter demo`` steps share (:class:`DemoContext`); the steps import this, never :mod:`.run`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..tiny import TinyLM


@dataclass
class DemoContext:
    """What the demo steps share: a work folder, the tiny base model, adapters made so far, and the report."""

    workdir: Path
    model: TinyLM
    base_dir: Path
    inputs: torch.Tensor
    adapters: dict[str, Path] = field(default_factory=dict)
    report: list[dict[str, Any]] = field(default_factory=list)

    def note(self, step: str, **facts: Any) -> None:
        self.report.append({"step": step, **facts})
