"""Fault tests: the real chain under load while a component is killed hard."""
