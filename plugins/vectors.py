"""Representation offsets and scales: IA3 (learned rescaling) and LoFiT-style offsets."""

from __future__ import annotations

import adapterfmt as af


class IA3(af.Method):
    name = "ia3"
    summary = "IA3: learned per-channel scaling of activations"
    kinds = ("vector",)


class LoFiT(af.Method):
    name = "lofit"
    summary = "LoFiT: learned per-channel offsets added to selected outputs"
    kinds = ("vector",)


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [IA3(), LoFiT()]
