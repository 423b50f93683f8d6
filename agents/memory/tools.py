"""Memory tools offered to the model: JSON schemas, and executors that return events.

    tools = MemoryTools()                                  # or MemoryTools(["archival_insert", ...])
    request tools: tools.specs()
    outcome = tools.execute(tool_use_block, memory, ToolContext(agent="reader", now=now))
    record outcome.events, send outcome.messages, then memory.apply(each event);
    answer the model with outcome.result (a ToolResultBlock)

Executors are pure: they read memory and return what should happen (events to record, messages
to send, the tool result); they change nothing. The runtime wraps each execution in a step and
must apply one call's events before executing the next call of the same answer (two appends to
one block in one answer would otherwise both claim the same version, and the fold would refuse
the second as a stale write).

A tool the model misuses (bad input, unknown label, limit exceeded) answers with an `is_error`
tool result that says how to fix it; it never raises, and records nothing.

The tools (11):
    core_memory_append, core_memory_replace, core_memory_rethink   core blocks
    archival_insert, archival_search                               facts
    flag_contradiction, supersede_fact, retract_fact               contradictions, never deletion
    conversation_search                                            recall
    send_message, broadcast                                        other agents
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from agents.memory.errors import AgentMemoryError, ContradictionExists, FactExists
from agents.memory.render import render_fact, render_turn
from agents.memory.state import AgentMemory
from bus.config import check_name
from bus.errors import ConfigurationError
from schemas.envelope import Payload
from schemas.payloads.llm import ToolResultBlock, ToolSpec, ToolUseBlock
from schemas.payloads.memory import Citation, MemoryEvent
from schemas.payloads.messaging import Note

MAX_SEARCH_RESULTS = 50


class ToolContext(msgspec.Struct, frozen=True, kw_only=True):
    """Who is calling, and the time to stamp on what the call records (passed in: executors
    never read the clock, so a replay decides the same)."""

    agent: str
    now: datetime


class Outbound(msgspec.Struct, frozen=True, kw_only=True):
    """A message a tool asks to send: to one agent, or to every agent carrying `tag`."""

    payload: Note
    to: str | None = None
    tag: str | None = None


class ToolOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """What executing one tool call amounts to. Encodes and decodes with msgspec, so it can be a
    recorded step result (`ctx.step(..., type=ToolOutcome)`)."""

    result: ToolResultBlock
    events: list[MemoryEvent] = []
    messages: list[Outbound] = []


def _meta(description: str, **constraints: Any) -> msgspec.Meta:
    return msgspec.Meta(description=description, **constraints)


Label = Annotated[str, _meta("The label of a core memory block, as shown in <core_memory>.", min_length=1)]
FactId = Annotated[str, _meta("A fact id as shown in search results, e.g. f0a1b2c3d4e5.", min_length=1)]
Rule = Annotated[
    str, _meta("The rule applied, a short kebab-case name, e.g. same-subject-opposite-effect.", min_length=1)
]
Name = Annotated[str, _meta("An agent name or tag: letters, digits, '_' or '-'.", min_length=1, max_length=64)]


class CoreMemoryAppend(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    label: Label
    text: Annotated[str, _meta("Text to add on a new line at the end of the block.", min_length=1)]


class CoreMemoryReplace(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    label: Label
    old: Annotated[str, _meta("Exact text now in the block; it must occur once.", min_length=1)]
    new: Annotated[str, _meta("The text to put in its place (empty to delete it).")]


class CoreMemoryRethink(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    label: Label
    value: Annotated[str, _meta("The block's complete new content.")]
    reason: Annotated[str, _meta("Why the block is rewritten.")] = ""


class ArchivalInsert(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    subject: Annotated[str, _meta("Normalised key of what the fact is about, e.g. 'fec:capacity-retention'; "
                                  "add '@qualifier' for a narrower condition.", min_length=1, max_length=200)]
    statement: Annotated[str, _meta("The fact in one or two sentences.", min_length=1, max_length=2000)]
    source: Annotated[str, _meta("Stable reference of the source, e.g. a paper and finding id 'p07.f1'.",
                                 min_length=1, max_length=300)]
    value: Annotated[str, _meta("Normalised claim about the subject: increases, decreases, no-effect, or a value.",
                                max_length=100)] = ""
    category: Annotated[str, _meta("finding, method, observation, hypothesis, ...", max_length=50)] = "finding"
    confidence: Annotated[float, _meta("How sure, from 0 to 1.", ge=0.0, le=1.0)] = 0.7
    source_title: Annotated[str, _meta("Title of the source.", max_length=500)] = ""
    quote: Annotated[str, _meta("Supporting quote from the source.", max_length=2000)] = ""
    valid_from: Annotated[datetime | None, _meta("ISO 8601 time the statement starts being true.")] = None
    valid_to: Annotated[datetime | None, _meta("ISO 8601 time the statement stops being true.")] = None
    tags: Annotated[list[str], _meta("Free tags.", max_length=20)] = []


class ArchivalSearch(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    query: Annotated[str, _meta("Words to look for; empty lists the newest facts.")] = ""
    subject: Annotated[str | None, _meta("Only this subject (and its '@' qualified forms).")] = None
    category: Annotated[str | None, _meta("Only this category.")] = None
    include_inactive: Annotated[bool, _meta("Also superseded and retracted facts.")] = False
    limit: Annotated[int, _meta("At most this many results.", ge=1, le=MAX_SEARCH_RESULTS)] = 10


class ConversationSearch(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    query: Annotated[str, _meta("Words to look for in earlier turns; empty lists the newest.")] = ""
    role: Annotated[Literal["user", "assistant"] | None, _meta("Only turns of this role.")] = None
    limit: Annotated[int, _meta("At most this many results.", ge=1, le=MAX_SEARCH_RESULTS)] = 10


class SendMessage(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    to: Name
    text: Annotated[str, _meta("The message.", min_length=1, max_length=20_000)]


class Broadcast(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    tag: Name
    text: Annotated[str, _meta("The message.", min_length=1, max_length=20_000)]


class FlagContradiction(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    fact_a: FactId
    fact_b: FactId
    rule: Rule
    note: Annotated[str, _meta("Why they cannot both hold.", max_length=2000)] = ""


class SupersedeFact(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    fact_id: FactId
    by: Annotated[str, _meta("The id of the fact that replaces it.", min_length=1)]
    rule: Rule
    reason: Annotated[str, _meta("Why.", max_length=2000)] = ""
    contradiction_id: Annotated[str | None, _meta("The contradiction this resolves, if any.")] = None


class RetractFact(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    fact_id: FactId
    rule: Rule
    reason: Annotated[str, _meta("Why it is withdrawn.", min_length=1, max_length=2000)]
    contradiction_id: Annotated[str | None, _meta("The contradiction this resolves, if any.")] = None


# -- executors ------------------------------------------------------------------------------------


def _ok(text: str, *events: Payload) -> tuple[str, list[Payload], list[Outbound]]:
    return text, list(events), []


def _block_note(memory: AgentMemory, label: str, value: str, version: int) -> str:
    limit = memory.blocks.get(label).limit
    return f"(now {len(value)}/{limit} characters, version {version})"


def _core_memory_append(args: CoreMemoryAppend, memory: AgentMemory, ctx: ToolContext):
    event = memory.blocks.append(args.label, args.text, actor=ctx.agent)
    return _ok(f"appended to block {args.label!r} {_block_note(memory, args.label, event.value, event.version)}", event)


def _core_memory_replace(args: CoreMemoryReplace, memory: AgentMemory, ctx: ToolContext):
    event = memory.blocks.replace(args.label, args.old, args.new, actor=ctx.agent)
    note = _block_note(memory, args.label, event.value, event.version)
    return _ok(f"replaced text in block {args.label!r} {note}", event)


def _core_memory_rethink(args: CoreMemoryRethink, memory: AgentMemory, ctx: ToolContext):
    event = memory.blocks.rethink(args.label, args.value, actor=ctx.agent, reason=args.reason)
    return _ok(f"rewrote block {args.label!r} {_block_note(memory, args.label, event.value, event.version)}", event)


def _archival_insert(args: ArchivalInsert, memory: AgentMemory, ctx: ToolContext):
    try:
        event = memory.facts.record(
            subject=args.subject,
            statement=args.statement,
            source=Citation(ref=args.source, title=args.source_title, quote=args.quote),
            confidence=args.confidence,
            recorded_by=ctx.agent,
            category=args.category,
            value=args.value,
            valid_from=args.valid_from,
            valid_to=args.valid_to,
            tags=args.tags,
        )
    except FactExists as exc:
        return _ok(f"already recorded as {exc.fact_id}; nothing changed")
    text = f"recorded fact {event.fact_id} (subject={event.subject}, value={event.value or '-'})"
    # Write-time hint, no model needed: active facts on the same subject that claim otherwise.
    if event.value:
        others = [
            s for s in memory.facts.search(subject=event.subject, limit=MAX_SEARCH_RESULTS)
            if s.fact.subject == event.subject and s.fact.value and s.fact.value != event.value
        ]
        if others:
            text += "\nactive facts on the same subject with a different value:\n"
            text += "\n".join(render_fact(s) for s in others)
    return _ok(text, event)


def _archival_search(args: ArchivalSearch, memory: AgentMemory, ctx: ToolContext):
    hits = memory.facts.search(
        args.query,
        subject=args.subject,
        category=args.category,
        include_inactive=args.include_inactive,
        limit=args.limit,
    )
    if not hits:
        return _ok("no facts match")
    return _ok(f"{len(hits)} facts:\n" + "\n".join(render_fact(h) for h in hits))


def _conversation_search(args: ConversationSearch, memory: AgentMemory, ctx: ToolContext):
    hits = memory.recall.search(args.query, role=args.role, limit=args.limit)
    if not hits:
        return _ok("no earlier turns match")
    return _ok(f"{len(hits)} turns:\n" + "\n".join(render_turn(h) for h in hits))


def _send_message(args: SendMessage, memory: AgentMemory, ctx: ToolContext):
    check_name(args.to, "agent name")
    return f"message to {args.to} will be sent", [], [Outbound(to=args.to, payload=Note(text=args.text))]


def _broadcast(args: Broadcast, memory: AgentMemory, ctx: ToolContext):
    check_name(args.tag, "tag")
    outbound = Outbound(tag=args.tag, payload=Note(text=args.text))
    return f"message to every agent tagged {args.tag} will be sent", [], [outbound]


def _flag_contradiction(args: FlagContradiction, memory: AgentMemory, ctx: ToolContext):
    try:
        event = memory.facts.flag(args.fact_a, args.fact_b, rule=args.rule, actor=ctx.agent, note=args.note)
    except ContradictionExists as exc:
        return _ok(f"already flagged as {exc.contradiction_id}; nothing changed")
    return _ok(f"flagged contradiction {event.contradiction_id} between {args.fact_a} and {args.fact_b}", event)


def _supersede_fact(args: SupersedeFact, memory: AgentMemory, ctx: ToolContext):
    event = memory.facts.supersede(
        args.fact_id, by=args.by, rule=args.rule, actor=ctx.agent, reason=args.reason,
        contradiction_id=args.contradiction_id,
    )
    return _ok(f"fact {args.fact_id} superseded by {args.by} (rule {args.rule}); it stays in history", event)


def _retract_fact(args: RetractFact, memory: AgentMemory, ctx: ToolContext):
    event = memory.facts.retract(
        args.fact_id, rule=args.rule, actor=ctx.agent, reason=args.reason, contradiction_id=args.contradiction_id
    )
    return _ok(f"fact {args.fact_id} retracted (rule {args.rule}); it stays in history", event)


class _Tool(msgspec.Struct, frozen=True):
    name: str
    description: str
    input_type: type
    run: Callable[..., tuple[str, list[Payload], list[Outbound]]]


TOOLS: dict[str, _Tool] = {
    t.name: t
    for t in (
        _Tool("core_memory_append", "Append a line to one of your core memory blocks.",
              CoreMemoryAppend, _core_memory_append),
        _Tool("core_memory_replace", "Replace exact text in a core memory block (it must occur once).",
              CoreMemoryReplace, _core_memory_replace),
        _Tool("core_memory_rethink", "Rewrite a core memory block completely, e.g. to condense it under its limit.",
              CoreMemoryRethink, _core_memory_rethink),
        _Tool("archival_insert", "Record a fact in archival memory with its source and confidence. Facts are "
              "never deleted; the same fact recorded twice is kept once.", ArchivalInsert, _archival_insert),
        _Tool("archival_search", "Search archival memory for facts by words, subject and category.",
              ArchivalSearch, _archival_search),
        _Tool("conversation_search", "Search earlier turns of your conversation, including those outside the "
              "context window.", ConversationSearch, _conversation_search),
        _Tool("send_message", "Send a message to one agent by name.", SendMessage, _send_message),
        _Tool("broadcast", "Send a message to every agent carrying a tag.", Broadcast, _broadcast),
        _Tool("flag_contradiction", "Record that two facts cannot both hold. Both stay; resolve it later by "
              "superseding or retracting one of them.", FlagContradiction, _flag_contradiction),
        _Tool("supersede_fact", "Mark a fact as replaced by a newer one (it stays in history).",
              SupersedeFact, _supersede_fact),
        _Tool("retract_fact", "Withdraw a fact found to be wrong (it stays in history).", RetractFact, _retract_fact),
    )
}


def tool_schema(input_type: type) -> dict[str, Any]:
    """The JSON Schema of a tool's input, inlined (no $ref), without titles."""
    schema = msgspec.json.schema(input_type)
    body = dict(schema["$defs"][input_type.__name__])
    body.pop("title", None)
    body.pop("description", None)
    return body


class MemoryTools:
    """A set of memory tools (all, or the named ones) for one agent."""

    def __init__(self, names: Iterable[str] | None = None) -> None:
        names = list(TOOLS) if names is None else list(names)
        unknown = [n for n in names if n not in TOOLS]
        if unknown:
            raise ValueError(f"unknown memory tools {unknown}; known: {sorted(TOOLS)}")
        self._tools = [TOOLS[n] for n in names]
        self._specs = [
            ToolSpec(name=t.name, description=t.description, input_schema=tool_schema(t.input_type))
            for t in self._tools
        ]
        self._by_name = {t.name: t for t in self._tools}

    @property
    def names(self) -> list[str]:
        return [t.name for t in self._tools]

    def specs(self) -> list[ToolSpec]:
        """The tool definitions to offer the model."""
        return list(self._specs)

    def handles(self, name: str) -> bool:
        return name in self._by_name

    def execute(self, call: ToolUseBlock, memory: AgentMemory, ctx: ToolContext) -> ToolOutcome:
        """Execute one tool call against `memory` (unchanged). Never raises for bad input: the
        outcome is then an `is_error` result explaining what to fix, with no events."""
        tool = self._by_name.get(call.name)
        if tool is None:
            return _error(call, f"unknown tool {call.name!r}; available: {', '.join(self.names)}")
        try:
            args = msgspec.convert(call.input, type=tool.input_type)
        except msgspec.ValidationError as exc:
            return _error(call, f"invalid input for {call.name}: {exc}")
        try:
            text, events, messages = tool.run(args, memory, ctx)
        except (AgentMemoryError, ConfigurationError, ValueError) as exc:
            return _error(call, f"{call.name} failed: {exc}")
        return ToolOutcome(result=ToolResultBlock(tool_use_id=call.id, content=text), events=events, messages=messages)


def apply_outcome(memory: AgentMemory, outcome: ToolOutcome) -> None:
    """Fold an outcome's events into memory (after they are recorded)."""
    for event in outcome.events:
        memory.apply(event)


def _error(call: ToolUseBlock, text: str) -> ToolOutcome:
    return ToolOutcome(result=ToolResultBlock(tool_use_id=call.id, content=text, is_error=True))


__all__ = [
    "TOOLS",
    "MemoryTools",
    "Outbound",
    "ToolContext",
    "ToolOutcome",
    "apply_outcome",
    "tool_schema",
]
