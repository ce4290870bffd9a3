"""Stacking many LoRA adapters into one zero-padded pool for the multi-adapter kernels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class LoraPool:
    """Adapters stacked for one target layer: ``A`` [n, r_max, in], ``B`` [n, out, r_max], ``scales`` [n] fp32.

    Smaller ranks are zero-padded up to ``r_max`` (padding rows of A and columns of B are zero, so they add
    nothing). ``ranks[a]`` is adapter ``a``'s true rank.
    """

    A: torch.Tensor
    B: torch.Tensor
    scales: torch.Tensor
    ranks: tuple[int, ...]

    @classmethod
    def stack(cls, adapters: Sequence[tuple[torch.Tensor, torch.Tensor, float]], *, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> LoraPool:
        """Stack ``(A [r, in], B [out, r], scale)`` triples; ranks may differ, in/out may not."""
        if not adapters:
            raise ValueError("LoraPool.stack needs at least one adapter")
        a0, b0, _ = adapters[0]
        in_f, out_f = a0.shape[1], b0.shape[0]
        dtype = dtype or a0.dtype
        device = device if device is not None else a0.device
        ranks = []
        for i, (a, b, _) in enumerate(adapters):
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f or b.shape[1] != a.shape[0]:
                raise ValueError(f"adapter {i}: A {list(a.shape)} and B {list(b.shape)} do not fit "
                                 f"A [r, {in_f}], B [{out_f}, r]")
            ranks.append(int(a.shape[0]))
        r_max = max(ranks)
        pool_a = torch.zeros(len(adapters), r_max, in_f, dtype=dtype, device=device)
        pool_b = torch.zeros(len(adapters), out_f, r_max, dtype=dtype, device=device)
        for i, (a, b, _) in enumerate(adapters):
            pool_a[i, : a.shape[0]] = a.to(device=device, dtype=dtype)
            pool_b[i, :, : b.shape[1]] = b.to(device=device, dtype=dtype)
        scales = torch.tensor([float(s) for _, _, s in adapters], dtype=torch.float32, device=device)
        return cls(pool_a, pool_b, scales, tuple(ranks))

    def __len__(self) -> int:
        return self.A.shape[0]

    @property
    def r_max(self) -> int:
        return self.A.shape[1]

    def rows(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``y`` plus each row's adapter delta (see :func:`adapterfmt.kernels.multi_lora_rows`)."""
        from .dispatch import multi_lora_rows

        return multi_lora_rows(x, y, self.A, self.B, self.scales, ids)

    def segments(self, x: torch.Tensor, y: torch.Tensor, seg_starts: torch.Tensor, seg_ids: torch.Tensor) -> torch.Tensor:
        """``y`` plus each segment's adapter delta (see :func:`adapterfmt.kernels.multi_lora_segments`)."""
        from .dispatch import multi_lora_segments

        return multi_lora_segments(x, y, self.A, self.B, self.scales, seg_starts, seg_ids)


__all__ = ["LoraPool"]
