"""The conformance kit's first home, kept so plugins written (or scaffolded) before 0.2 still import it;
the kit lives in :mod:`adapterfmt.authoring.conformance`."""

from .authoring.conformance import *  # noqa: F403
from .authoring.conformance import __all__  # noqa: F401
