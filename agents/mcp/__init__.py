"""The Model Context Protocol on both sides of the bus.

    server side   `bus mcp`: the bus and the team's memory as MCP tools and resources for any
                  MCP client (Claude Code, Claude Desktop, Cursor), over stdio or streamable HTTP:
                  cli.py (the command), server.py (tools, resources, errors), models.py (what
                  the tools return), memory_queries.py (the SQL they run through the bus's query
                  service), bench.py (`mcp_tool_call_p50_ms`)
    client side   LLM agents mount MCP servers; each tool call is a recorded step, so a
                  redelivered message, a restart or a replay never calls the server again
"""
