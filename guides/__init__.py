"""Pyro guides matching ``pyromtl.models``, same file names; shipped as ``pyromtl.guides``."""
