"""The verbs (layer 4): train (+ target selection), apply, merge (+ recipes, bake), compress, extract,
port, conversion between formats, and the :class:`~adapterfmt.Method` base class whose five verbs
delegate to them.

May import: ``adapterfmt.errors``, ``threads``, ``tiny``, ``plugin``, ``format``, ``deltas``, ``kernels``.
"""
