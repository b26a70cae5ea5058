"""The mesh's pytest fixtures (``nats_server``, ``nats_cluster``, ``trust``) for the example
tests: in your project this line goes in the top-level ``conftest.py``."""

pytest_plugins = ["mesh.testing"]
