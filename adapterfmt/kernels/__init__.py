"""Apply-path kernels: fused LoRA, many adapters per batch, sparse, block and ternary deltas.

Each public function runs a Triton kernel when its tensors are on CUDA and triton imports, and a batched torch
path otherwise (``ADAPTERFMT_KERNELS=torch|triton|auto`` forces a choice). :mod:`.reference` holds the plain torch
definitions every path is tested against. Triton is imported lazily, only when a Triton path runs, so this package
imports where triton is missing.

Layer 3. May import: ``adapterfmt.errors``, ``plugin`` (apply backends that plugins provide).
"""

from __future__ import annotations

from .csr import CSR, to_csr
from .dispatch import (
                       ENV,
                       block_apply,
                       choose_backend,
                       lora_delta,
                       lora_linear,
                       multi_lora_rows,
                       multi_lora_segments,
                       sparse_apply,
                       sparse_merge_,
                       ternary_apply,
)
from .pool import LoraPool
from .ternary_planes import pack_ternary_planes, unpack_ternary_planes

__all__ = ["ENV", "CSR", "LoraPool", "block_apply", "choose_backend", "lora_delta", "lora_linear", "multi_lora_rows",
           "multi_lora_segments", "pack_ternary_planes", "sparse_apply", "sparse_merge_", "ternary_apply",
           "to_csr", "unpack_ternary_planes"]
