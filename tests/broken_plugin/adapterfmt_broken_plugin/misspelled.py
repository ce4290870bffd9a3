"""A plugin whose hook name is misspelled (``adapterfmt_method`` for ``adapterfmt_methods``): refused at load."""

import adapterfmt as af


class Never(af.Method):
    name = "never_registered"
    kinds = ("lowrank",)


@af.hookimpl
def adapterfmt_method() -> list[af.Method]:
    return [Never()]
