"""Pyro models, one method per file; shipped as ``pyromtl.models``."""
