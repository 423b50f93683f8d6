"""The Messages API's structural rules, checked locally.

Both models run this before answering, so a malformed conversation (an orphaned tool result, a
window starting with the assistant) fails the same way offline as against Claude, with a message
that says which message is wrong instead of a bare 400.
"""

from __future__ import annotations

from agents.llm.errors import BadModelRequest
from schemas.payloads.llm import ModelRequest, ToolResultBlock, ToolUseBlock


def request_problems(request: ModelRequest) -> list[str]:
    """Every structural problem of `request` (empty when it is well formed)."""
    problems: list[str] = []
    messages = request.messages
    if request.max_tokens < 1:
        problems.append("max_tokens must be at least 1")
    if not messages:
        return problems + ["there are no messages"]
    if messages[0].role != "user":
        problems.append("the first message must be from the user")
    if messages[-1].role != "user":
        problems.append("the last message must be from the user (no assistant prefill)")
    seen_ids: set[str] = set()
    uses_tools = False
    for i, message in enumerate(messages):
        if i and message.role == messages[i - 1].role:
            problems.append(f"messages {i - 1} and {i} are both from the {message.role}")
        if not message.content:
            problems.append(f"message {i} is empty")
        uses = [b for b in message.content if isinstance(b, ToolUseBlock)]
        results = [b for b in message.content if isinstance(b, ToolResultBlock)]
        uses_tools = uses_tools or bool(uses or results)
        if uses and message.role != "assistant":
            problems.append(f"message {i}: tool_use blocks belong to the assistant")
        if results and message.role != "user":
            problems.append(f"message {i}: tool_result blocks belong to the user")
        if results and not all(isinstance(b, ToolResultBlock) for b in message.content[: len(results)]):
            problems.append(f"message {i}: tool_result blocks must come first")
        for use in uses:
            if use.id in seen_ids:
                problems.append(f"message {i}: tool_use id {use.id} is repeated")
            seen_ids.add(use.id)
        if results:
            previous = messages[i - 1] if i else None
            asked = {b.id for b in previous.content if isinstance(b, ToolUseBlock)} if previous else set()
            for result in results:
                if result.tool_use_id not in asked:
                    problems.append(
                        f"message {i}: tool_result {result.tool_use_id} answers no tool_use of message {i - 1}"
                    )
        if uses and i + 1 < len(messages):
            answered = {b.tool_use_id for b in messages[i + 1].content if isinstance(b, ToolResultBlock)}
            missing = [u.id for u in uses if u.id not in answered]
            if missing:
                problems.append(f"message {i}: tool_use {', '.join(missing)} not answered in message {i + 1}")
    if uses_tools and not request.tools:
        problems.append("the conversation uses tools but the request offers none")
    return problems


def validate_request(request: ModelRequest) -> None:
    """Raise BadModelRequest listing the problems of a malformed request."""
    problems = request_problems(request)
    if problems:
        raise BadModelRequest("malformed request: " + "; ".join(problems))
