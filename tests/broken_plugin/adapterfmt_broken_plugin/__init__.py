"""Three deliberately broken plugins (see the entry points in ../pyproject.toml)."""
