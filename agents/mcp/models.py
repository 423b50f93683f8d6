"""What `bus mcp`'s tools return: typed, compact results (the MCP structured output).

The SDK derives each tool's output schema from these pydantic models, so a client sees the
shape before it calls. Every list is bounded by the tool's `limit` (at most `MAX_LIMIT`);
`truncated` says more rows matched, and long texts are cut to `MAX_TEXT_CHARS` with `…`
(`clipped` on the row says so). Sequences (`*_seq`) are positions in the log: pass
`applied_seq` (or a write's `seq`) back as `since` or `min_seq` to continue from there.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

MAX_LIMIT = 50
MAX_TEXT_CHARS = 400


class Fact(BaseModel):
    """One archival fact, with its citation and where it stands."""

    fact_id: str
    subject: str
    statement: str
    value: str = ""
    confidence: float | None = None
    category: str = ""
    source_ref: str = ""
    source_title: str = ""
    recorded_by: str = ""
    recorded_seq: int
    recorded_at: str | None = None
    status: str = Field(description="active, superseded or retracted (now, or as of the point asked)")
    ended_seq: int | None = None
    clipped: bool = False


class Turn(BaseModel):
    """One turn of an agent's conversation (recall)."""

    agent: str
    conversation: str
    turn: int
    role: str
    sender: str | None = None
    text: str
    turn_at: str | None = None
    seq: int
    clipped: bool = False


class BlockValue(BaseModel):
    """One version of a core-memory block."""

    block_id: str
    label: str
    version: int
    value: str
    chars: int
    limit: int | None = None
    actor: str | None = None
    seq: int
    written_at: str | None = None
    clipped: bool = False


class MemorySearch(BaseModel):
    """Facts, recall turns and block values matching a search, newest first."""

    applied_seq: int = Field(description="the log position the views had applied when they answered")
    as_of_seq: int | None = Field(None, description="the log position the answer is as of (None: now)")
    facts: list[Fact] = []
    turns: list[Turn] = []
    blocks: list[BlockValue] = []
    truncated: bool = Field(False, description="more rows matched than the limit")


class Claim(BaseModel):
    """One side of a contradiction, as it stood when flagged."""

    fact_id: str
    subject: str
    statement: str
    value: str = ""
    source: str = ""
    recorded_by: str = ""
    confidence: float | None = None


class Contradiction(BaseModel):
    """Two facts that cannot both hold, flagged by an agent under a rule."""

    contradiction_id: str
    rule: str
    actor: str
    note: str = ""
    flagged_seq: int
    a: Claim
    b: Claim
    open: bool
    resolved_seq: int | None = None


class Contradictions(BaseModel):
    """Open contradictions (about one subject, or all), newest first."""

    applied_seq: int
    as_of_seq: int | None = None
    subject: str | None = None
    contradictions: list[Contradiction] = []
    truncated: bool = False


class WhatsNew(BaseModel):
    """What changed in memory after a point: facts recorded and ended, contradictions flagged,
    block writes."""

    applied_seq: int
    since_seq: int
    facts: list[Fact] = []
    ended_facts: list[Fact] = []
    contradictions: list[Contradiction] = []
    blocks: list[BlockValue] = []
    truncated: bool = False


class RecordedFact(BaseModel):
    """A fact stored in the log. Pass `seq` as `min_seq` to read it back."""

    fact_id: str
    seq: int = Field(description="the log position of the fact (the first record of it, for a repeat)")
    recorded_by: str
    already_recorded: bool = Field(description="the same fact (recorder, subject, statement, source) was held before")


class SentMessage(BaseModel):
    """An envelope stored in the log."""

    id: str
    seq: int
    to: str | None = None
    tag: str | None = None
    correlation_id: str
    duplicate: bool = Field(False, description="the same id was stored before; nothing new was sent")


class AgentReply(BaseModel):
    """An agent's answer to a request."""

    request_id: str
    correlation_id: str
    sender: str
    kind: str
    text: str = ""
    data: dict[str, object] = {}
    clipped: bool = False


class AgentInfo(BaseModel):
    """One agent, as the `agents` view sees it."""

    name: str
    tags: list[str] = []
    state: str | None = None
    lifecycle: str | None = None
    replicas: int | None = None
    replicas_alive: int | None = None
    in_flight: int | None = None
    messages_sent: int = 0
    messages_received: int = 0
    last_seen: str | None = None


class Agents(BaseModel):
    """Agents known to the log, most recently seen first."""

    applied_seq: int
    agents: list[AgentInfo] = []
    truncated: bool = False


class TraceStep(BaseModel):
    """One envelope of a conversation; `depth` is its place in the causal tree."""

    seq: int
    depth: int
    kind: str
    sender: str
    target: str
    elapsed_ms: float | None = None


class ConversationTrace(BaseModel):
    """A conversation's envelopes in causal order (depth-first, each under its cause)."""

    correlation_id: str
    count: int
    steps: list[TraceStep] = []
    truncated: bool = False
