"""The built-in compression codecs (int8 per channel, int4 with group scales, nf4 / fp4 with block absmax,
ternary), registered through the same hook a third-party codec package uses."""

from __future__ import annotations

import adapterfmt as af


@af.hookimpl
def adapterfmt_codecs() -> list[af.TensorCodec]:
    return list(af.BUILTIN_CODECS)
