"""Helpers that prepare a machine for the project; not installed with the package, and
standard library only where they run before the project's dependencies import."""
