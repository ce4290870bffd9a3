"""The plugin system (layer 1): hook specifications, the pluggy registry that finds built-in and installed
plugins, and the structural types of formats, codecs and backends.

May import: ``adapterfmt.errors`` and ``adapterfmt._version``. Built-in plugins and the core delta kinds are
loaded by module name (as entry points are), never imported here; types of higher layers appear only under
``TYPE_CHECKING``.
"""
