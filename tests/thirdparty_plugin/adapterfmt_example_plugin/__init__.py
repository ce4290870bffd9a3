"""An example third-party adapterfmt plugin, written against the public API only (``import adapterfmt as af``).

It adds, without touching adapterfmt's core:

- a delta kind ``kron``: dW = scale * kron(left, right) (row-major Kronecker product, LoKr without the
  low-rank factor), applied unmerged without ever forming dW;
- a method ``example_kron`` storing its adapters as that kind;
- a verb override: ``merge`` of ``example_kron`` (a sum of Kronecker products is not one, so the merged
  result is a dense task vector);
- a foreign format ``example_json`` for ``adapter convert`` (manifest and tensors in one JSON file);
- an understood manifest extension ``example.note``, so adapters may list it in ``must_understand``;
- a CLI command ``adapter example-note ADAPTER`` that prints that note.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import adapterfmt as af

EXTENSION = "example.note"


class Kron(af.DeltaKind):
    """``kron``: roles ``left`` [m1, n1] and ``right`` [m2, n2] for a weight of shape [m1*m2, n1*n2]."""

    name = "kron"
    required_roles = ("left", "right")

    def check(self, module: str, entry: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> None:
        left, right = shapes["left"], shapes["right"]
        if len(left) != 2 or len(right) != 2 or [left[0] * right[0], left[1] * right[1]] != list(entry["shape"]):
            raise af.FormatError(f"module {module!r}: kron left {list(left)} x right {list(right)} does not "
                                 f"make a weight of shape {list(entry['shape'])}")

    @staticmethod
    def scale(entry: Mapping[str, Any]) -> float:
        return float(entry.get("params", {}).get("scale", 1.0))

    def delta(self, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.scale(entry) * torch.kron(t["left"].float(), t["right"].float())

    def forward(self, module: nn.Module, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor],
                x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not isinstance(module, nn.Linear):
            raise af.UnsupportedError(f"kron applies to nn.Linear only, not {type(module).__name__}")
        left, right = t["left"].to(x.dtype), t["right"].to(x.dtype)
        xs = x.reshape(*x.shape[:-1], left.shape[1], right.shape[1])  # (A kron B) vec(X) = vec(A X B^T)
        out = left @ xs @ right.t()
        return y + self.scale(entry) * out.reshape(*x.shape[:-1], -1).to(y.dtype)


class KronMethod(af.Method):
    name = "example_kron"
    summary = "Example plugin: Kronecker-product weight deltas, dW = scale * left (x) right"
    kinds = ("kron",)
    config_schema = {"type": "object", "properties": {"scale": {"type": "number"}}, "additionalProperties": False}


def make_adapter(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *, scale: float = 1.0,
                 note: str | None = None) -> af.Adapter:
    """An ``example_kron`` adapter from ``{module path: (left, right)}``; ``note`` adds the must-understand extension."""
    modules = {m: {"kind": "kron", "shape": [l.shape[0] * r.shape[0], l.shape[1] * r.shape[1]],
                   "params": {"scale": scale}} for m, (l, r) in factors.items()}
    tensors = {f"{m}.{role}": t for m, lr in factors.items() for role, t in zip(("left", "right"), lr)}
    extra: dict[str, Any] = {}
    if note is not None:
        extra = {"extensions": {EXTENSION: {"text": note}}, "must_understand": [EXTENSION]}
    manifest = af.new_manifest(KronMethod.name, modules, config={"scale": scale},
                               provenance=[{"tool": "adapterfmt-example-plugin"}], **extra)
    return af.Adapter(manifest, tensors)


def merge_kron(adapters: Sequence[af.Adapter], *, weights: Sequence[float] | None = None,
               strategy: str = "linear", **options: Any) -> af.Adapter:
    """The ``merge`` verb of ``example_kron``: the weighted sum of every module's dW, as a dense task vector."""
    if strategy != "linear":
        raise af.UnsupportedError(f"example_kron merges with strategy 'linear' only, not {strategy!r}")
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    kind = Kron()
    modules: dict[str, dict[str, Any]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for adapter, w in zip(adapters, weights, strict=True):
        for path, entry in sorted(adapter.modules.items()):
            d = w * kind.delta(entry, adapter.module_tensors(path))
            modules[path] = {"kind": "dense", "shape": list(entry["shape"]), "params": {"mode": "add"}}
            tensors[f"{path}.delta"] = tensors[f"{path}.delta"] + d if f"{path}.delta" in tensors else d
    return af.Adapter(af.new_manifest("task_vector", modules, provenance=[{"tool": "example_kron merge"}]), tensors)


class JsonFormat:
    """``example_json``: one ``.adapterjson`` file holding the manifest and every tensor as a nested list."""

    name = "example_json"
    summary = "Example plugin: an adapter as one JSON file (manifest + tensors as lists)"

    def detect(self, path: Path) -> bool:
        return Path(path).is_file() and Path(path).suffix == ".adapterjson"

    def read(self, path: Path, **options: Any) -> af.Adapter:
        try:
            data = json.loads(Path(path).read_text("utf-8"))
            tensors = {name: torch.tensor(t["data"], dtype=getattr(torch, t["dtype"])).reshape(t["shape"])
                       for name, t in data["tensors"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise af.FormatError(f"not an example_json adapter: {e}", path=path) from None
        return af.Adapter(data["manifest"], tensors)

    def write(self, adapter: af.Adapter, path: Path, **options: Any) -> None:
        tensors = {name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                          "data": t.reshape(-1).tolist()} for name, t in adapter.tensors().items()}
        Path(path).write_text(json.dumps({"manifest": adapter.manifest, "tensors": tensors}), encoding="utf-8")


@af.hookimpl
def adapterfmt_delta_kinds() -> list[af.DeltaKind]:
    return [Kron()]


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [KronMethod()]


@af.hookimpl
def adapterfmt_verb(method: str, verb: str) -> Callable[..., Any] | None:
    return merge_kron if (method, verb) == (KronMethod.name, "merge") else None


@af.hookimpl
def adapterfmt_formats() -> list[Any]:
    return [JsonFormat()]


@af.hookimpl
def adapterfmt_extensions() -> list[str]:
    return [EXTENSION]


@af.hookimpl
def adapterfmt_cli(app: Any) -> None:
    @app.command("example-note")
    def example_note(path: str) -> None:
        """Print the adapter's example.note (nothing when it has none)."""
        note = af.load(path).manifest.get("extensions", {}).get(EXTENSION, {}).get("text")
        if note is not None:
            print(note)


__all__ = ["Kron", "KronMethod", "JsonFormat", "make_adapter", "merge_kron", "EXTENSION"]
