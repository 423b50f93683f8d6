"""How memory reads in a prompt and in tool results: one place for every text format.

Fact lines are also parsed back (`parse_fact_lines`): the offline model reads search results
the way a model would, so the format is a contract between the tools and that reader.

    [f0a1b2c3d4e5] subject=s | value=increases | confidence=0.70 | source=p01.f1 | by=reader | status=active | ...
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime

import msgspec

from agents.memory.archival import ContradictionState, FactState
from agents.memory.blocks import Block
from agents.memory.state import MemoryStats
from schemas.payloads.memory import ConversationSummarised, TurnRecorded

TURN_PREVIEW_CHARS = 300

# -- core memory ------------------------------------------------------------------------------


def render_block(block: Block) -> str:
    """One block: label, version, size against its limit, holders when shared, then the value."""
    attrs = f'label="{block.label}" version="{block.version}" chars="{len(block.value)}/{block.limit}"'
    if block.shared:
        attrs += f' shared_with="{",".join(block.holders)}"'
    if block.read_only:
        attrs += ' read_only="true"'
    head = f"<block {attrs}>"
    desc = f"({block.description})\n" if block.description else ""
    return f"{head}\n{desc}{block.value}\n</block>"


def render_core_memory(rendered_blocks: Iterable[str]) -> str:
    """The core-memory section from rendered blocks."""
    body = "\n".join(rendered_blocks)
    return (
        "<core_memory>\nYour core memory: always in context, current, and yours to edit with the "
        "core_memory_* tools.\n" + body + "\n</core_memory>"
    )


# -- out-of-window memory ---------------------------------------------------------------------


def render_metadata(stats: MemoryStats) -> str:
    """Counts of what lies outside the window, so the model knows what it can search."""
    outside = stats.turns - stats.turns_in_window
    facts = stats.facts
    return (
        "<memory_metadata>\n"
        f"conversation: {outside} earlier turns are in recall memory outside this window "
        f"(conversation_search finds them); {stats.summaries} summaries.\n"
        f"archival: {facts.total} facts ({facts.active} active, {facts.superseded} superseded, "
        f"{facts.retracted} retracted); {facts.open_contradictions} open contradictions "
        "(archival_search finds facts).\n"
        "</memory_metadata>"
    )


SUMMARIES_NOTE = (
    "Summaries of older turns, written when they left the window. They are older than your core "
    "memory: where a summary and core memory disagree, core memory is current."
)


def render_summaries(summaries: Iterable[ConversationSummarised]) -> str:
    """The labelled summaries section (empty string when there are none)."""
    items = [
        f'<summary turns="{s.first_turn}-{s.last_turn}" method="{s.method}"{_versions(s)}>\n{s.summary}\n</summary>'
        for s in summaries
    ]
    if not items:
        return ""
    return "<conversation_summaries>\n" + SUMMARIES_NOTE + "\n" + "\n".join(items) + "\n</conversation_summaries>"


def _versions(summary: ConversationSummarised) -> str:
    # The block versions current when the summary was written: older than what core memory shows.
    if not summary.block_versions:
        return ""
    pairs = ",".join(f"{label}:{version}" for label, version in sorted(summary.block_versions.items()))
    return f' written_at_block_versions="{pairs}"'


# -- tool results -----------------------------------------------------------------------------


def render_fact(state: FactState) -> str:
    """One fact as a single line (see the module docstring)."""
    f = state.fact
    status = state.status
    if state.ended_by:
        status += f" by {state.ended_by}"
    if state.contradictions:
        status += f" contradicted:{','.join(state.contradictions)}"
    statement = " ".join(f.statement.split())
    return (
        f"[{f.fact_id}] subject={f.subject} | value={f.value or '-'} | confidence={f.confidence:.2f} | "
        f"source={f.source.ref} | by={f.recorded_by} | status={status} | {statement}"
    )


class FactLine(msgspec.Struct, frozen=True, kw_only=True):
    """A fact line parsed back from text."""

    fact_id: str
    subject: str
    value: str
    confidence: float
    source: str
    recorded_by: str
    status: str
    statement: str


_FACT_LINE = re.compile(
    r"^\[(?P<id>[^\]]+)\] subject=(?P<subject>.*?) \| value=(?P<value>.*?) \| confidence=(?P<conf>[0-9.]+) \| "
    r"source=(?P<source>.*?) \| by=(?P<by>.*?) \| status=(?P<status>.*?) \| (?P<statement>.*)$"
)


def parse_fact_lines(text: str) -> list[FactLine]:
    """Every fact line in `text` (other lines are ignored)."""
    out = []
    for line in text.splitlines():
        m = _FACT_LINE.match(line.strip())
        if m:
            out.append(
                FactLine(
                    fact_id=m["id"],
                    subject=m["subject"],
                    value="" if m["value"] == "-" else m["value"],
                    confidence=float(m["conf"]),
                    source=m["source"],
                    recorded_by=m["by"],
                    status=m["status"],
                    statement=m["statement"],
                )
            )
    return out


def render_contradiction(state: ContradictionState) -> str:
    """One contradiction, both claims inline."""
    e = state.event
    status = "open" if state.open else f"resolved ({state.resolved_by} ended)"
    return (
        f"[{e.contradiction_id}] rule={e.rule} | by={e.actor} | {status} | "
        f"A {e.claim_a.fact_id} ({e.claim_a.source}, {e.claim_a.value or '-'}) vs "
        f"B {e.claim_b.fact_id} ({e.claim_b.source}, {e.claim_b.value or '-'}) on {e.claim_a.subject}"
    )


def render_turn(event: TurnRecorded) -> str:
    """One recalled turn: number, role, sender, time, and the start of its text."""
    who = event.role + (f" from {event.sender}" if event.sender else "")
    text = " ".join(event.text.split())
    if len(text) > TURN_PREVIEW_CHARS:
        text = text[:TURN_PREVIEW_CHARS] + "…"
    return f"[turn {event.turn} | {who} | {_iso(event.at)}] {text}"


def _iso(at: datetime) -> str:
    return at.isoformat(timespec="seconds")
