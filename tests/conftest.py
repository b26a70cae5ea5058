"""Shared fixtures: real nats-server processes (``nats_server``, ``nats_cluster``) and a
throwaway trust root (``trust``) come from the plugin the mesh ships for its users."""

pytest_plugins = ["mesh.testing"]
