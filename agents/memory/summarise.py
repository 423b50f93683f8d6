"""Summaries of turns leaving the context window.

The default summariser is extractive and deterministic: one line per turn (who, the start of
what was said, which tools were called and whether they failed), bounded to `max_chars` by
keeping the first and last lines. No model call sits on the compile path, so eviction cannot
fail, stall or cost money; an LLM summariser can refine a summary later, off the critical path,
by recording a newer `memory.conversation.summarised` for the same range.

A summary never quotes tool inputs: those carry block edits, and a summary that repeated an old
block value could later be mistaken for the block's current content.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Protocol

from schemas.payloads.llm import TextBlock, ToolResultBlock, ToolUseBlock
from schemas.payloads.memory import TurnRecorded

LINE_CHARS = 160


class Summariser(Protocol):
    """Turns → summary text of at most `max_chars` characters. Must be pure and fast."""

    method: str

    def __call__(self, turns: Sequence[TurnRecorded], *, max_chars: int) -> str: ...


class ExtractiveSummariser:
    """One line per turn, head and tail kept when over budget."""

    method = "extractive-v1"

    def __call__(self, turns: Sequence[TurnRecorded], *, max_chars: int) -> str:
        lines = [_turn_line(t) for t in turns]
        return _bounded(lines, max_chars)


def _turn_line(turn: TurnRecorded) -> str:
    who = turn.role if not turn.sender or turn.sender == turn.agent else f"{turn.role} ({turn.sender})"
    if turn.content:
        texts = [b.text for b in turn.content if isinstance(b, TextBlock)]
        calls = Counter(b.name for b in turn.content if isinstance(b, ToolUseBlock))
        results = [b for b in turn.content if isinstance(b, ToolResultBlock)]
    else:
        texts, calls, results = [turn.text], Counter(), []
    parts: list[str] = []
    said = " ".join(" ".join(texts).split())
    if said:
        parts.append(said[:LINE_CHARS] + ("…" if len(said) > LINE_CHARS else ""))
    if calls:
        parts.append("called " + ", ".join(f"{name}×{n}" if n > 1 else name for name, n in sorted(calls.items())))
    if results:
        errors = sum(1 for r in results if r.is_error)
        parts.append(f"{len(results)} tool results" + (f" ({errors} errors)" if errors else ""))
    return f"- t{turn.turn} {who}: " + ("; ".join(parts) or "(empty)")


def _bounded(lines: list[str], max_chars: int) -> str:
    text = "\n".join(lines)
    if len(text) <= max_chars:
        return text
    head: list[str] = []
    tail: list[str] = []
    budget = max_chars - 40  # room for the omission marker
    i, j = 0, len(lines) - 1
    # Alternate head and tail so both ends of the range stay visible.
    while i <= j:
        line = lines[i] if len(head) <= len(tail) else lines[j]
        if budget - len(line) - 1 < 0:
            break
        budget -= len(line) + 1
        if len(head) <= len(tail):
            head.append(line)
            i += 1
        else:
            tail.append(line)
            j -= 1
    omitted = j - i + 1
    marker = [f"… {omitted} turns omitted …"] if omitted > 0 else []
    out = "\n".join(head + marker + list(reversed(tail)))
    return out[:max_chars]
