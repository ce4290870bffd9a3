"""Prompt tuning: learned virtual token embeddings prepended to the input."""

from __future__ import annotations

import adapterfmt as af


class PromptTuning(af.Method):
    name = "prompt_tuning"
    summary = "Prompt tuning: virtual token embeddings prepended to the input embeddings"
    kinds = ("prompt",)


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [PromptTuning()]
