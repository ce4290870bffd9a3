"""Model patches stored as dense or sparse weight deltas: task vectors, sparse fine-tuning, PortLLM."""

from __future__ import annotations

import adapterfmt as af


class TaskVector(af.Method):
    name = "task_vector"
    summary = "Task vector / model patch: dW = finetuned - base, stored dense"
    kinds = ("dense",)


class SparseFT(af.Method):
    name = "sparse_ft"
    summary = "Sparse fine-tuning: a few weights changed, stored as sorted indices + values"
    kinds = ("sparse",)


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [TaskVector(), SparseFT()]
