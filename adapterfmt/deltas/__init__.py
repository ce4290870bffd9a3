"""Delta kinds (layer 3): the few forms every method's result takes and their math (spec section 6), and
how a weight reaches a torch module (:mod:`.modules`).

May import: ``adapterfmt.errors``, ``plugin``, ``format``, ``kernels``.
"""

from .base import DeltaKind
from .dense import Dense
from .lowrank import LowRank, function_shape, lowrank_entry
from .mask import Mask
from .prompt import Prompt
from .sparse import Sparse
from .ternary import Ternary
from .vector import Vector

BUILTIN_KINDS: tuple[DeltaKind, ...] = (LowRank(), Dense(), Sparse(), Vector(), Prompt(), Ternary(), Mask())

__all__ = ["DeltaKind", "LowRank", "Dense", "Sparse", "Ternary", "Vector", "Prompt", "Mask", "BUILTIN_KINDS",
           "function_shape", "lowrank_entry"]
