"""The package version, importable from any layer (``submerge/__init__.py`` re-exports it as ``__version__``)."""

__version__ = "0.1.0"
