"""A plugin that loads fine but whose hook raises when called."""

import adapterfmt as af


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    raise RuntimeError("this plugin's method table is corrupt")
