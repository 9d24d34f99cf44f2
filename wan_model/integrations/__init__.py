"""Integrations of the `wan` kernels into other frameworks (imported lazily: optional dependencies)."""
