"""Sharing through the Hugging Face Hub API (layer 5): push, pull with every server-given identifier
checked, the model card, and the ``hf://`` resolver it registers with the format layer.

May import: every layer below (``errors``, ``plugin``, ``format``, ``deltas``, ``verbs``).
"""
