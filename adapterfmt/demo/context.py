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

    def fit(self, method: str, config: dict[str, Any], x: torch.Tensor, y: torch.Tensor, *, lr: float,
            steps: int = 20) -> tuple[Any, list[float]]:
        """Train ``method`` on the tiny model for next-token targets ``y`` of ``x`` (AdamW, one thread: tiny
        matmuls run faster than on two contended ones); returns the live session and the losses."""
        import torch.nn.functional as F

        from ..plugin.registry import get_method
        from ..threads import one_thread

        vocab = self.model.config.vocab_size
        losses = []
        with one_thread(), torch.enable_grad():
            session = get_method(method).train(self.model, config=config)
            opt = torch.optim.AdamW(session.parameters(), lr=lr)
            for _ in range(steps):
                logits = self.model(x)[:, -x.shape[1]:]  # a prompt adapter prepends positions
                loss = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        return session, losses
