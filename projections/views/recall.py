"""`recall`: every conversation turn of every agent (`memory.turn.recorded`), searchable by
text, role, agent, conversation and time; `recall_summaries`, the summaries that stood in for
turns evicted from the context window; and `recall_closures`, every close of a conversation
(`memory.conversation.closed`) with the rule and reason (retention: "idle 2d 3h > ttl 1d").

A turn numbered at or below the last one of its conversation is a redelivered duplicate (no
row). A turn keeps its row after eviction: `summarised_by`/`evicted_seq` name the first summary
that covered it, `closed`/`closed_seq` the close of its conversation.

    SELECT agent, conversation, turn, role, text, turn_at FROM recall
    WHERE agent = ? AND text ILIKE '%' || ? || '%' AND role = 'user' AND turn_at >= ?
    ORDER BY seq DESC LIMIT 20

    SELECT agent, conversation, last_turn, reason, closed_at FROM recall_closures
    WHERE rule = 'retention.idle_ttl' ORDER BY seq
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from projections.views import Tx, render
from projections.views._forget import erase_all_rows, erase_rows
from projections.views._kinds import kinds_in

if TYPE_CHECKING:
    from projections.batch import Batch

NAME = "recall"
VERSION = 3

TABLES = """
CREATE TABLE {s}.recall (
    agent         VARCHAR NOT NULL,
    conversation  VARCHAR NOT NULL,
    turn          BIGINT NOT NULL,
    role          VARCHAR,           -- user | assistant
    sender        VARCHAR,           -- the agent a user turn came from
    envelope_id   VARCHAR,           -- the message the turn records
    text          VARCHAR,           -- the searchable rendering
    tool_calls    VARCHAR[],         -- names of the tool_use blocks
    tool_errors   BIGINT,            -- tool_result blocks with is_error
    content_json  JSON,              -- the exact content blocks (NULL: plain text)
    turn_at       TIMESTAMPTZ,       -- when the turn happened (the event's `at`)
    seq           BIGINT NOT NULL,
    summarised_by VARCHAR,           -- the first summary covering the turn
    evicted_seq   BIGINT,
    closed        BOOLEAN NOT NULL,
    closed_seq    BIGINT
);
CREATE TABLE {s}.recall_heads (
    agent         VARCHAR NOT NULL,
    conversation  VARCHAR NOT NULL,
    last_turn     BIGINT NOT NULL,
    PRIMARY KEY (agent, conversation)
);
CREATE TABLE {s}.recall_summaries (
    agent          VARCHAR NOT NULL,
    conversation   VARCHAR NOT NULL,
    summary_id     VARCHAR PRIMARY KEY,
    first_turn     BIGINT,
    last_turn      BIGINT,
    turns          BIGINT,
    tokens_evicted BIGINT,
    method         VARCHAR,
    summary        VARCHAR,
    block_versions JSON,
    summarised_at  TIMESTAMPTZ,
    seq            BIGINT NOT NULL
);
CREATE TABLE {s}.recall_closures (
    agent         VARCHAR NOT NULL,
    conversation  VARCHAR NOT NULL,
    last_turn     BIGINT NOT NULL,  -- the conversation is closed up to this turn
    rule          VARCHAR,          -- the policy that closed it ('retention.idle_ttl'), NULL if unstated
    reason        VARCHAR,          -- in words ('idle 1d 0h > ttl 12h')
    idle_s        DOUBLE,           -- retention: how long the conversation had been idle
    ttl_s         DOUBLE,           -- retention: the idle time allowed
    summary_id    VARCHAR,          -- the summary of its last unsummarised turns
    closed_at     TIMESTAMPTZ,      -- the event's `at` (the instant the sweep ran as of)
    seq           BIGINT NOT NULL,
    PRIMARY KEY (agent, conversation, last_turn)
)
"""

RELATIONS = {
    "recall": "SELECT * FROM {s}.recall",
    "recall_summaries": "SELECT * FROM {s}.recall_summaries",
    "recall_closures": "SELECT * FROM {s}.recall_closures",
}

# A turn applies iff its number is above every turn before it in its conversation (stored head
# or earlier in the batch): a running max, so batch boundaries do not matter.
_TURNS = """
INSERT INTO {s}.recall
WITH t AS (
    SELECT payload->>'agent' AS agent, coalesce(payload->>'conversation', 'main') AS conversation,
           TRY_CAST(payload->>'turn' AS BIGINT) AS turn, payload, seq
    FROM batch
    WHERE kind = 'memory.turn.recorded' AND error IS NULL AND payload->>'agent' IS NOT NULL
), ranked AS (
    SELECT t.*, greatest(coalesce(h.last_turn, 0), coalesce(max(t.turn) OVER (
               PARTITION BY t.agent, t.conversation ORDER BY t.seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)) AS before,
           CASE WHEN json_type(payload->'content') = 'ARRAY' AND json_array_length(payload->'content') > 0
                THEN from_json(payload->'content', '["JSON"]') END AS blocks
    FROM t LEFT JOIN {s}.recall_heads AS h USING (agent, conversation)
    WHERE t.turn IS NOT NULL
)
SELECT agent, conversation, turn, payload->>'role', payload->>'sender', payload->>'envelope_id',
       coalesce(payload->>'text', ''),
       coalesce(list_transform(list_filter(blocks, lambda b: b->>'type' = 'tool_use'), lambda b: b->>'name'), []::VARCHAR[]),
       coalesce(len(list_filter(blocks, lambda b: b->>'type' = 'tool_result' AND coalesce(TRY_CAST(b->>'is_error' AS BOOLEAN), FALSE))), 0),
       CASE WHEN blocks IS NOT NULL THEN payload->'content' END,
       TRY_CAST(payload->>'at' AS TIMESTAMPTZ), seq, NULL, NULL, FALSE, NULL
FROM ranked WHERE turn > before
"""

_HEADS = """
INSERT INTO {s}.recall_heads
SELECT payload->>'agent', coalesce(payload->>'conversation', 'main'), max(TRY_CAST(payload->>'turn' AS BIGINT))
FROM batch
WHERE kind = 'memory.turn.recorded' AND error IS NULL AND payload->>'agent' IS NOT NULL
  AND TRY_CAST(payload->>'turn' AS BIGINT) IS NOT NULL
GROUP BY ALL
ON CONFLICT (agent, conversation) DO UPDATE SET last_turn = greatest(last_turn, excluded.last_turn)
"""

_SUMMARIES = """
INSERT INTO {s}.recall_summaries
SELECT payload->>'agent', coalesce(payload->>'conversation', 'main'), payload->>'summary_id',
       TRY_CAST(payload->>'first_turn' AS BIGINT), TRY_CAST(payload->>'last_turn' AS BIGINT),
       TRY_CAST(payload->>'turns' AS BIGINT), TRY_CAST(payload->>'tokens_evicted' AS BIGINT),
       payload->>'method', payload->>'summary', coalesce(payload->'block_versions', '{}'),
       TRY_CAST(payload->>'at' AS TIMESTAMPTZ), seq
FROM batch
WHERE kind = 'memory.conversation.summarised' AND error IS NULL AND payload->>'summary_id' IS NOT NULL
QUALIFY row_number() OVER (PARTITION BY payload->>'summary_id' ORDER BY seq) = 1
ON CONFLICT (summary_id) DO NOTHING
"""

# Turns recorded before a summary (or close) that covers them; the first one wins.
_EVICTED = """
UPDATE {s}.recall AS r SET summarised_by = e.summary_id, evicted_seq = e.seq
FROM (
    SELECT r.agent, r.conversation, r.turn, arg_min(s.summary_id, s.seq) AS summary_id, min(s.seq) AS seq
    FROM {s}.recall_summaries AS s
    JOIN {s}.recall AS r ON r.agent = s.agent AND r.conversation = s.conversation
     AND r.turn BETWEEN s.first_turn AND s.last_turn AND r.seq < s.seq
    WHERE s.seq > ? AND r.summarised_by IS NULL
    GROUP BY ALL
) AS e
WHERE r.agent = e.agent AND r.conversation = e.conversation AND r.turn = e.turn
"""

_CLOSED = """
UPDATE {s}.recall AS r SET closed = TRUE, closed_seq = c.seq
FROM (
    SELECT r.agent, r.conversation, r.turn, min(b.seq) AS seq
    FROM batch AS b
    JOIN {s}.recall AS r ON r.agent = b.payload->>'agent'
     AND r.conversation = coalesce(b.payload->>'conversation', 'main')
     AND r.turn <= TRY_CAST(b.payload->>'last_turn' AS BIGINT) AND r.seq < b.seq
    WHERE b.kind = 'memory.conversation.closed' AND b.error IS NULL AND NOT r.closed
    GROUP BY ALL
) AS c
WHERE r.agent = c.agent AND r.conversation = c.conversation AND r.turn = c.turn
"""


# One row per close of a conversation up to a turn; a repeated close of the same turn keeps the
# first (as the agent's fold does).
_CLOSURES = """
INSERT INTO {s}.recall_closures
SELECT payload->>'agent', coalesce(payload->>'conversation', 'main'), TRY_CAST(payload->>'last_turn' AS BIGINT),
       nullif(payload->>'rule', ''), payload->>'reason', TRY_CAST(payload->>'idle_s' AS DOUBLE),
       TRY_CAST(payload->>'ttl_s' AS DOUBLE), payload->>'summary_id', TRY_CAST(payload->>'at' AS TIMESTAMPTZ), seq
FROM batch
WHERE kind = 'memory.conversation.closed' AND error IS NULL AND payload->>'agent' IS NOT NULL
  AND TRY_CAST(payload->>'last_turn' AS BIGINT) IS NOT NULL
QUALIFY row_number() OVER (
    PARTITION BY payload->>'agent', coalesce(payload->>'conversation', 'main'), TRY_CAST(payload->>'last_turn' AS BIGINT)
    ORDER BY seq) = 1
ON CONFLICT (agent, conversation, last_turn) DO NOTHING
"""


def fold(tx: Tx, s: str, batch: Batch) -> int:
    """Append new turns and summaries, then mark the turns the batch's summaries and closes cover."""
    kinds = kinds_in(batch)
    written = 0
    # A forget (projections.views._forget) first: its turns, summaries and where its conversations
    # stood go before this batch's turns are numbered against them (the batch's own records of
    # the forgotten key were left sealed: projections.opening drops the key first).
    erase_rows(tx, s, batch, "recall", "recall_summaries")
    erase_all_rows(tx, s, batch, "recall_heads")
    if "memory.turn.recorded" in kinds:
        written += tx.run(render(_TURNS, s))
        tx.run(render(_HEADS, s))
    if "memory.conversation.summarised" in kinds:
        written += tx.run(render(_SUMMARIES, s))
        tx.run(render(_EVICTED, s), [batch.after_seq])
    if "memory.conversation.closed" in kinds:
        tx.run(render(_CLOSED, s))
        written += tx.run(render(_CLOSURES, s))
    # And after: a record of the batch older than the forget that was not sealed (written before
    # sealing existed) goes too.
    erase_rows(tx, s, batch, "recall", "recall_summaries")
    return written
