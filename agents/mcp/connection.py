"""One session with one MCP server: started, listed, called, closed. The one module of the
client side that imports the MCP SDK (the seam: SDK errors become McpUnavailable or an error
answer here, SDK types become `ListedTool` and `CallAnswer`).

The SDK's client is an async context manager built on anyio task groups, which must be left by
the task that entered them; but tool calls come from handler tasks, and a crashed server is
started again by whichever call comes next. So each connection is opened and closed by a task
of its own (`serve`, run in the toolbox's task group): it opens the client, lists the tools,
hands the session over, and holds it until `close()`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import anyio
import msgspec
import pydantic
from mcp import Client, InputRequiredRoundsExceededError, MCPError, StdioServerParameters, types

from agents.mcp.errors import McpUnavailable
from agents.mcp.spec import IDEMPOTENCY_KEY, McpServerSpec

log = logging.getLogger("continuum.agents.mcp")

# A tool answer longer than this reaches the model cut, with a note: it becomes a step record
# and a turn of the conversation, and a model's context is finite.
MAX_ANSWER_CHARS = 32_000
# A server listing its tools in more pages than this is cut there (a paginator that never ends).
MAX_LIST_PAGES = 20
# Answers of the transport, not of the tool: the server is gone or did not answer in time.
_UNAVAILABLE_CODES = frozenset({types.CONNECTION_CLOSED, types.REQUEST_TIMEOUT})
# What a connection that died under a call raises, besides MCPError(CONNECTION_CLOSED).
_TRANSPORT_ERRORS = (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream, OSError)
# What the SDK raises for an answer that is not a valid tool result.
_INVALID_ANSWER = (pydantic.ValidationError, InputRequiredRoundsExceededError, RuntimeError)


class ListedTool(msgspec.Struct, frozen=True, kw_only=True):
    """A tool as the server lists it."""

    name: str
    description: str
    input_schema: dict[str, Any]


class CallAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """What a tool call came back with, as text for the model; `is_error` when the tool (or
    the server, refusing the call) says it failed."""

    text: str
    is_error: bool = False


class McpConnection:
    """A session with the server of `spec`. `start()` it in a task group and await `ready()`;
    `call()` from any task; `close()` lets its task shut the server down (the task group waits
    for that). `broken` once it has failed or is closing: the toolbox then starts another."""

    def __init__(self, spec: McpServerSpec) -> None:
        self.spec = spec
        self.tools: list[ListedTool] = []
        self.broken = False
        self._client: Client | None = None
        self._ready: asyncio.Future[None] | None = None
        self._closing = asyncio.Event()

    def start(self, tasks: asyncio.TaskGroup) -> None:
        """Start the connection's task in `tasks` (which owns it until it ends)."""
        self._ready = asyncio.get_running_loop().create_future()
        tasks.create_task(self.serve(self._ready), name=f"mcp-server:{self.spec.name}")

    async def ready(self) -> None:
        """Wait until the server is started and its tools listed. Raises McpUnavailable if it
        could not be (each request of the start is bounded by `connect_timeout_s`)."""
        if self._ready is None:
            raise RuntimeError("McpConnection.ready() before start()")
        await asyncio.shield(self._ready)

    def close(self) -> None:
        """Ask the connection's task to close the session and stop the server (no wait)."""
        self.broken = True
        self._closing.set()

    async def serve(self, ready: asyncio.Future[None]) -> None:
        """The connection task: open, list, hand over, hold until closed. Raises no Exception
        (the task group would cancel the agent): a failure to start goes to `ready`'s waiter, a
        later one marks the connection broken."""
        spec = self.spec
        try:
            async with Client(self._server(), read_timeout_seconds=spec.connect_timeout_s, cache=None) as client:
                self.tools = await _list_tools(client)
                self._client = client
                ready.set_result(None)
                await self._closing.wait()
        except Exception as exc:  # noqa: BLE001 - every failure of a foreign server ends here, described
            if not ready.done():
                failure = McpUnavailable(f"MCP server {spec.name!r} ({spec.target}) could not be started: {_describe(exc)}")
                failure.__cause__ = exc
                ready.set_exception(failure)
            elif not self.broken:
                log.warning("MCP server %r (%s) failed: %s", spec.name, spec.target, _describe(exc))
        finally:
            self._client = None
            self.broken = True
            if not ready.done():
                ready.cancel()  # cancelled before it was ready: the waiter is being cancelled too

    async def call(self, tool: str, arguments: dict[str, Any], *, key: str) -> CallAnswer:
        """Call the server's tool `tool` with `key` as its idempotency key, within
        `call_timeout_s`. The tool's own failures, JSON-RPC errors and invalid answers come back
        as an error answer. Raises McpUnavailable when the server is gone, breaks the
        connection or does not answer in time (the connection is then closed: a hung server may
        be wedged for good, and the next call starts it again)."""
        client = self._client
        spec = self.spec
        if client is None or self.broken:
            raise McpUnavailable(f"MCP server {spec.name!r} is not connected")
        try:
            result = await client.call_tool(
                tool, arguments, read_timeout_seconds=spec.call_timeout_s, meta={IDEMPOTENCY_KEY: key}
            )
        except MCPError as exc:
            if exc.code not in _UNAVAILABLE_CODES:
                return CallAnswer(text=f"{tool} failed: {exc.message} (MCP error {exc.code})", is_error=True)
            self.close()
            what = (f"did not answer {tool} within {spec.call_timeout_s:g}s" if exc.code == types.REQUEST_TIMEOUT
                    else f"closed the connection during {tool} (it exited or crashed)")
            raise McpUnavailable(f"MCP server {spec.name!r} {what}") from exc
        except _TRANSPORT_ERRORS as exc:
            self.close()
            raise McpUnavailable(f"MCP server {spec.name!r} broke the connection during {tool}: {_describe(exc)}") from exc
        except _INVALID_ANSWER as exc:
            return CallAnswer(text=f"{tool}: the server's answer is not a valid tool result: {exc}", is_error=True)
        return CallAnswer(text=render(result), is_error=bool(result.is_error))

    def _server(self) -> StdioServerParameters | str:
        spec = self.spec
        if spec.url is not None:
            return spec.url
        assert spec.command is not None  # the spec has exactly one of url and command
        return StdioServerParameters(command=spec.command, args=list(spec.args), env=dict(spec.env) or None, cwd=spec.cwd)


async def _list_tools(client: Client) -> list[ListedTool]:
    tools: list[ListedTool] = []
    cursor: str | None = None
    for _ in range(MAX_LIST_PAGES):
        page = await client.list_tools(cursor=cursor)
        tools += [
            ListedTool(name=t.name, description=t.description or t.title or "", input_schema=dict(t.input_schema))
            for t in page.tools
        ]
        cursor = page.next_cursor
        if cursor is None:
            break
    return tools


def render(result: types.CallToolResult) -> str:
    """A tool result as text for the model: its text blocks, a line naming each other block,
    or the structured content as JSON when there is nothing else; cut at MAX_ANSWER_CHARS."""
    parts: list[str] = []
    for block in result.content:
        if isinstance(block, types.TextContent):
            parts.append(block.text)
        elif isinstance(block, types.EmbeddedResource):
            resource = block.resource
            text = getattr(resource, "text", None)
            parts.append(text if isinstance(text, str) else f"[resource {resource.uri} ({resource.mime_type or 'binary'})]")
        elif isinstance(block, types.ResourceLink):
            parts.append(f"[resource link {block.uri}]")
        else:
            parts.append(f"[{block.type} content ({getattr(block, 'mime_type', '') or 'unknown type'}) not shown]")
    if not parts and result.structured_content is not None:
        parts.append(msgspec.json.encode(result.structured_content).decode())
    text = "\n".join(parts)
    if len(text) > MAX_ANSWER_CHARS:
        text = text[:MAX_ANSWER_CHARS] + f"\n… (cut: the answer has {len(text)} characters)"
    return text


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    message = exc.message if isinstance(exc, MCPError) else str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
