"""Memory events: core blocks, recall (conversation turns), archival facts and contradictions.

The log *is* the memory: an agent rebuilds its working memory by folding these events, and
projections fold them into bitemporal views. Nothing is ever deleted:

- a block write carries the block's new `version` (previous + 1) and the full new `value`, so a
  stale writer is detectable and every version is reconstructible from one event;
- a fact that stops being believed is superseded or retracted by a later event naming the rule
  and the actor; a contradiction records both claims as they stood.

Transaction time is the event's stream sequence and envelope time; `valid_from`/`valid_to` on a
fact are world time (when the statement is true), which the recorder states.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from schemas.envelope import Payload
from schemas.payloads.llm import ContentBlock

# -- core blocks ------------------------------------------------------------------------------


class BlockCreated(Payload, frozen=True, kw_only=True, omit_defaults=True, tag="memory.block.created"):
    """A core-memory block (always in context) came to exist, at version 1.

    `limit` is the block's size cap in characters; every write is checked against it.
    `holders` are the agents whose context shows the block (more than one: a shared block).
    """

    block_id: str
    label: str
    limit: int
    actor: str
    value: str = ""
    description: str = ""
    holders: list[str] = []
    read_only: bool = False
    version: int = 1


class BlockSet(Payload, frozen=True, kw_only=True, omit_defaults=True, tag="memory.block.set"):
    """The block's whole value was rewritten ("rethink")."""

    block_id: str
    value: str
    version: int
    actor: str
    reason: str = ""


class BlockAppended(Payload, frozen=True, kw_only=True, omit_defaults=True, tag="memory.block.appended"):
    """`text` was appended; `value` is the block's value after the append."""

    block_id: str
    text: str
    value: str
    version: int
    actor: str


class BlockReplaced(Payload, frozen=True, kw_only=True, omit_defaults=True, tag="memory.block.replaced"):
    """The single occurrence of `old` became `new`; `value` is the value after the edit."""

    block_id: str
    old: str
    new: str
    value: str
    version: int
    actor: str


class BlockAttached(Payload, frozen=True, kw_only=True, tag="memory.block.attached"):
    """`agent` now holds the block (it appears in that agent's context and receives its writes)."""

    block_id: str
    agent: str
    actor: str


class BlockDetached(Payload, frozen=True, kw_only=True, tag="memory.block.detached"):
    """`agent` no longer holds the block. The block and its history remain."""

    block_id: str
    agent: str
    actor: str


# -- recall: the conversation -----------------------------------------------------------------


class TurnRecorded(Payload, frozen=True, kw_only=True, omit_defaults=True, tag="memory.turn.recorded"):
    """One message of an agent's conversation, numbered `turn` = 1, 2, ... per conversation.

    `text` is the searchable rendering (the text blocks, and tool names). `content` holds the
    exact Messages-API blocks when the turn is more than plain text (tool calls, tool results,
    thinking); when empty, the message is `text` alone. `sender` names the agent a user turn
    came from; `envelope_id` the message it records.
    """

    agent: str
    turn: int
    role: Literal["user", "assistant"]
    at: datetime
    text: str = ""
    content: list[ContentBlock] = []
    conversation: str = "main"
    sender: str | None = None
    envelope_id: str | None = None


class ConversationSummarised(
    Payload, frozen=True, kw_only=True, omit_defaults=True, tag="memory.conversation.summarised"
):
    """Turns `first_turn`..`last_turn` left the context window; `summary` stands in for them.

    The turns stay in recall (searchable). `block_versions` are the core-block versions when the
    summary was written: a summary is older than any later block value and never overrides it.
    """

    agent: str
    summary_id: str
    first_turn: int
    last_turn: int
    summary: str
    method: str
    turns: int
    tokens_evicted: int
    at: datetime
    conversation: str = "main"
    block_versions: dict[str, int] = {}


class ConversationClosed(Payload, frozen=True, kw_only=True, omit_defaults=True, tag="memory.conversation.closed"):
    """The conversation ended at `last_turn`: its context window starts afresh after it. The
    turns stay in recall (searchable); nothing is deleted.

    `rule` names the policy that closed it ("retention.idle_ttl": idle for `idle_s` seconds, over
    the `ttl_s` allowed); `summary_id` the summary recorded for its last unsummarised turns.
    """

    agent: str
    last_turn: int
    reason: str
    at: datetime
    conversation: str = "main"
    rule: str = ""
    idle_s: float | None = None
    ttl_s: float | None = None
    summary_id: str | None = None


# -- archival: facts --------------------------------------------------------------------------


class Citation(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Where a statement comes from: `ref` is a stable reference (a paper and finding id, a URL,
    an envelope id); the rest is optional context."""

    ref: str
    title: str = ""
    quote: str = ""


class FactRecorded(Payload, frozen=True, kw_only=True, omit_defaults=True, tag="memory.fact.recorded"):
    """A statement an agent holds, with its source and confidence.

    `subject` is a normalised key ("fec:capacity-retention"); `value` the normalised claim about
    it ("increases"), which rule-based contradiction checks compare. `valid_from`/`valid_to`
    bound when the statement is true in the world (None: unbounded).
    """

    fact_id: str
    subject: str
    statement: str
    source: Citation
    confidence: float
    recorded_by: str
    # "kind" is the payload tag field, hence "category" (finding, method, observation, ...).
    category: str = "claim"
    value: str = ""
    valid_from: datetime | None = None
    valid_to: datetime | None = None
    tags: list[str] = []


class FactSuperseded(Payload, frozen=True, kw_only=True, omit_defaults=True, tag="memory.fact.superseded"):
    """`fact_id` is no longer held because `by` replaces it, under `rule`, decided by `actor`."""

    fact_id: str
    by: str
    rule: str
    actor: str
    reason: str = ""
    contradiction_id: str | None = None
    valid_to: datetime | None = None


class FactRetracted(Payload, frozen=True, kw_only=True, omit_defaults=True, tag="memory.fact.retracted"):
    """`fact_id` is withdrawn (wrong, not replaced), under `rule`, decided by `actor`."""

    fact_id: str
    rule: str
    actor: str
    reason: str = ""
    contradiction_id: str | None = None


class Claim(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A fact as it stood when a contradiction was flagged."""

    fact_id: str
    subject: str
    statement: str
    source: str
    recorded_by: str
    value: str = ""
    confidence: float = 0.0


class ContradictionFlagged(Payload, frozen=True, kw_only=True, omit_defaults=True, tag="memory.contradiction.flagged"):
    """Two facts cannot both hold. Both claims are kept as data; resolving the contradiction is
    a separate, attributable event (a supersession or retraction naming `contradiction_id`)."""

    contradiction_id: str
    claim_a: Claim
    claim_b: Claim
    rule: str
    actor: str
    note: str = ""


# Every memory event, as one tagged union (decodes any of them by `kind`).
MemoryEvent = (
    BlockCreated
    | BlockSet
    | BlockAppended
    | BlockReplaced
    | BlockAttached
    | BlockDetached
    | TurnRecorded
    | ConversationSummarised
    | ConversationClosed
    | FactRecorded
    | FactSuperseded
    | FactRetracted
    | ContradictionFlagged
)
