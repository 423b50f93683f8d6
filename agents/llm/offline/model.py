"""`OfflineModel`: a deterministic stand-in for Claude, with no network.

It answers in the Messages-API shape (text and tool_use blocks, stop_reason, usage), so agent
code runs the same path as with Claude. What it answers comes from rule-based policies that
read the request as a model would: the role line and directives in the system prompt, the core
blocks shown, the tools offered, the task in the last user message, and the tool results so
far. The first policy that decides wins; otherwise it acknowledges the task in one line.

Same request, same response: ids are derived from the request's fingerprint, and no policy
reads the clock or a random source.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from agents.llm.model import request_fingerprint
from agents.llm.offline.view import Decision, RequestView
from agents.llm.validate import validate_request
from agents.memory.tokens import request_tokens, tokens_for_chars
from schemas.payloads.llm import ModelRequest, ModelResponse, TextBlock, ToolUseBlock, Usage

OFFLINE_MODEL = "offline"


class Policy(Protocol):
    """Decides an answer for a request, or returns None to let the next policy try."""

    def decide(self, view: RequestView) -> Decision | None: ...


class OfflineModel:
    """`Model` answering from `policies` (default: the research-team policy)."""

    provider = "offline"

    def __init__(self, policies: Sequence[Policy] | None = None) -> None:
        if policies is None:
            from agents.llm.offline.research import ResearchPolicy

            policies = (ResearchPolicy(),)
        self.policies = tuple(policies)

    async def complete(self, request: ModelRequest) -> ModelResponse:
        """The policies' answer to `request`. Raises BadModelRequest for a request the API
        would refuse (see agents.llm.validate), exactly as with Claude."""
        return self.answer(request)

    def answer(self, request: ModelRequest) -> ModelResponse:
        """Synchronous `complete`."""
        validate_request(request)
        view = RequestView(request)
        decision = None
        for policy in self.policies:
            decision = policy.decide(view)
            if decision is not None:
                break
        if decision is None or (not decision.text and not decision.calls):
            decision = Decision(text=_acknowledge(view))
        # Tools that are not offered are never called: a real model cannot call them either.
        calls = [c for c in decision.calls if c.name in view.tools]
        key = request_fingerprint(request)
        content: list = []
        if decision.text:
            content.append(TextBlock(text=decision.text))
        content += [
            ToolUseBlock(id=f"toolu_off_{key[:20]}_{i}", name=c.name, input=c.input) for i, c in enumerate(calls)
        ]
        output_chars = sum(len(b.text) if isinstance(b, TextBlock) else len(str(b.input)) for b in content)
        return ModelResponse(
            id=f"msg_off_{key[:24]}",
            model=OFFLINE_MODEL,
            content=content,
            stop_reason="tool_use" if calls else "end_turn",
            usage=Usage(input_tokens=request_tokens(request), output_tokens=max(1, tokens_for_chars(output_chars))),
        )


def _acknowledge(view: RequestView) -> str:
    task = " ".join(view.task_text.split())
    if not task:
        return "Nothing to do."
    preview = task[:200] + ("…" if len(task) > 200 else "")
    return f"Noted ({view.role or 'agent'}): {preview}"
