"""The MCP server `bus bench` calls to measure a recorded MCP step: one `echo` tool over stdio.

    python -m agents.mcp.bench_echo_server
"""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer


def build() -> MCPServer:
    """A server with one tool, `echo(text)`, answering the text as it came."""
    server = MCPServer("continuum-bench-echo")

    @server.tool()
    async def echo(text: str) -> str:
        """Say the text back."""
        return text

    return server


if __name__ == "__main__":
    build().run("stdio")
