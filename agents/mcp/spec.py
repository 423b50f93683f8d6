"""Which MCP servers an LLM agent mounts, and how their tools are named to the model.

    class Clerk(LLMAgent):
        mcp_servers = (
            McpServerSpec(name="files", command="npx", args=("-y", "@modelcontextprotocol/server-filesystem", "/srv"),
                          allowed_tools=("read_file", "list_directory")),
            McpServerSpec(name="tickets", url="https://tickets.example/mcp", call_timeout_s=10.0),
        )

A server's tools reach the model as `<server>__<tool>` (`files__read_file`), so two servers may
offer tools of the same name, and a memory tool can never be shadowed. The model's tool names
must match `TOOL_NAME`; a server tool whose prefixed name would not is left out (with a
warning), never renamed behind the model's back.

Every call carries the step id of the call in the request's `_meta`, under `IDEMPOTENCY_KEY`:
the same on every attempt of the step. A server that keeps what it did under that key, and
answers a repeated key with the kept result, makes its effects exactly-once across crashes;
see agents.mcp.toolbox for the whole contract.

Nothing here imports the MCP SDK (an agent without MCP servers never loads it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

import msgspec

from agents.mcp.errors import McpConfigError
from schemas.payloads.llm import ToolResultBlock, ToolSpec, ToolUseBlock

# The request `_meta` key under which every tool call carries its idempotency key.
IDEMPOTENCY_KEY = "continuum/idempotency_key"
# Between a server's name and its tool's name in the model's tool list.
SEPARATOR = "__"
# What the Messages API accepts as a tool name.
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SERVER_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]|_(?!_))*")
MAX_SERVER_NAME = 24


class McpServerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One MCP server an agent mounts: started as a subprocess speaking stdio (`command`,
    `args`, `env` merged over a minimal inherited environment, `cwd`), or reached at a
    streamable HTTP `url`; exactly one of the two.

    `allowed_tools`: the server's tools offered to the model (None: every tool it lists).
    `call_timeout_s`: how long one tool call may take before it counts as a hung server
    (McpUnavailable: the server is started again for the next try). `connect_timeout_s`: how
    long each request of starting the server and listing its tools may take.

    Raises McpConfigError for a bad name, both or neither of command and url, or a timeout that
    is not positive.
    """

    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = {}
    cwd: str | None = None
    url: str | None = None
    allowed_tools: tuple[str, ...] | None = None
    call_timeout_s: float = 30.0
    connect_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        if len(self.name) > MAX_SERVER_NAME or not _SERVER_NAME.fullmatch(self.name) or self.name.endswith("_"):
            raise McpConfigError(
                f"MCP server name {self.name!r}: use 1-{MAX_SERVER_NAME} letters, digits, '-' or single '_' "
                f"(not at the end): it prefixes the server's tool names as '<name>{SEPARATOR}<tool>'"
            )
        if (self.command is None) == (self.url is None):
            raise McpConfigError(f"MCP server {self.name!r}: give exactly one of command= (stdio) and url= (HTTP)")
        if self.command is not None and not self.command.strip():
            raise McpConfigError(f"MCP server {self.name!r}: the command is empty")
        if self.call_timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise McpConfigError(f"MCP server {self.name!r}: timeouts must be positive")

    def tool_name(self, tool: str) -> str:
        """The name the model sees for the server's tool `tool`."""
        return f"{self.name}{SEPARATOR}{tool}"

    def allows(self, tool: str) -> bool:
        """Whether the server's tool `tool` is offered to the model."""
        return self.allowed_tools is None or tool in self.allowed_tools

    @property
    def target(self) -> str:
        """What is started or reached, for messages: the command line or the URL."""
        return self.url if self.url is not None else " ".join((self.command or "", *self.args))


def check_specs(specs: Sequence[McpServerSpec]) -> tuple[McpServerSpec, ...]:
    """The specs as a tuple. Raises McpConfigError when two servers share a name."""
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise McpConfigError(f"two MCP servers are named {spec.name!r}: each needs its own name (tool prefix)")
        seen.add(spec.name)
    return tuple(specs)


def owner(specs: Sequence[McpServerSpec], name: str) -> tuple[McpServerSpec, str] | None:
    """The mounted server a model tool name belongs to, and the server's own tool name; None
    when the name has no mounted server's prefix (a memory tool, or an unknown name)."""
    server, sep, tool = name.partition(SEPARATOR)
    if not sep:
        return None
    for spec in specs:
        if spec.name == server:
            return spec, tool
    return None


class MountedTools(Protocol):
    """What an LLM agent needs of its MCP tools: the specs to offer the model, whether a tool
    name is theirs, and a call answered with a tool result. Live servers (McpToolbox) and a
    replay's record (RecordedTools) both provide it."""

    def specs(self) -> list[ToolSpec]: ...

    def owns(self, name: str) -> bool: ...

    async def call(self, use: ToolUseBlock, *, key: str) -> ToolResultBlock: ...
