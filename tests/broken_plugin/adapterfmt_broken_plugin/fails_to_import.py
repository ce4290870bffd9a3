"""A plugin that cannot even be imported (a dependency it needs is missing)."""

import adapterfmt_dependency_that_does_not_exist  # noqa: F401
