"""`events`: the raw log, one row per stored message, whatever its kind (unknown kinds and
undecodable bytes included: `error` says why a row did not decode, `raw` keeps its bytes)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from projections.views import Tx, render
from projections.views._forget import stub_events

if TYPE_CHECKING:
    from projections.batch import Batch

NAME = "events"
VERSION = 2

TABLES = """
CREATE TABLE {s}.events (
    seq            BIGINT NOT NULL,   -- stream sequence: the global position in the log
    stored_at      TIMESTAMPTZ,       -- when the server stored it
    subject        VARCHAR NOT NULL,
    category       VARCHAR,           -- inbox | group | event | reply | dead (the subject's class)
    kind           VARCHAR,           -- payload kind, e.g. task.requested
    id             VARCHAR,           -- envelope id
    sender         VARCHAR,
    recipient      VARCHAR,           -- set for a message to one agent
    tag            VARCHAR,           -- set for a broadcast
    reply_to       VARCHAR,
    correlation_id VARCHAR,
    causation_id   VARCHAR,
    priority       SMALLINT,
    created_at     TIMESTAMPTZ,       -- when the sender built it
    expires_at     TIMESTAMPTZ,
    prev_seq       BIGINT,            -- Bus-Prev-Seq header of a fenced record
    headers        JSON USING COMPRESSION zstd,
    payload        JSON USING COMPRESSION zstd,
    error          VARCHAR,           -- why the bytes did not decode (NULL when they did)
    raw            BLOB               -- the bytes, only when they did not decode
)
"""

RELATIONS = {"events": "SELECT * FROM {s}.events"}

_INSERT = """
INSERT INTO {s}.events
SELECT seq, stored_at, subject, subject_class, kind, id, sender, recipient, tag,
       reply_to, correlation_id, causation_id, priority, created_at, expires_at, prev_seq,
       headers, payload, error, raw
FROM batch
"""


def fold(tx: Tx, s: str, batch: Batch) -> int:
    """Append every record; a forget puts the forgotten agent's opened private records back to
    their sealed stub (projections.views._forget)."""
    written = tx.run(render(_INSERT, s))
    stub_events(tx, s, batch)
    return written
