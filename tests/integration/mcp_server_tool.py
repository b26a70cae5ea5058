"""A small MCP server for ``tests/integration/test_mcp.py`` to wrap with ``mesh-agent mcp-wrap``:
written with the SDK's ``MCPServer`` (FastMCP before mcp 2), served over stdio
(``python tests/integration/mcp_server_tool.py``).

Tools: ``add`` (typed: it has an output schema, so its reply is structured content),
``Shout.Text`` (text only, no output schema; capitals and a dot, so its endpoint is renamed
``shout-text``), and ``fail`` (always a tool error).
"""

from __future__ import annotations

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("test-tools")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two whole numbers."""
    return a + b


@server.tool(name="Shout.Text", structured_output=False)
def shout(text: str) -> str:
    """The text in capitals."""
    return text.upper()


@server.tool()
def fail(reason: str) -> str:
    """Always fails, with the reason given."""
    raise ToolError(f"refused: {reason}")


if __name__ == "__main__":
    server.run()
