"""One line per meaningful event of the log, for watching the team work.

    researcher   fact           p01.f1  fec:capacity-retention = increases  (confidence 0.70)
    synthesiser  contradiction  p14.f1 (decreases) vs p03.f2 (increases) on fec:gas-evolution
    writer       → reviewer     Report for day 1: 15 new findings ...
    writer       closed         main up to turn 8: idle 1d 0h > ttl 12h (summarised)

Heartbeats, steps, turns and delivery reports are left out: they are in the log and the views.
"""

from __future__ import annotations

from typing import Any

from agents.llm_agent.logread import StoredEvent
from schemas.payloads import (
    AgentCrashed,
    AgentRestarted,
    AgentStarted,
    BlockAppended,
    BlockCreated,
    BlockReplaced,
    BlockSet,
    ContradictionFlagged,
    ConversationClosed,
    DeadLettered,
    FactRecorded,
    LlmCallCompleted,
    LlmCallFailed,
    Note,
)

WIDTH = 12


def describe(stored: StoredEvent) -> str | None:
    """The line for one stored envelope, or None when it is not worth a line."""
    env = stored.envelope
    p: Any = env.payload
    who = env.sender.ljust(WIDTH)
    match p:
        case FactRecorded():
            return f"{who} fact           {p.source.ref:<8} {p.subject} = {p.value or '-'}  (confidence {p.confidence:.2f})"
        case ContradictionFlagged():
            a, b = p.claim_a, p.claim_b
            return (f"{who} contradiction  {b.source} ({b.value}) vs {a.source} ({a.value}) "
                    f"on {b.subject.split('@')[0]}")
        case BlockCreated():
            return f"{who} block          {p.label} created ({p.limit} chars, holders {', '.join(p.holders)})"
        case BlockSet() | BlockAppended() | BlockReplaced():
            first = p.value.splitlines()[-1] if isinstance(p, BlockAppended) else p.value.splitlines()[0]
            return f"{who} block          {p.block_id} v{p.version} ({len(p.value)} chars): {_clip(first, 70)}"
        case LlmCallCompleted():
            r = p.response
            tools = [b.name for b in r.tool_uses]
            what = f"tool_use {_counts(tools)}" if tools else r.stop_reason or "end_turn"
            return (f"{who} llm            {p.model}: {r.usage.input_tokens:,} in / {r.usage.output_tokens:,} out, "
                    f"{what} ({p.latency_ms:.0f} ms)")
        case ConversationClosed():
            summarised = " (summarised)" if p.summary_id else ""
            return f"{who} closed         {p.conversation} up to turn {p.last_turn}: {p.reason}{summarised}"
        case LlmCallFailed():
            return f"{who} llm FAILED     {p.error_type}: {_clip(p.message, 80)}"
        case Note() if env.to is not None:
            first = next((line for line in p.text.splitlines() if line.strip()), "")
            shown = f"{who} → {env.to:<12} {_clip(first, 90)}"
            # A review's corrections are the point of the loop: each on a line of its own.
            fixes = [line.strip() for line in p.text.splitlines() if line.strip().startswith("- correction [")]
            return "\n".join([shown, *(f"{'':<{WIDTH + 18}}{_clip(fix, 110)}" for fix in fixes)])
        case AgentStarted():
            return f"{p.agent.ljust(WIDTH)} started        pid {p.pid}"
        case AgentCrashed():
            how = p.signal or f"exit {p.exit_code}"
            return f"{p.agent.ljust(WIDTH)} CRASHED        pid {p.pid} ({how})"
        case AgentRestarted():
            return f"{p.agent.ljust(WIDTH)} restarted      pid {p.pid} after {p.delay_s:.2f}s"
        case DeadLettered():
            return f"{env.sender.ljust(WIDTH)} dead letter    {_clip(str(getattr(p, 'reason', '')), 80)}"
    return None


def _counts(names: list[str]) -> str:
    seen: dict[str, int] = {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
    return ", ".join(f"{n}×{c}" if c > 1 else n for n, c in seen.items())


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
