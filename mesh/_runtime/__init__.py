"""Private implementation package: import from ``mesh`` instead."""
