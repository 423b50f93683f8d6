"""`bus mcp`: serve the bus and its memory to MCP clients (Claude Code, Claude Desktop, ...).

    bus mcp                                  # stdio: the client starts this command
    bus mcp --http --port 8765               # streamable HTTP at http://127.0.0.1:8765/mcp
    bus mcp --name claude-desktop            # the sender name its writes carry

The server connects to the bus like every other command (`--url`/BUS_URL, the environment for
the rest) and stays connected for the life of the session. Over stdio, stdout is the protocol's
channel: everything the server logs goes to stderr.
"""

from __future__ import annotations

import argparse

from bus.cli.common import add_connection_options, open_bus, port_number


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "mcp", help="serve the bus and the agents' memory as MCP tools (stdio, or --http)",
        description="An MCP server connected to the bus as a named sender: search memory (facts, recall, "
        "blocks) as of or since a point, open contradictions, what is new, record cited facts, send, "
        "request and broadcast to agents, list agents, trace a conversation. Speaks MCP over stdio "
        "(for a client that starts it), or streamable HTTP with --http.",
    )
    parser.add_argument("--http", action="store_true", help="serve streamable HTTP instead of stdio")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP address to bind (default %(default)s)")
    parser.add_argument("--port", type=port_number, default=8765, help="HTTP port (default %(default)s)")
    parser.add_argument("--name", default="mcp", help="the sender name on the bus; facts it records carry it "
                        "(default %(default)s)")
    add_connection_options(parser)
    parser.set_defaults(func=run_mcp)


async def run_mcp(args: argparse.Namespace) -> int:
    """Serve until the client closes stdin (stdio) or the process is interrupted (HTTP).
    Raises CliError when no bus is reachable, ConfigurationError for an invalid name."""
    from agents.mcp.server import McpSettings, build_server
    from bus.config import check_name

    check_name(args.name, "sender name")
    async with open_bus(args, name=args.name) as bus:
        server = build_server(bus, McpSettings(name=args.name))
        if args.http:
            await server.run_streamable_http_async(host=args.host, port=args.port)
        else:
            await server.run_stdio_async()
    return 0
