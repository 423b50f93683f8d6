"""`contradictions`: two facts that cannot both hold, kept as data with both claims as they
stood when flagged, the rule that found them and the actor that flagged them.

A contradiction is open until a supersession or retraction of one of its two facts names its
`contradiction_id` (the first such event after the flag resolves it; later ones change nothing).
Open contradictions about a subject:

    SELECT * FROM contradictions WHERE open AND ? IN (subject_a, subject_b)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from projections.views import Tx, render
from projections.views._kinds import kinds_in

if TYPE_CHECKING:
    from projections.batch import Batch

NAME = "contradictions"
VERSION = 1

_CLAIM_COLUMNS = """
    fact_{x}         VARCHAR,
    subject_{x}      VARCHAR,
    statement_{x}    VARCHAR,
    value_{x}        VARCHAR,
    source_{x}       VARCHAR,
    recorded_by_{x}  VARCHAR,
    confidence_{x}   DOUBLE,"""

TABLES = """
CREATE TABLE {s}.contradictions (
    contradiction_id       VARCHAR PRIMARY KEY,
    rule                   VARCHAR,
    actor                  VARCHAR,          -- who flagged it
    note                   VARCHAR,""" + _CLAIM_COLUMNS.replace("{x}", "a") + _CLAIM_COLUMNS.replace("{x}", "b") + """
    flagged_seq            BIGINT NOT NULL,
    flagged_at             TIMESTAMPTZ,
    resolved_seq           BIGINT,           -- NULL while open
    resolved_at            TIMESTAMPTZ,
    resolved_by_event_kind VARCHAR,          -- memory.fact.superseded | memory.fact.retracted
    resolved_fact          VARCHAR,          -- the fact that was superseded or retracted
    resolved_rule          VARCHAR,
    resolved_actor         VARCHAR
)
"""

RELATIONS = {
    "contradictions": "SELECT *, resolved_seq IS NULL AS open FROM {s}.contradictions",
}

_CLAIM = """
       payload->'{c}'->>'fact_id', payload->'{c}'->>'subject', payload->'{c}'->>'statement',
       payload->'{c}'->>'value', payload->'{c}'->>'source', payload->'{c}'->>'recorded_by',
       TRY_CAST(payload->'{c}'->>'confidence' AS DOUBLE),"""

_FLAGGED = """
INSERT INTO {s}.contradictions
SELECT payload->>'contradiction_id', payload->>'rule', payload->>'actor', payload->>'note',""" + \
    _CLAIM.replace("{c}", "claim_a") + _CLAIM.replace("{c}", "claim_b") + """
       seq, created_at, NULL, NULL, NULL, NULL, NULL, NULL
FROM batch
WHERE kind = 'memory.contradiction.flagged' AND error IS NULL AND payload->>'contradiction_id' IS NOT NULL
QUALIFY row_number() OVER (PARTITION BY payload->>'contradiction_id' ORDER BY seq) = 1
ON CONFLICT (contradiction_id) DO NOTHING
"""

_RESOLVED = """
UPDATE {s}.contradictions AS c SET
    resolved_seq = r.seq, resolved_at = r.created_at, resolved_by_event_kind = r.kind,
    resolved_fact = r.fact_id, resolved_rule = r.rule, resolved_actor = r.actor
FROM (
    SELECT c.contradiction_id,
           arg_min(e.seq, e.seq) AS seq, arg_min(e.created_at, e.seq) AS created_at,
           arg_min(e.kind, e.seq) AS kind, arg_min(e.payload->>'fact_id', e.seq) AS fact_id,
           arg_min(e.payload->>'rule', e.seq) AS rule, arg_min(e.payload->>'actor', e.seq) AS actor
    FROM {s}.contradictions AS c
    JOIN batch AS e
      ON e.kind IN ('memory.fact.superseded', 'memory.fact.retracted') AND e.error IS NULL
     AND e.payload->>'contradiction_id' = c.contradiction_id
     AND e.payload->>'fact_id' IN (c.fact_a, c.fact_b)
     AND e.seq > c.flagged_seq
    WHERE c.resolved_seq IS NULL
    GROUP BY c.contradiction_id
) AS r
WHERE c.contradiction_id = r.contradiction_id
"""


def fold(tx: Tx, s: str, batch: Batch) -> int:
    """Insert newly flagged contradictions (first flag wins), then resolve open ones."""
    kinds = kinds_in(batch)
    written = tx.run(render(_FLAGGED, s)) if "memory.contradiction.flagged" in kinds else 0
    if kinds & {"memory.fact.superseded", "memory.fact.retracted"}:
        written += tx.run(render(_RESOLVED, s))
    return written
