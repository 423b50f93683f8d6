"""`bus mcp`'s server: the bus and the team's memory as MCP tools and resources.

    async with Bus(config) as bus:             # the server is a named sender on the bus
        server = build_server(bus, McpSettings(name="mcp"))
        await server.run_stdio_async()         # or run_streamable_http_async(host=..., port=...)

Tools (typed structured output, models.py):
    search_memory         facts, recall turns and block values by words, agent, subject; as of / since
    open_contradictions   open contradictions about a subject (or all), now or as of a point
    whats_new             facts recorded and ended, contradictions, block writes after a point
    record_fact           a cited fact with its confidence, recorded by this sender (read-your-writes)
    send_message, broadcast, request_agent    notes to one agent, to a tag, or a request and its reply
    list_agents           agents and their state
    conversation_trace    a conversation's envelopes in causal order
Resources:
    continuum://agents/{agent}/blocks     the core blocks an agent holds (current values)
    continuum://research/report/latest    the research team's latest report

A point in the log ("as_of", "since") is a sequence or an ISO 8601 time. Reads wait for the
server's own last write (the Bus's session consistency), or for `min_seq` when a caller gives it.
The SDK checks JSON types and ranges against each tool's input schema; the tools check names
and points. Every failure (a bad argument, a bus timeout, an unknown agent) is an MCP tool error
with a one-line message (server_errors.py); the server keeps serving.
"""

import uuid
from typing import Annotated, Any, Literal

import msgspec
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError
from pydantic import Field

from agents.mcp import memory_queries as q
from agents.mcp.models import (
    MAX_LIMIT,
    AgentReply,
    Agents,
    Contradictions,
    ConversationTrace,
    MemorySearch,
    RecordedFact,
    SentMessage,
    TraceStep,
    WhatsNew,
)
from agents.mcp.server_errors import one_line, one_line_errors, tool_errors
from agents.memory.archival import fact_id_for
from agents.trace import TraceNode, load_trace
from bus import Bus
from bus.cli.message_commands import parse_payload, payload_registry
from bus.config import check_name
from bus.errors import BusError
from schemas import new_id
from schemas.payloads import Note
from schemas.payloads.memory import Citation, FactRecorded

MAX_MESSAGE_CHARS = 20_000
MAX_TRACE_STEPS = 500
# Envelope ids of facts recorded here: derived from the fact, so a retried call is stored once.
_FACT_ENVELOPES = uuid.UUID("5d1f3c3e-8a4b-4c7e-9a51-0c6b1f7e2a10")


class McpSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The server's own settings (the bus connection is the Bus's)."""

    name: str = "mcp"


# -- argument types (their constraints are the input schema the SDK checks) ---------------------

Limit = Annotated[int, Field(ge=1, le=MAX_LIMIT, description=f"rows per list, 1..{MAX_LIMIT}")]
Point = Annotated[str, Field(min_length=1, max_length=64,
                             description="a log sequence (e.g. 1200) or an ISO 8601 time (e.g. 2026-03-03T09:00:00Z)")]
MinSeq = Annotated[int | None, Field(ge=0, description="wait until the views applied this sequence (read-your-writes)")]
AgentName = Annotated[str, Field(min_length=1, max_length=64, description="an agent name, e.g. researcher")]
TagName = Annotated[str, Field(min_length=1, max_length=64, description="a tag agents carry, e.g. team")]
Words = Annotated[str, Field(max_length=200, description="words to find (case-insensitive); empty: anything")]
Subject = Annotated[str, Field(min_length=1, max_length=200,
                               description="a fact subject, e.g. fec:capacity-retention (the part before '@' also matches)")]
MessageText = Annotated[str, Field(min_length=1, max_length=MAX_MESSAGE_CHARS)]
MessageData = Annotated[dict[str, Any], Field(description="structured data carried with the text")]
TypedPayload = Annotated[dict[str, Any], Field(
    description='a typed payload: an object with its "kind" and fields, e.g. {"kind": "ping", "text": "you"}')]
MessageId = Annotated[str | None, Field(
    description="a UUID you choose, so that retrying the call sends the message once (default: a new one)")]
MemoryKinds = Annotated[list[Literal["facts", "recall", "blocks"]], Field(min_length=1, max_length=3)]


def build_server(bus: Bus, settings: McpSettings) -> MCPServer:
    """The MCP server over a connected `bus`. Raises ConfigurationError for an invalid name."""
    check_name(settings.name, "sender name")
    tools = BusTools(bus, settings)
    server = MCPServer(
        "continuum",
        instructions=(
            "Continuum's event-sourced bus and its agents' memory. Search facts, recall and core blocks "
            "(as of or since a log sequence or time), list open contradictions, see what is new, record "
            "cited facts, and talk to agents. Reads wait for this server's own writes; pass another "
            "writer's `seq` as `min_seq` to read it back."
        ),
        log_level="WARNING",
        middleware=[one_line_errors],
    )
    for fn in (tools.search_memory, tools.open_contradictions, tools.whats_new, tools.record_fact,
               tools.send_message, tools.broadcast, tools.request_agent, tools.list_agents,
               tools.conversation_trace):
        server.add_tool(fn, structured_output=True)
    server.resource("continuum://agents/{agent}/blocks", name="agent-blocks", mime_type="text/markdown",
                    description="The core-memory blocks an agent holds, current values")(tools.agent_blocks)
    server.resource("continuum://research/report/latest", name="research-report", mime_type="text/markdown",
                    description="The research team's latest daily report, as the writer sent it")(tools.latest_report)
    return server


class BusTools:
    """The tools and resources, bound to one connected Bus and a sender name."""

    def __init__(self, bus: Bus, settings: McpSettings) -> None:
        self.bus = bus
        self.settings = settings
        self.registry = payload_registry(())

    # -- memory ---------------------------------------------------------------------------------

    async def search_memory(
        self,
        text: Words = "",
        kinds: MemoryKinds = ["facts", "recall", "blocks"],  # noqa: B006 - a schema default, never mutated
        agent: AgentName | None = None,
        subject: Subject | None = None,
        as_of: Point | None = None,
        since: Point | None = None,
        include_ended: bool = False,
        limit: Limit = 10,
        min_seq: MinSeq = None,
    ) -> MemorySearch:
        """Search the team's memory: archival facts (with citation and confidence), recall (the
        agents' conversations) and core blocks, newest first. `agent` narrows to what one agent
        recorded, said or holds; `subject` to facts on one subject. `as_of` answers as the memory
        stood then (facts held, block values, turns recorded by then); `since` keeps only what
        came after. Ended (superseded or retracted) facts only with include_ended."""
        with tool_errors():
            if agent is not None:
                check_name(agent, "agent name")
            spec = q.SearchSpec(
                text=text.strip(), kinds=tuple(kinds), agent=agent, subject=subject,
                as_of_seq=await self._point(as_of, "as_of", min_seq), since_seq=await self._point(since, "since", min_seq),
                include_ended=include_ended, limit=limit, min_seq=min_seq,
            )
            return await q.search_memory(self.bus, spec)

    async def open_contradictions(
        self,
        subject: Subject | None = None,
        as_of: Point | None = None,
        limit: Limit = 20,
        min_seq: MinSeq = None,
    ) -> Contradictions:
        """Contradictions between facts that are still open (neither fact superseded or
        retracted), about `subject` or about anything, newest first; both claims with their
        sources. `as_of` answers as they stood then."""
        with tool_errors():
            as_of_seq = await self._point(as_of, "as_of", min_seq)
            return await q.open_contradictions(self.bus, subject, as_of_seq=as_of_seq, limit=limit, min_seq=min_seq)

    async def whats_new(self, since: Point, limit: Limit = 20, min_seq: MinSeq = None) -> WhatsNew:
        """What changed in memory after `since` (a sequence, e.g. the applied_seq of your last
        answer, or a time): facts recorded, facts ended, contradictions flagged, block writes;
        oldest first, so the last seq you see is where to continue."""
        with tool_errors():
            since_seq = await q.seq_at(self.bus, q.parse_point(since, "since"), min_seq=min_seq)
            return await q.whats_new(self.bus, since_seq, limit=limit, min_seq=min_seq)

    async def record_fact(
        self,
        subject: Subject,
        statement: Annotated[str, Field(min_length=1, max_length=2000, description="what is claimed, one sentence")],
        source_ref: Annotated[str, Field(min_length=1, max_length=200, description="the citation, e.g. p07.f1 or a URL")],
        confidence: Annotated[float, Field(ge=0.0, le=1.0, description="0..1")],
        value: Annotated[str, Field(max_length=100, description="the normalised claim, e.g. increases")] = "",
        source_title: Annotated[str, Field(max_length=300)] = "",
        quote: Annotated[str, Field(max_length=1000, description="the passage the fact rests on")] = "",
        category: Annotated[str, Field(min_length=1, max_length=40)] = "claim",
    ) -> RecordedFact:
        """Record a fact in the team's archival memory, with its citation and confidence, as this
        MCP client's sender. Recording the same fact again (same subject, statement and source)
        stores nothing new and returns the first record. Pass the returned `seq` as `min_seq` to
        any search to see it."""
        with tool_errors():
            subject, statement, source_ref = subject.strip(), statement.strip(), source_ref.strip()
            if not subject or not statement or not source_ref:
                raise ValueError("subject, statement and source_ref must not be blank")
            recorder = self.settings.name
            fact_id = fact_id_for(recorder, subject, statement, source_ref)
            held = await q.fact_seq(self.bus, fact_id)
            if held is not None:
                return RecordedFact(fact_id=fact_id, seq=held, recorded_by=recorder, already_recorded=True)
            event = FactRecorded(
                fact_id=fact_id, subject=subject, statement=statement, confidence=confidence, recorded_by=recorder,
                source=Citation(ref=source_ref, title=source_title.strip(), quote=quote.strip()),
                category=category.strip() or "claim", value=value.strip(),
            )
            sent = await self.bus.record(recorder, event, id=str(uuid.uuid5(_FACT_ENVELOPES, f"{recorder}/{fact_id}")))
            return RecordedFact(fact_id=fact_id, seq=sent.ack.seq, recorded_by=recorder,
                                already_recorded=sent.ack.duplicate)

    # -- agents ---------------------------------------------------------------------------------

    async def send_message(
        self,
        to: AgentName,
        text: MessageText | None = None,
        data: MessageData | None = None,
        payload: TypedPayload | None = None,
        message_id: MessageId = None,
    ) -> SentMessage:
        """Send one agent a note (`text`, optional `data`) or a typed `payload`; it is stored in
        the log and delivered when the agent runs."""
        with tool_errors():
            await self._known_agent(to)
            body = self._payload(text, data, payload)
            sent = await self.bus.send(to, body, id=_message_id(message_id))
            return _sent(sent, to=to)

    async def broadcast(
        self,
        tag: TagName,
        text: MessageText | None = None,
        data: MessageData | None = None,
        payload: TypedPayload | None = None,
        message_id: MessageId = None,
    ) -> SentMessage:
        """Send a note (or a typed `payload`) to every agent carrying `tag`, once per agent name."""
        with tool_errors():
            check_name(tag, "tag")
            body = self._payload(text, data, payload)
            if not await q.tag_known(self.bus, tag):
                raise ValueError(f"no agent carries the tag {tag!r}; list_agents shows each agent's tags")
            sent = await self.bus.broadcast(tag, body, id=_message_id(message_id))
            return _sent(sent, tag=tag)

    async def request_agent(
        self,
        to: AgentName,
        text: MessageText | None = None,
        data: MessageData | None = None,
        payload: TypedPayload | None = None,
        timeout_s: Annotated[float, Field(gt=0, le=120, description="seconds to wait for the reply, up to 120")] = 30.0,
        message_id: MessageId = None,
    ) -> AgentReply:
        """Ask one agent (a note, or a typed `payload` such as {"kind": "ping"}, sent as a
        request) and wait for its reply. A timeout leaves the request in the log: the agent
        still handles it when it runs."""
        with tool_errors():
            await self._known_agent(to)
            body = self._payload(text, data, payload)
            request_id = _message_id(message_id)
            reply = await self.bus.request(to, body, timeout_s=timeout_s, id=request_id)
            payload = reply.payload
            body, clipped = q.clip(getattr(payload, "text", "") or "", MAX_MESSAGE_CHARS)
            data_out = getattr(payload, "data", None)
            return AgentReply(
                request_id=request_id, correlation_id=reply.correlation_id or request_id, sender=reply.sender,
                kind=reply.kind, text=body, data=data_out if isinstance(data_out, dict) else {}, clipped=clipped,
            )

    async def list_agents(self, limit: Limit = 50, min_seq: MinSeq = None) -> Agents:
        """Agents the log knows (those that sent, were sent to, or recorded events), most
        recently seen first: tags, state, replicas alive, in-flight work."""
        with tool_errors():
            return await q.list_agents(self.bus, limit=limit, min_seq=min_seq)

    async def conversation_trace(
        self,
        correlation_id: Annotated[str, Field(min_length=1, max_length=128, description="the conversation's correlation id")],
        limit: Annotated[int, Field(ge=1, le=MAX_TRACE_STEPS)] = 100,
        min_seq: MinSeq = None,
    ) -> ConversationTrace:
        """A conversation's envelopes (everything with that correlation id) in causal order:
        each under the envelope that caused it, with who sent what to whom."""
        with tool_errors():
            trace = await load_trace(self.bus, correlation_id, min_seq=min_seq, max_rows=limit)
            if trace.count == 0:
                raise ValueError(f"no envelope has correlation id {correlation_id!r}")
            steps: list[TraceStep] = []

            def walk(node: TraceNode, depth: int) -> None:
                elapsed = None
                if trace.started_at is not None and node.stored_at is not None:
                    elapsed = round((node.stored_at - trace.started_at).total_seconds() * 1000, 1)
                steps.append(TraceStep(seq=node.seq, depth=depth, kind=node.kind, sender=node.sender,
                                       target=node.target, elapsed_ms=elapsed))
                for child in node.children:
                    walk(child, depth + 1)

            for root in trace.roots:
                walk(root, 0)
            return ConversationTrace(correlation_id=correlation_id, count=trace.count, steps=steps,
                                     truncated=trace.truncated)

    # -- resources ------------------------------------------------------------------------------

    async def agent_blocks(self, agent: str) -> str:
        """The core blocks `agent` holds, as markdown. Raises ResourceError."""
        try:
            check_name(agent, "agent name")
            blocks = await q.held_blocks(self.bus, agent)
        except BusError as exc:
            raise ResourceError(one_line(f"blocks of {agent!r}: {exc}")) from exc
        if not blocks:
            return f"# {agent}: core memory\n\n(no blocks held)\n"
        parts = [f"# {agent}: core memory\n"]
        for b in blocks:
            parts.append(f"## {b.label} ({b.block_id}, v{b.version}, {b.chars}/{b.limit} chars, seq {b.seq})\n\n{b.value}\n")
        return "\n".join(parts)

    async def latest_report(self) -> str:
        """The research team's latest report, as markdown. Raises ResourceError."""
        try:
            report = await q.latest_report(self.bus)
        except BusError as exc:
            raise ResourceError(one_line(f"the latest report: {exc}")) from exc
        if report is None:
            return "(no report yet: run `bus demo research`)\n"
        return (f"<!-- seq {report.seq}, correlation {report.correlation_id}, stored {report.stored_at} -->\n"
                f"{report.text}\n")

    # -- helpers --------------------------------------------------------------------------------

    async def _point(self, text: str | None, what: str, min_seq: int | None) -> int | None:
        if text is None:
            return None
        return await q.seq_at(self.bus, q.parse_point(text, what), min_seq=min_seq)

    def _payload(self, text: str | None, data: dict[str, Any] | None, payload: dict[str, Any] | None) -> Any:
        """A note from `text` and `data`, or the typed payload `payload` names by its kind.
        Raises ValueError (neither or both given), CliError (an unknown kind or a bad field)."""
        if (text is None) == (payload is None):
            raise ValueError("give either `text` (a note, with optional `data`) or `payload` (an object with a kind)")
        if payload is None:
            return Note(text=text or "", data=data or {})
        return parse_payload(msgspec.json.encode(payload).decode(), self.registry)

    async def _known_agent(self, name: str) -> None:
        check_name(name, "agent name")
        if not await q.agent_known(self.bus, name):
            raise ValueError(f"unknown agent {name!r}: it has never appeared in the log; list_agents shows the known ones")


def _message_id(given: str | None) -> str:
    """The envelope id: the caller's UUID (so a retry is stored once), or a new one."""
    if given is None:
        return new_id()
    try:
        return str(uuid.UUID(given))
    except ValueError:
        raise ValueError(f"message_id {given!r} is not a UUID") from None


def _sent(sent: Any, *, to: str | None = None, tag: str | None = None) -> SentMessage:
    return SentMessage(id=sent.envelope.id, seq=sent.ack.seq, to=to, tag=tag,
                       correlation_id=sent.envelope.correlation_id or sent.envelope.id, duplicate=sent.ack.duplicate)
