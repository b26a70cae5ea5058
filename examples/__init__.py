"""Runnable multi-agent example programs (installed as ``mesh_examples``)."""
