"""Errors of the MCP tools an LLM agent mounts, split by what the caller should do.

    McpError
    ├── McpConfigError    fix the agent's `mcp_servers`: a bad name, both or neither of command
    │                     and url, two servers of one name (also a ConfigurationError)
    └── McpUnavailable    retry later: the server could not be started or reached, it exited
                          or broke the connection, or it did not answer a call in time (also a
                          RetryableError: the message is redelivered after a backoff, and the
                          server is started again on the next call)

What the model did wrong, or the tool reported (an unknown or not allowed tool, arguments the
server refuses, a tool that answers with `isError`, a JSON-RPC error, an answer that does not
validate), is no exception: it is a tool result with `is_error`, recorded like any other, so the
model reads it and can correct itself. Retrying would ask the same question again.
"""

from __future__ import annotations

from agents.errors import AgentError
from bus.errors import ConfigurationError, RetryableError


class McpError(AgentError):
    """Base of the errors of an agent's mounted MCP servers."""


class McpConfigError(McpError, ConfigurationError):
    """An MCP server spec that cannot work; the message says what to change."""


class McpUnavailable(McpError, RetryableError):
    """An MCP server could not be used just now (start, connection, or a call's timeout); the
    message names the server and what happened. Nothing was recorded: the step runs again on
    the redelivery, with the same idempotency key."""
