"""Tools for plugin authors (layer 5): the conformance kit and ``adapter plugin new``'s scaffold.

May import: every lower layer (``errors``, ``tiny``, ``plugin``, ``format``, ``deltas``, ``kernels``, ``verbs``).
``adapterfmt.conformance`` stays importable for plugins written before this package existed.
"""
