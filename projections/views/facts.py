"""`facts`: archival memory, one row per fact, bitemporal and never deleted.

A fact becomes true in the log at `recorded_seq`/`recorded_at` (its `memory.fact.recorded`) and
stops at `ended_seq`/`ended_at` (the first `memory.fact.superseded` or `memory.fact.retracted`
that found it active; NULL while it is held). `valid_from`/`valid_to` are world time, as the
recorder stated them (a supersession's `valid_to`, when set, closes it). So:

    as of sequence S:  recorded_seq <= S AND (ended_seq IS NULL OR ended_seq > S)
    new since S:       recorded_seq > S  (and, for what stopped being held, ended_seq > S)

A second `memory.fact.recorded` with a known `fact_id` is a duplicate and changes nothing; an
ending of a fact that is not active (already ended, or not yet recorded at that point of the
log) changes nothing either. Both are counted in `fact_anomalies`, never applied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from projections.views import Tx, render
from projections.views._kinds import count_of, kinds_in
from projections.views._single import Single, Unfit, single_record, text

if TYPE_CHECKING:
    from projections.batch import Batch

NAME = "facts"
VERSION = 1

TABLES = """
CREATE TABLE {s}.facts (
    fact_id                VARCHAR PRIMARY KEY,
    subject                VARCHAR NOT NULL,   -- normalised key, e.g. fec:capacity-retention@cell-a
    subject_base           VARCHAR NOT NULL,   -- the subject before '@' (unqualified)
    statement              VARCHAR NOT NULL,
    value                  VARCHAR,            -- the normalised claim rule-based checks compare
    category               VARCHAR,            -- finding | method | observation | claim ...
    confidence             DOUBLE,
    recorded_by            VARCHAR,            -- the agent holding the fact
    tags                   VARCHAR[],
    source_ref             VARCHAR,
    source_title           VARCHAR,
    source_quote           VARCHAR,
    valid_from             TIMESTAMPTZ,        -- world time (NULL: unbounded)
    valid_to               TIMESTAMPTZ,
    recorded_seq           BIGINT NOT NULL,    -- transaction time: the log position it became true
    recorded_at            TIMESTAMPTZ,
    recorded_id            VARCHAR,            -- envelope id of the fact.recorded event
    status                 VARCHAR NOT NULL,   -- active | superseded | retracted
    ended_seq              BIGINT,             -- transaction time it stopped being held (NULL: held)
    ended_at               TIMESTAMPTZ,
    ended_by_fact          VARCHAR,            -- the superseding fact
    ended_rule             VARCHAR,
    ended_actor            VARCHAR,
    ended_reason           VARCHAR,
    ended_contradiction_id VARCHAR
);
CREATE TABLE {s}.fact_anomalies (
    seq       BIGINT NOT NULL,
    event_at  TIMESTAMPTZ,
    kind      VARCHAR NOT NULL,   -- duplicate_record | end_of_inactive_fact
    fact_id   VARCHAR,
    event     VARCHAR             -- the event kind that was not applied
)
"""

RELATIONS = {
    "facts": "SELECT *, ended_seq IS NULL AS current FROM {s}.facts",
    "fact_anomalies": "SELECT * FROM {s}.fact_anomalies",
}

_RECORDED = """
INSERT INTO {s}.facts
SELECT payload->>'fact_id', payload->>'subject', split_part(payload->>'subject', '@', 1),
       payload->>'statement', payload->>'value', coalesce(payload->>'category', 'claim'),
       TRY_CAST(payload->>'confidence' AS DOUBLE), payload->>'recorded_by',
       CASE WHEN json_type(payload->'tags') = 'ARRAY' THEN from_json(payload->'tags', '["VARCHAR"]')
            ELSE []::VARCHAR[] END,
       payload->'source'->>'ref', payload->'source'->>'title', payload->'source'->>'quote',
       TRY_CAST(payload->>'valid_from' AS TIMESTAMPTZ), TRY_CAST(payload->>'valid_to' AS TIMESTAMPTZ),
       seq, created_at, id, 'active', NULL, NULL, NULL, NULL, NULL, NULL, NULL
FROM batch
WHERE kind = 'memory.fact.recorded' AND error IS NULL AND payload->>'fact_id' IS NOT NULL
QUALIFY row_number() OVER (PARTITION BY payload->>'fact_id' ORDER BY seq) = 1
ON CONFLICT (fact_id) DO NOTHING
"""

# After the insert every recorded fact has its first record's seq: any other record is a repeat.
_REPEATED = """
INSERT INTO {s}.fact_anomalies
SELECT b.seq, b.created_at, 'duplicate_record', f.fact_id, b.kind
FROM batch AS b JOIN {s}.facts AS f ON f.fact_id = b.payload->>'fact_id'
WHERE b.kind = 'memory.fact.recorded' AND b.error IS NULL AND b.seq <> f.recorded_seq
"""

# The first ending after the fact was recorded, for facts still active; every other ending in
# the batch is an anomaly (computed before the update, against the same state).
_ENDINGS = """
endings AS (
    SELECT seq, created_at, kind, payload->>'fact_id' AS fact_id, payload
    FROM batch
    WHERE kind IN ('memory.fact.superseded', 'memory.fact.retracted') AND error IS NULL
), first_end AS (
    SELECT f.fact_id, arg_min(e.seq, e.seq) AS seq
    FROM {s}.facts AS f JOIN endings AS e ON e.fact_id = f.fact_id AND e.seq > f.recorded_seq
    WHERE f.ended_seq IS NULL
    GROUP BY f.fact_id
)
"""

_INACTIVE = """
INSERT INTO {s}.fact_anomalies
WITH """ + _ENDINGS + """
SELECT e.seq, e.created_at, 'end_of_inactive_fact', e.fact_id, e.kind
FROM endings AS e LEFT JOIN first_end AS w ON w.seq = e.seq
WHERE w.seq IS NULL
"""

_END = """
UPDATE {s}.facts AS f SET
    status = CASE e.kind WHEN 'memory.fact.superseded' THEN 'superseded' ELSE 'retracted' END,
    ended_seq = e.seq,
    ended_at = e.created_at,
    ended_by_fact = e.payload->>'by',
    ended_rule = e.payload->>'rule',
    ended_actor = e.payload->>'actor',
    ended_reason = e.payload->>'reason',
    ended_contradiction_id = e.payload->>'contradiction_id',
    valid_to = coalesce(TRY_CAST(e.payload->>'valid_to' AS TIMESTAMPTZ), f.valid_to)
FROM (
    WITH """ + _ENDINGS + """
    SELECT e.* FROM endings AS e JOIN first_end AS w ON w.seq = e.seq
) AS e
WHERE f.fact_id = e.fact_id
"""


# One fact recorded, its fields read in Python (see `single_record`) and bound as parameters:
# the statement costs a fraction of `_RECORDED`, whose JSON extractions, window and ON CONFLICT
# each cost about a millisecond even on one row. The NOT EXISTS on a constant key is a point
# lookup in the primary-key index; it inserts nothing iff the fact is already recorded.
_RECORDED_ONE = """
INSERT INTO {s}.facts (fact_id, subject, subject_base, statement, value, category, confidence, recorded_by,
                       tags, source_ref, source_title, source_quote, valid_from, valid_to, recorded_seq,
                       recorded_at, recorded_id, status)
SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9::VARCHAR[], $10, $11, $12,
       TRY_CAST($13::VARCHAR AS TIMESTAMPTZ), TRY_CAST($14::VARCHAR AS TIMESTAMPTZ),
       $15, make_timestamptz($16::BIGINT), $17, 'active'
WHERE NOT EXISTS (SELECT 1 FROM {s}.facts WHERE fact_id = $1)
"""

def _recorded_row(one: Single) -> list[Any] | None:
    """The parameters of `_RECORDED_ONE`, each what `_RECORDED` reads from the payload; None if
    a field is not of a shape read exactly here (the general statement folds it)."""
    p = one.payload
    try:
        fact_id, subject, category = text(p, "fact_id"), text(p, "subject"), text(p, "category")
        confidence = p.get("confidence")
        if confidence is not None and not (type(confidence) is float or (type(confidence) is int and abs(confidence) < 2**53)):
            raise Unfit("confidence")  # bool, huge int: left to TRY_CAST of the JSON text
        tags = p.get("tags")
        if isinstance(tags, list):
            if not all(isinstance(tag, str) for tag in tags):
                raise Unfit("tags")
        else:
            tags = []  # not an array: `_RECORDED` stores none
        source = p.get("source")
        if source is not None and not isinstance(source, dict):
            raise Unfit("source")
        source = source or {}
        row = [
            fact_id, subject, None if subject is None else subject.split("@", 1)[0],
            text(p, "statement"), text(p, "value"), "claim" if category is None else category,
            None if confidence is None else float(confidence), text(p, "recorded_by"), tags,
            text(source, "ref"), text(source, "title"), text(source, "quote"),
            text(p, "valid_from"), text(p, "valid_to"), one.seq, one.created_us, one.id,
        ]
    except Unfit:
        return None
    return row if fact_id is not None else None


_FACT_RECORDED = frozenset({"memory.fact.recorded"})


def fold(tx: Tx, s: str, batch: Batch) -> int:
    """Insert new facts (first record wins), then end the active ones the batch supersedes or
    retracts; what cannot apply goes to `fact_anomalies`."""
    kinds = kinds_in(batch)
    written = 0
    if "memory.fact.recorded" in kinds:
        one = single_record(batch, _FACT_RECORDED)
        row = None if one is None else _recorded_row(one)
        if row is not None:
            inserted = tx.run(render(_RECORDED_ONE, s), row)
            written += inserted
            if not inserted:  # the fact was recorded before: this record is a repeat
                tx.run(render(_REPEATED, s))
        else:
            inserted = tx.run(render(_RECORDED, s))
            written += inserted
            if inserted < count_of(batch, "memory.fact.recorded"):  # only then can one be a repeat
                tx.run(render(_REPEATED, s))
    if kinds & {"memory.fact.superseded", "memory.fact.retracted"}:
        written += tx.run(render(_INACTIVE, s))
        written += tx.run(render(_END, s))
    return written
