"""LLM calls: the Messages-API request and response shapes, and the events that record a call.

The request/response Structs mirror Anthropic's Messages API (system, messages of content
blocks, tools, max_tokens; response content, stop_reason, usage), so that the full payload of
every call can be stored in the log and replayed byte for byte. They are plain Structs (not
payloads); `LlmCallCompleted` and `LlmCallFailed` are the events.

`cache=True` on a text block or a tool marks a prompt-cache breakpoint: everything up to and
including it is the stable prefix the provider may cache.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from schemas.envelope import Payload

# -- content blocks (tag field "type", as on the wire) ---------------------------------------


class TextBlock(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type", tag="text"):
    """Plain text. In `system` or a message."""

    text: str
    cache: bool = False


class ThinkingBlock(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="thinking"):
    """The model's visible reasoning. Passed back verbatim (with its signature) in a tool loop."""

    thinking: str
    signature: str


class RedactedThinkingBlock(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="redacted_thinking"):
    """Encrypted reasoning; opaque, passed back verbatim."""

    data: str


class ToolUseBlock(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="tool_use"):
    """The model asks for a tool call. `id` pairs it with the `ToolResultBlock` that answers it."""

    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type", tag="tool_result"
):
    """The answer to one `ToolUseBlock`, sent in the next user message."""

    tool_use_id: str
    content: str
    is_error: bool = False


ContentBlock = TextBlock | ThinkingBlock | RedactedThinkingBlock | ToolUseBlock | ToolResultBlock
ResponseBlock = TextBlock | ThinkingBlock | RedactedThinkingBlock | ToolUseBlock

# -- request ----------------------------------------------------------------------------------


class Message(msgspec.Struct, frozen=True, kw_only=True):
    """One conversation message. Roles alternate; a user message answers tool calls with
    `ToolResultBlock`s."""

    role: Literal["user", "assistant"]
    content: list[ContentBlock]


class ToolSpec(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A tool offered to the model: name, what it does, and the JSON Schema of its input."""

    name: str
    description: str
    input_schema: dict[str, Any]
    cache: bool = False


class ModelRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One Messages-API call. `temperature` is sent only when set (newer models reject
    non-default sampling parameters)."""

    model: str
    max_tokens: int
    messages: list[Message]
    system: list[TextBlock] = []
    tools: list[ToolSpec] = []
    temperature: float | None = None
    stop_sequences: list[str] = []


# -- response ---------------------------------------------------------------------------------


class Usage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Tokens billed for one call. Total input = input + cache writes + cache reads."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    # The part of `cache_creation_input_tokens` written with the 1-hour TTL (priced higher).
    cache_creation_1h_input_tokens: int = 0


class ModelResponse(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What the model answered. `stop_reason` is "tool_use" when it wants tool results next."""

    id: str
    model: str
    content: list[ResponseBlock]
    stop_reason: str
    usage: Usage
    stop_sequence: str | None = None

    @property
    def text(self) -> str:
        """The text blocks joined by blank lines."""
        return "\n\n".join(b.text for b in self.content if isinstance(b, TextBlock))

    @property
    def tool_uses(self) -> list[ToolUseBlock]:
        """The tool calls, in order."""
        return [b for b in self.content if isinstance(b, ToolUseBlock)]

    def as_message(self) -> Message:
        """This answer as the assistant message to send back in the next request."""
        return Message(role="assistant", content=list(self.content))


# -- events -----------------------------------------------------------------------------------


class LlmCallCompleted(Payload, frozen=True, kw_only=True, omit_defaults=True, tag="llm.call.completed"):
    """One model call that returned: the full request and response, latency and cost.

    `request_sha256` fingerprints the canonical request encoding, so a replay can find the
    recorded response for the same request. `cost_usd` is None when the model has no price.
    """

    agent: str
    call_id: str
    provider: str
    model: str
    request: ModelRequest
    response: ModelResponse
    request_sha256: str
    latency_ms: float
    cost_usd: float | None = None
    step: str = ""


class LlmCallFailed(Payload, frozen=True, kw_only=True, omit_defaults=True, tag="llm.call.failed"):
    """One model call that raised, with the request that failed and how (`error_type` is the
    name of the error class in agents.llm.errors; `retryable` says whether a redelivery may
    succeed)."""

    agent: str
    call_id: str
    provider: str
    model: str
    request: ModelRequest
    request_sha256: str
    error_type: str
    message: str
    retryable: bool
    latency_ms: float
    status_code: int | None = None
    step: str = ""
