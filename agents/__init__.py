"""Built-in agents, written only against the public ``mesh`` SDK (installed as ``mesh_agents``)."""
