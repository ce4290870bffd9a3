"""``adapter demo`` (layer 6): one step per capability, run on the tiny model in a work folder.

May import: every layer below. Steps import :mod:`.context`, never :mod:`.run`, which imports the steps.
"""
