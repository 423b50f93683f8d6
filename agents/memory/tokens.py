"""A cheap, deterministic token estimate: characters divided by `chars_per_token`, rounded up.

Why not a tokenizer: the context compiler runs before every model call and must stay well under
10 ms; an exact count would need the provider's tokenizer (not public for current models) or a
network round trip. English prose is about 4 characters per token on older Claude tokenizers and
about 30% more tokens on the newer ones (Claude 4.7 and later), so the default of 3.0 characters
per token over-estimates: the window is evicted a little early rather than overflowing. The
`usage.input_tokens` of each recorded call shows the real count, to tune the ratio per model.

Fixed overheads: each message costs a few tokens of framing, and offering tools adds a
provider-side system prompt of a few hundred tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import msgspec

from schemas.payloads.llm import (
    ContentBlock,
    ModelRequest,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
)

DEFAULT_CHARS_PER_TOKEN = 3.0
MESSAGE_OVERHEAD_TOKENS = 4
TOOLS_OVERHEAD_TOKENS = 350

_json = msgspec.json.Encoder()


def tokens_for_chars(chars: int, chars_per_token: float = DEFAULT_CHARS_PER_TOKEN) -> int:
    """Estimated tokens for `chars` characters (0 for none)."""
    return math.ceil(chars / chars_per_token) if chars > 0 else 0


def block_chars(block: ContentBlock) -> int:
    """Characters a content block contributes to the prompt (tool inputs as compact JSON)."""
    match block:
        case TextBlock(text=text):
            return len(text)
        case ToolUseBlock(name=name, input=input_):
            return len(name) + len(_json.encode(input_)) + 16
        case ToolResultBlock(content=content):
            return len(content) + 16
        case ThinkingBlock(thinking=thinking):
            return len(thinking)
        case RedactedThinkingBlock(data=data):
            return len(data) // 2
    return 0


def content_chars(blocks: Iterable[ContentBlock]) -> int:
    """Characters of a list of content blocks."""
    return sum(block_chars(b) for b in blocks)


def tools_chars(tools: Iterable[ToolSpec]) -> int:
    """Characters of tool definitions as sent (name, description, JSON schema)."""
    return sum(len(t.name) + len(t.description) + len(_json.encode(t.input_schema)) for t in tools)


def request_tokens(request: ModelRequest, chars_per_token: float = DEFAULT_CHARS_PER_TOKEN) -> int:
    """Estimated input tokens of a whole request."""
    chars = sum(len(b.text) for b in request.system) + tools_chars(request.tools)
    chars += sum(content_chars(m.content) for m in request.messages)
    overhead = MESSAGE_OVERHEAD_TOKENS * len(request.messages)
    if request.tools:
        overhead += TOOLS_OVERHEAD_TOKENS
    return tokens_for_chars(chars, chars_per_token) + overhead
