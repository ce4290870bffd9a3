"""The distribution's version (one home, imported by the package root and the plugin registry)."""

__version__ = "0.1.0"
