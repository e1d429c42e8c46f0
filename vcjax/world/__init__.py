"""The procedural video world (placeholder docstring)."""
