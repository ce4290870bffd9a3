"""The shapes of plugin-provided objects other than methods and delta kinds (structural types)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from ..format.adapter import Adapter


@runtime_checkable
class ForeignFormat(Protocol):
    """A format ``adapter convert`` reads from and/or writes to (PEFT, kohya, mlx-lm, GGUF ...)."""

    name: str
    summary: str

    def detect(self, path: Path) -> bool:
        """True when ``path`` holds an adapter in this format."""

    def read(self, path: Path, **options: Any) -> Adapter:
        """Convert the foreign adapter at ``path`` into an :class:`Adapter` (in memory)."""

    def write(self, adapter: Adapter, path: Path, **options: Any) -> None:
        """Write ``adapter`` in this format to ``path`` (a folder or file that does not exist yet)."""


@runtime_checkable
class TensorCodec(Protocol):
    """A compression codec: one logical tensor stored as several parts (``<module>.<role>.<part>``)."""

    name: str

    def encode(self, tensor: torch.Tensor, **options: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Return the stored parts and the JSON spec recorded in the module entry's ``encoding``."""

    def decode(self, parts: dict[str, torch.Tensor], spec: dict[str, Any]) -> torch.Tensor:
        """Rebuild the logical tensor from its parts."""

    def parts(self, spec: dict[str, Any]) -> tuple[str, ...]:
        """Names of the parts stored for a tensor encoded with ``spec``."""


@runtime_checkable
class ApplyBackend(Protocol):
    """A kernel backend for the apply paths (e.g. Triton on CUDA)."""

    name: str

    def supports(self, op: str, device: torch.device, dtype: torch.dtype) -> bool:
        """True when this backend implements ``op`` (see :mod:`adapterfmt.kernels`) for the device and dtype."""

    def get(self, op: str) -> Any:
        """The callable implementing ``op``, with the same signature as the torch reference."""
