"""A recorded model request split into what the model saw, part by part, with token counts.

The parts, in the order of the request (the layout the context compiler writes, see
agents/memory/context.py): the tools offered, the system prompt, core memory (one part per
block), memory metadata, conversation summaries, then each message of the window. Text outside
the known sections stays a part of its own, so nothing the model saw is left out.

Token counts are estimates by the same rule the context compiler budgets with (characters / 3,
rounded up, a few tokens of framing per message and a fixed cost for offering tools); the
model's own count for the whole request (`input_tokens`) is shown beside them.
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgspec

from schemas.payloads.llm import (
    ModelRequest,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
)

# The context compiler's estimate (agents.memory.tokens), restated here: the console sits below
# the agents layer and reads only recorded data.
CHARS_PER_TOKEN = 3.0
MESSAGE_OVERHEAD_TOKENS = 4
TOOLS_OVERHEAD_TOKENS = 350

_SECTION = re.compile(r"<(core_memory|memory_metadata|conversation_summaries)>(.*?)</\1>", re.S)
_BLOCK = re.compile(r'<block label="([^"]*)"[^>]*>.*?</block>', re.S)
_NAMES = {"core_memory": "core memory", "memory_metadata": "memory metadata", "conversation_summaries": "summaries"}
_json = msgspec.json.Encoder()
_BLOCK_NAMES = {
    TextBlock: "text", ToolUseBlock: "tool_use", ToolResultBlock: "tool_result", ThinkingBlock: "thinking",
    RedactedThinkingBlock: "redacted_thinking",
}


class Part(msgspec.Struct, frozen=True, kw_only=True):
    """One part of the context: what it is, its text as sent, characters and estimated tokens."""

    section: str  # tools, system, core memory, block, memory metadata, summaries, message
    label: str
    text: str
    chars: int
    tokens: int


class ContextWindow(msgspec.Struct, frozen=True, kw_only=True):
    """The parts, their estimated total, and why the request could not be read (if it could not)."""

    parts: list[Part]
    estimated_tokens: int
    error: str | None = None


def tokens_for(chars: int) -> int:
    """Estimated tokens for `chars` characters."""
    return math.ceil(chars / CHARS_PER_TOKEN) if chars > 0 else 0


def context_window(request: Any) -> ContextWindow:
    """Split a recorded request (its JSON, decoded) into parts. Never raises: a request that is
    not a model request is one part, its raw JSON, with `error` saying why."""
    try:
        typed = msgspec.convert(request, ModelRequest)
    except (msgspec.ValidationError, TypeError) as exc:
        text = _json.encode(request).decode(errors="replace")
        return ContextWindow(
            parts=[_part("raw", "request", text)], estimated_tokens=tokens_for(len(text)),
            error=f"not a model request: {exc}",
        )
    parts: list[Part] = []
    if typed.tools:
        text = "\n".join(f"{t.name}: {t.description}\n{_json.encode(t.input_schema).decode()}" for t in typed.tools)
        chars = sum(len(t.name) + len(t.description) + len(_json.encode(t.input_schema)) for t in typed.tools)
        parts.append(Part(section="tools", label=f"{len(typed.tools)} tools", text=text, chars=chars,
                          tokens=tokens_for(chars) + TOOLS_OVERHEAD_TOKENS))
    for block in typed.system:
        parts.extend(_system_parts(block.text))
    for number, message in enumerate(typed.messages, 1):
        text, chars = _message_text(message.content)
        kinds = sorted({_BLOCK_NAMES.get(type(b), "other") for b in message.content})
        parts.append(Part(section="message", label=f"{number}. {message.role} ({', '.join(kinds)})", text=text,
                          chars=chars, tokens=tokens_for(chars) + MESSAGE_OVERHEAD_TOKENS))
    return ContextWindow(parts=parts, estimated_tokens=sum(p.tokens for p in parts))


def _part(section: str, label: str, text: str) -> Part:
    return Part(section=section, label=label, text=text, chars=len(text), tokens=tokens_for(len(text)))


def _system_parts(text: str) -> list[Part]:
    parts: list[Part] = []
    at = 0
    for match in _SECTION.finditer(text):
        before = text[at:match.start()]
        if before.strip():
            parts.append(_part("system", "system prompt", before))
        name = match.group(1)
        if name == "core_memory":
            blocks = list(_BLOCK.finditer(match.group(0)))
            whole = match.group(0)
            # The section's own words: before the first block and after the last.
            frame = whole[:blocks[0].start()] + whole[blocks[-1].end():] if blocks else whole
            parts.append(_part("core memory", "core memory", frame))
            parts.extend(_part("block", f"block {b.group(1)}", b.group(0)) for b in blocks)
        else:
            parts.append(_part(_NAMES[name], _NAMES[name], match.group(0)))
        at = match.end()
    rest = text[at:]
    if rest.strip():
        parts.append(_part("system", "system prompt", rest))
    return parts


def _message_text(content: list[Any]) -> tuple[str, int]:
    """The message as readable text, and the characters it counts for (as the compiler counts)."""
    lines: list[str] = []
    chars = 0
    for block in content:
        match block:
            case TextBlock(text=text):
                lines.append(text)
                chars += len(text)
            case ToolUseBlock(name=name, input=input_):
                encoded = _json.encode(input_).decode()
                lines.append(f"→ {name}({encoded})")
                chars += len(name) + len(encoded) + 16
            case ToolResultBlock(content=result, is_error=is_error):
                lines.append(("← error: " if is_error else "← ") + result)
                chars += len(result) + 16
            case ThinkingBlock(thinking=thinking):
                lines.append(f"(thinking) {thinking}")
                chars += len(thinking)
            case RedactedThinkingBlock(data=data):
                lines.append("(redacted thinking)")
                chars += len(data) // 2
    return "\n".join(lines), chars
