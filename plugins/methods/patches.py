"""Model patches made from full fine-tunes, not by injection: task vectors and PortLLM patches.

Both are ``finetuned - base`` (``adapter extract``, stored ``dense`` / ``lowrank`` / ``sparse``). Their
``train`` verb is the base class's refusal pointing to ``adapter extract``; apply / merge / compress / port
are the delta kinds' generic verbs. Task arithmetic is ``adapter merge`` with strategy ``linear``: weights
add tasks, negative weights remove (negate) them, exactly, in delta space.
"""

from __future__ import annotations

import adapterfmt as af


class TaskVector(af.Method):
    name = "task_vector"
    summary = "Task vector / model patch: dW = finetuned - base (task arithmetic by linear merge)"
    kinds = ("dense", "sparse", "lowrank")


class PortLLM(af.Method):
    name = "portllm"
    summary = "PortLLM: a patch made on one base version carried to its evolved version (adapter port)"
    kinds = ("dense", "lowrank")


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [TaskVector(), PortLLM()]
