"""Protocol bridges: the mesh's edge to clients that do not speak ``docs/protocol.md``.

Each bridge is a mesh client (or agent) of its own, holding its own identity, that translates
another protocol into mesh requests: ``http`` serves ``POST /v1/{agent}/{endpoint}`` and an
OpenAPI document (``mesh-agent gateway``, ``docs/gateway.md``; with ``apikeys``, ``problems`` and
``openapi``); ``mcp_serve`` and ``mcp_wrap`` are the MCP bridges (``docs/mcp.md``); ``serving`` runs
an ASGI app on uvicorn for them and the dashboard. Their
third-party libraries are optional extras, imported only by the bridge that needs them.
"""
