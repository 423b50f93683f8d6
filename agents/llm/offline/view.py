"""A read-only view of a request, as an offline policy needs it: who is asking (role, tools,
core blocks, directives in the system prompt), what the current task is, and which tool calls
were made for it so far with their results."""

from __future__ import annotations

import re
from functools import cached_property

import msgspec

from schemas.payloads.llm import Message, ModelRequest, TextBlock, ToolResultBlock, ToolUseBlock

_ROLE = re.compile(r"^Role:\s*(\S+)\s*$", re.M)
_BLOCK = re.compile(r'<block label="(?P<label>[^"]+)" version="\d+" chars="(?P<chars>\d+)/(?P<limit>\d+)"')


class BlockInfo(msgspec.Struct, frozen=True):
    """A core block as the prompt shows it."""

    label: str
    chars: int
    limit: int


class ToolCall(msgspec.Struct, frozen=True):
    """A call a policy wants to make (the model assigns the id)."""

    name: str
    input: dict


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """What a policy answers: text, tool calls, or both."""

    text: str = ""
    calls: list[ToolCall] = []


class RequestView:
    """Parsed facts about one request."""

    def __init__(self, request: ModelRequest) -> None:
        self.request = request
        self.system_text = "\n".join(b.text for b in request.system)
        self.tools = frozenset(t.name for t in request.tools)

    @cached_property
    def role(self) -> str | None:
        """The agent's role, from the "Role: <role>" line the context compiler writes."""
        m = _ROLE.search(self.system_text)
        return m.group(1) if m else None

    def directive(self, name: str) -> str | None:
        """The value of a "<name>: <value>" line in the system prompt (one token), or None."""
        m = re.search(rf"^{re.escape(name)}:\s*(\S+)\s*$", self.system_text, re.M | re.I)
        return m.group(1) if m else None

    @cached_property
    def blocks(self) -> dict[str, BlockInfo]:
        """Core blocks shown in the prompt, by label."""
        return {
            m["label"]: BlockInfo(m["label"], int(m["chars"]), int(m["limit"]))
            for m in _BLOCK.finditer(self.system_text)
        }

    @cached_property
    def _task_index(self) -> int:
        # The newest user message that is a new task: it has text and answers no tool call.
        for i in range(len(self.request.messages) - 1, -1, -1):
            m = self.request.messages[i]
            if m.role == "user" and not _results(m) and _text(m):
                return i
        return -1

    @property
    def task_text(self) -> str:
        """The text of the current task ("" when there is none)."""
        i = self._task_index
        return _text(self.request.messages[i]) if i >= 0 else ""

    @cached_property
    def calls(self) -> list[ToolUseBlock]:
        """Tool calls made since the task, in order."""
        out: list[ToolUseBlock] = []
        for m in self.request.messages[self._task_index + 1 :]:
            if m.role == "assistant":
                out.extend(b for b in m.content if isinstance(b, ToolUseBlock))
        return out

    @cached_property
    def results(self) -> dict[str, ToolResultBlock]:
        """Tool results since the task, by tool_use_id."""
        out: dict[str, ToolResultBlock] = {}
        for m in self.request.messages[self._task_index + 1 :]:
            if m.role == "user":
                out.update({b.tool_use_id: b for b in _results(m)})
        return out

    def called(self, name: str) -> list[tuple[ToolUseBlock, ToolResultBlock | None]]:
        """Calls of tool `name` since the task, each with its result (None if unanswered)."""
        return [(c, self.results.get(c.id)) for c in self.calls if c.name == name]

    @property
    def names_called(self) -> set[str]:
        return {c.name for c in self.calls}


def _text(message: Message) -> str:
    return "\n".join(b.text for b in message.content if isinstance(b, TextBlock))


def _results(message: Message) -> list[ToolResultBlock]:
    return [b for b in message.content if isinstance(b, ToolResultBlock)]
