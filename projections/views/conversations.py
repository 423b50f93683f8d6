"""`conversations`: per correlation id, the ordered causal chain of envelopes: each step says
who sent what to whom, and which earlier step (and sender) caused it.

Every envelope with a correlation id is a step (`delivery.report` bookkeeping excluded). The
chain is stored flat; `step`, `caused_by` and `cause_kind` are derived when queried, so they are
cheap for one conversation: filter on `correlation_id`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from projections.views import Tx, render
from projections.views._forget import stub_chain

if TYPE_CHECKING:
    from projections.batch import Batch

NAME = "conversations"
VERSION = 2

TABLES = """
CREATE TABLE {s}.chain (
    correlation_id VARCHAR NOT NULL,
    seq            BIGINT NOT NULL,
    stored_at      TIMESTAMPTZ,
    id             VARCHAR,
    kind           VARCHAR,
    sender         VARCHAR,
    recipient      VARCHAR,
    tag            VARCHAR,
    category       VARCHAR,
    causation_id   VARCHAR
)
"""

RELATIONS = {
    "conversations": """
SELECT c.correlation_id,
       row_number() OVER (PARTITION BY c.correlation_id ORDER BY c.seq) AS step,
       c.seq, c.stored_at, c.id, c.kind, c.sender, c.recipient, c.tag, c.category,
       c.causation_id, p.seq AS cause_seq, p.sender AS caused_by, p.kind AS cause_kind
FROM {s}.chain AS c
LEFT JOIN {s}.chain AS p ON p.correlation_id = c.correlation_id AND p.id = c.causation_id
""",
}

_INSERT = """
INSERT INTO {s}.chain
SELECT correlation_id, seq, stored_at, id, kind, sender, recipient, tag, subject_class, causation_id
FROM batch
WHERE error IS NULL AND correlation_id IS NOT NULL AND kind IS DISTINCT FROM 'delivery.report'
"""


def fold(tx: Tx, s: str, batch: Batch) -> int:
    """Append one step per envelope that belongs to a conversation; a forget marks the forgotten
    agent's private records sealed (projections.views._forget)."""
    written = tx.run(render(_INSERT, s))
    stub_chain(tx, s, batch)
    return written
