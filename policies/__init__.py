"""Example and default policy files (YAML), installed as ``mesh_policies`` for the demo."""
