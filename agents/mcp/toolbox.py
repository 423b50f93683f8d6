"""`McpToolbox`: the MCP servers one LLM agent mounts, live: their tools offered to the model,
and calls, each answered with a tool result.

    async with McpToolbox(specs) as toolbox:       # starts every server, lists its tools
        request tools: memory tool specs + toolbox.specs()
        result = await toolbox.call(tool_use, key=ctx.step_id)   # inside the tool's step

The agent runs each call inside its `tool:<round>.<i>:<name>` step, so the result is recorded
and a redelivered message, a restarted process or `bus replay` gets the recorded result back
and never calls the server again.

The idempotency contract. A step records its result after the call returns, so a process killed
between the server's effect and that record calls again on the redelivery. Every call therefore
carries the step id in the request's `_meta` under `continuum/idempotency_key`: the same key on
every attempt of that step, and a different key for every other call. A server that keeps what
it did under the key (atomically with the effect) and answers a repeated key with the kept
result gives effects that happen exactly once. A server that ignores the key gives effects that
happen at least once: once normally, twice if the process died in that window.

Errors, by what happens next:
    the tool answers `isError`, refuses the arguments (JSON-RPC error), or answers something
    that is not a valid tool result; the name is unknown or not allowed
        -> a tool result with is_error, recorded: the model reads it and may correct itself
    the server cannot be started, exits or crashes, breaks the connection, or does not answer
    within `call_timeout_s`
        -> McpUnavailable (a RetryableError), the connection closed: the next call starts the
           server again. An LLMAgent tries again within the step, up to its `mcp_attempts`,
           then records an is_error result saying the outcome is unknown (a redelivered message
           would let the next message's turn in between the call and its result)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from contextlib import AsyncExitStack
from types import TracebackType

from agents.mcp.connection import ListedTool, McpConnection
from agents.mcp.spec import TOOL_NAME, McpServerSpec, check_specs, owner
from schemas.payloads.llm import ToolResultBlock, ToolSpec, ToolUseBlock

log = logging.getLogger("continuum.agents.mcp")


class McpToolbox:
    """Live MCP servers for one agent (an async context manager; see the module docstring).

    Entering starts every server in order and lists its tools; it raises McpUnavailable when
    one cannot be started (the ones already started are stopped again). Leaving stops them all,
    each within the SDK's bounded shutdown (stdin closed, then SIGTERM, then SIGKILL).
    """

    def __init__(self, specs: Sequence[McpServerSpec]) -> None:
        self._specs = check_specs(specs)
        self._connections: dict[str, McpConnection] = {}
        self._locks = {spec.name: asyncio.Lock() for spec in self._specs}
        # Server name -> model tool name -> the server's tool: what the model is offered.
        self._offered: dict[str, dict[str, ListedTool]] = {}
        self._tool_specs: list[ToolSpec] = []
        self._tasks: asyncio.TaskGroup | None = None
        self._stack: AsyncExitStack | None = None

    async def __aenter__(self) -> McpToolbox:
        stack = AsyncExitStack()
        # Owns every connection task; leaving it waits for their servers to stop.
        self._tasks = await stack.enter_async_context(asyncio.TaskGroup())
        stack.callback(self._close_all)  # runs first on the way out: the tasks end, the group returns
        try:
            for spec in self._specs:
                await self._connect(spec)
        except BaseException:
            # Leave the group without the error (asyncio would wrap it in an ExceptionGroup).
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    def specs(self) -> list[ToolSpec]:
        """The tools offered to the model, in the order of the specs, then of each listing."""
        return list(self._tool_specs)

    def connection(self, server: str) -> McpConnection | None:
        """The live connection to the server named `server` (None when it is not connected),
        for measurements and diagnostics; calls go through `call`."""
        connection = self._connections.get(server)
        return connection if connection is not None and not connection.broken else None

    def owns(self, name: str) -> bool:
        """Whether a model tool name belongs to a mounted server (offered or not)."""
        return owner(self._specs, name) is not None

    async def call(self, use: ToolUseBlock, *, key: str) -> ToolResultBlock:
        """Call the tool `use` names with its input and the idempotency key `key` (the step id).

        Returns the tool's result, or an is_error result for an unknown or not allowed tool and
        for what the tool or server refuses. Raises McpUnavailable (see the module docstring).
        """
        found = owner(self._specs, use.name)
        listed = self._offered.get(found[0].name, {}).get(use.name) if found is not None else None
        if found is None or listed is None:
            return _refused(use, self._unknown(use.name, found))
        spec, _ = found
        connection = await self._live(spec)
        answer = await connection.call(listed.name, dict(use.input), key=key)
        return ToolResultBlock(tool_use_id=use.id, content=answer.text, is_error=answer.is_error)

    async def _live(self, spec: McpServerSpec) -> McpConnection:
        connection = self._connections.get(spec.name)
        if connection is not None and not connection.broken:
            return connection
        async with self._locks[spec.name]:
            connection = self._connections.get(spec.name)
            if connection is None or connection.broken:
                log.info("MCP server %r: starting it again (%s)", spec.name, spec.target)
                connection = await self._connect(spec)
        return connection

    async def _connect(self, spec: McpServerSpec) -> McpConnection:
        if self._tasks is None:
            raise RuntimeError("McpToolbox used outside `async with`")
        old = self._connections.pop(spec.name, None)
        if old is not None:
            old.close()  # its task stops the old server in the background; the task group waits for it
        connection = McpConnection(spec)
        connection.start(self._tasks)
        await connection.ready()
        self._connections[spec.name] = connection
        self._offer(spec, connection.tools)
        return connection

    def _offer(self, spec: McpServerSpec, listed: list[ListedTool]) -> None:
        """Offer the server's allowed tools (a new listing after a restart replaces the old)."""
        offered: dict[str, ListedTool] = {}
        for tool in listed:
            name = spec.tool_name(tool.name)
            if not spec.allows(tool.name):
                continue
            if not TOOL_NAME.fullmatch(name):
                log.warning("MCP server %r: tool %r left out: %r is not a valid model tool name", spec.name, tool.name, name)
                continue
            offered[name] = tool
        for missing in sorted(set(spec.allowed_tools or ()) - {t.name for t in listed}):
            log.warning("MCP server %r does not offer the allowed tool %r", spec.name, missing)
        self._offered[spec.name] = offered
        self._tool_specs = [
            ToolSpec(name=name, description=tool.description, input_schema=tool.input_schema)
            for s in self._specs for name, tool in self._offered.get(s.name, {}).items()
        ]

    def _unknown(self, name: str, found: tuple[McpServerSpec, str] | None) -> str:
        if found is None:
            return f"unknown tool {name!r}: no MCP server of this agent is named by its prefix"
        spec, tool = found
        connection = self._connections.get(spec.name)
        listed = {t.name for t in connection.tools} if connection is not None else set()
        offered = ", ".join(self._offered.get(spec.name, {})) or "none"
        if tool in listed:
            return f"tool {name!r} is not allowed for this agent; allowed tools of {spec.name!r}: {offered}"
        return f"unknown tool {name!r}: MCP server {spec.name!r} offers {offered}"

    def _close_all(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()


def _refused(use: ToolUseBlock, text: str) -> ToolResultBlock:
    return ToolResultBlock(tool_use_id=use.id, content=text, is_error=True)
