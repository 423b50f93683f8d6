"""`blocks`: core-memory blocks, one row per version (the full value each time), and who holds
them.

A write (`memory.block.created`/`.set`/`.appended`/`.replaced`) applies when its version is
above the block's current one (a jump is applied and marked `gap`); its row ends (`ended_seq`)
when the next version applies. The current value is the row with `current` true. A write at or
below the current version is a redelivered duplicate when its value equals that version's (no
row), else a `stale_write`: kept as a `rejected` row, never applied. A value over the block's
limit (`over_limit`) or a write to a block never created (`unknown_block`) is rejected too.

`block_holders`: one row per holding interval of (block, agent), from the holders a block was
created with and `memory.block.attached`/`.detached` (attaching a holder twice changes nothing).

    current value:     SELECT value, version FROM blocks WHERE block_id = ? AND current
    value as of seq S: SELECT value FROM blocks WHERE block_id = ? AND NOT rejected
                         AND seq <= S AND (ended_seq IS NULL OR ended_seq > S)
    stale writes:      SELECT block_id, count(*) FROM blocks WHERE reject_reason = 'stale_write' GROUP BY ALL
    near their limit:  SELECT * FROM blocks WHERE current AND chars > 0.9 * "limit"
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from projections.views import Tx, render
from projections.views._kinds import kinds_in
from projections.views._single import Single, Unfit, single_record, text

if TYPE_CHECKING:
    from projections.batch import Batch

NAME = "blocks"
VERSION = 1

TABLES = """
CREATE TABLE {s}.block_meta (
    block_id     VARCHAR PRIMARY KEY,
    label        VARCHAR,
    "limit"      BIGINT,
    description  VARCHAR,
    read_only    BOOLEAN,
    created_seq  BIGINT NOT NULL,
    created_by   VARCHAR
);
CREATE TABLE {s}.block_versions (
    block_id      VARCHAR NOT NULL,
    version       BIGINT,
    value         VARCHAR,
    chars         BIGINT,
    actor         VARCHAR,
    op            VARCHAR,      -- created | set | appended | replaced
    reason        VARCHAR,      -- the writer's reason (set)
    seq           BIGINT NOT NULL,
    written_at    TIMESTAMPTZ,
    ended_seq     BIGINT,       -- seq of the next applied version (NULL: current, or rejected)
    gap           BOOLEAN NOT NULL,   -- applied, but versions were skipped before it
    rejected      BOOLEAN NOT NULL,
    reject_reason VARCHAR       -- stale_write | over_limit | unknown_block
);
CREATE TABLE {s}.block_holders (
    block_id      VARCHAR NOT NULL,
    agent         VARCHAR NOT NULL,
    attached_seq  BIGINT NOT NULL,
    attached_at   TIMESTAMPTZ,
    attached_by   VARCHAR,
    detached_seq  BIGINT,       -- NULL while held
    detached_at   TIMESTAMPTZ,
    detached_by   VARCHAR
)
"""

RELATIONS = {
    "blocks": """
SELECT v.block_id, m.label, m."limit", m.description, m.read_only, v.version, v.value, v.chars,
       v.actor, v.op, v.reason, v.seq, v.written_at, v.ended_seq, v.gap, v.rejected, v.reject_reason,
       NOT v.rejected AND v.ended_seq IS NULL AS current
FROM {s}.block_versions AS v LEFT JOIN {s}.block_meta AS m USING (block_id)
""",
    "block_holders": "SELECT *, detached_seq IS NULL AS holding FROM {s}.block_holders",
}

_META = """
INSERT INTO {s}.block_meta
SELECT payload->>'block_id', payload->>'label', TRY_CAST(payload->>'limit' AS BIGINT),
       coalesce(payload->>'description', ''), coalesce(TRY_CAST(payload->>'read_only' AS BOOLEAN), FALSE),
       seq, payload->>'actor'
FROM batch
WHERE kind = 'memory.block.created' AND error IS NULL AND payload->>'block_id' IS NOT NULL
QUALIFY row_number() OVER (PARTITION BY payload->>'block_id' ORDER BY seq) = 1
ON CONFLICT (block_id) DO NOTHING
"""

_WRITES = {"memory.block.created", "memory.block.set", "memory.block.appended", "memory.block.replaced"}
_HOLDING = {"memory.block.created", "memory.block.attached", "memory.block.detached"}

# Every write of the batch, classified. A write applies iff its version is above every
# eligible version before it (stored or earlier in the batch): eligible writes that did not
# apply never raised the maximum, so a running max over them all is the current version.
_CLASSIFY = """
CREATE OR REPLACE TEMP TABLE _block_rows AS
WITH w AS (
    SELECT b.seq, b.created_at AS written_at, b.payload->>'block_id' AS block_id,
           coalesce(TRY_CAST(b.payload->>'version' AS BIGINT), CASE WHEN b.kind = 'memory.block.created' THEN 1 END) AS version,
           coalesce(b.payload->>'value', '') AS value, b.payload->>'actor' AS actor,
           replace(b.kind, 'memory.block.', '') AS op, b.payload->>'reason' AS reason,
           m."limit", m.created_seq IS NOT NULL AND m.created_seq <= b.seq AS known
    FROM batch AS b LEFT JOIN {s}.block_meta AS m ON m.block_id = b.payload->>'block_id'
    WHERE b.error IS NULL AND b.payload->>'block_id' IS NOT NULL
      AND b.kind IN ('memory.block.created', 'memory.block.set', 'memory.block.appended', 'memory.block.replaced')
), stored AS (
    SELECT block_id, max(version) AS stored_version FROM {s}.block_versions
    WHERE NOT rejected AND block_id IN (SELECT block_id FROM w) GROUP BY block_id
), checked AS (
    SELECT w.*, length(w.value) AS chars, coalesce(s.stored_version, 0) AS stored_version,
           w.known AND w.version IS NOT NULL AND (w."limit" IS NULL OR length(w.value) <= w."limit") AS eligible
    FROM w LEFT JOIN stored AS s USING (block_id)
), ranked AS (
    SELECT * EXCLUDE (stored_version),
           greatest(stored_version, coalesce(max(version) FILTER (WHERE eligible) OVER (
               PARTITION BY block_id ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)) AS before
    FROM checked
), classified AS (
    SELECT *, eligible AND version > before AS applied FROM ranked
), applied_values AS (
    -- the value each applied version has (stored, or applied earlier in this batch)
    SELECT block_id, version, value, 0 AS seq FROM {s}.block_versions
    WHERE NOT rejected AND block_id IN (SELECT block_id FROM w)
    UNION ALL
    SELECT block_id, version, value, seq FROM classified WHERE applied
)
SELECT c.*,
       CASE WHEN c.applied THEN lead(c.seq) OVER (PARTITION BY c.block_id, c.applied ORDER BY c.seq) END AS next_seq,
       CASE WHEN NOT c.known THEN 'unknown_block'
            WHEN NOT c.eligible THEN 'over_limit'
            WHEN NOT c.applied THEN 'stale_write' END AS reject_reason,
       NOT c.applied AND c.eligible AND EXISTS (
           SELECT 1 FROM applied_values AS a
           WHERE a.block_id = c.block_id AND a.version = c.version AND a.value = c.value AND a.seq < c.seq
       ) AS duplicate
FROM classified AS c
"""

_END_CURRENT = """
UPDATE {s}.block_versions AS v SET ended_seq = n.first_seq
FROM (SELECT block_id, min(seq) AS first_seq FROM _block_rows WHERE applied GROUP BY block_id) AS n
WHERE v.block_id = n.block_id AND v.ended_seq IS NULL AND NOT v.rejected
"""

_INSERT = """
INSERT INTO {s}.block_versions
SELECT block_id, version, value, chars, actor, op, reason, seq, written_at, next_seq,
       applied AND version > before + 1, NOT applied, reject_reason
FROM _block_rows WHERE applied OR NOT duplicate
"""

# Holding: attach sets it, detach clears it; a row per interval opened by a change of state.
_HOLDERS = """
CREATE OR REPLACE TEMP TABLE _block_holds AS
WITH ev AS (
    SELECT payload->>'block_id' AS block_id, h.agent, seq, created_at AS event_at, payload->>'actor' AS actor, TRUE AS holding
    FROM batch, unnest(from_json(coalesce(payload->'holders', '[]'), '["VARCHAR"]')) AS h(agent)
    WHERE kind = 'memory.block.created' AND error IS NULL
    UNION ALL
    SELECT payload->>'block_id', payload->>'agent', seq, created_at, payload->>'actor', kind = 'memory.block.attached'
    FROM batch WHERE kind IN ('memory.block.attached', 'memory.block.detached') AND error IS NULL
), stated AS (
    SELECT ev.*, coalesce(lag(holding) OVER (PARTITION BY ev.block_id, ev.agent ORDER BY seq),
                          EXISTS (SELECT 1 FROM {s}.block_holders AS o WHERE o.block_id = ev.block_id
                                  AND o.agent = ev.agent AND o.detached_seq IS NULL)) AS was
    FROM ev WHERE block_id IS NOT NULL AND agent IS NOT NULL
)
SELECT *, lead(seq) OVER w AS next_seq, lead(event_at) OVER w AS next_at, lead(actor) OVER w AS next_actor
FROM stated WHERE holding <> was
WINDOW w AS (PARTITION BY block_id, agent ORDER BY seq)
"""

_DETACH = """
UPDATE {s}.block_holders AS o SET detached_seq = d.seq, detached_at = d.event_at, detached_by = d.actor
FROM (SELECT block_id, agent, arg_min(seq, seq) AS seq, arg_min(event_at, seq) AS event_at, arg_min(actor, seq) AS actor
      FROM _block_holds WHERE NOT holding GROUP BY block_id, agent) AS d
WHERE o.block_id = d.block_id AND o.agent = d.agent AND o.detached_seq IS NULL
"""

_ATTACH = """
INSERT INTO {s}.block_holders
SELECT block_id, agent, seq, event_at, actor, next_seq, next_at, next_actor FROM _block_holds WHERE holding
"""


# One write (set, appended or replaced) in the batch: its fields are read in Python (see
# `_single.single_record`) and `_CLASSIFY`'s rules applied to the block's state, read by one
# point query. Three small statements instead of a temp table built by a dozen operators
# (~12 ms on one row) and three statements over it.
_STATE_ONE = """
SELECT m."limit", m.created_seq, s.stored_version, coalesce(s.duplicate, FALSE)
FROM (SELECT max(version) AS stored_version, bool_or(version = $2 AND value = $3) AS duplicate
      FROM {s}.block_versions WHERE block_id = $1 AND NOT rejected) AS s
LEFT JOIN {s}.block_meta AS m ON m.block_id = $1
"""

_END_CURRENT_ONE = """
UPDATE {s}.block_versions SET ended_seq = $2 WHERE block_id = $1 AND ended_seq IS NULL AND NOT rejected
"""

_INSERT_ONE = """
INSERT INTO {s}.block_versions
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, make_timestamptz($9::BIGINT), NULL, $10, $11, $12)
"""

_EDITS = frozenset({"memory.block.set", "memory.block.appended", "memory.block.replaced"})


def _write_fields(one: Single) -> tuple[str, int | None, str, str | None, str | None] | None:
    """block_id, version, value, actor and reason as `_CLASSIFY` reads them from the payload
    of a write that is not a creation; None if one is not of a shape read exactly here."""
    p = one.payload
    try:
        block_id, value = text(p, "block_id"), text(p, "value")
        actor, reason = text(p, "actor"), text(p, "reason")
    except Unfit:
        return None
    version = p.get("version")
    if version is not None and not (type(version) is int and -(2**63) <= version < 2**63):
        return None  # text, a fraction, a bool: left to TRY_CAST of the JSON text
    if block_id is None:
        return None
    return block_id, version, "" if value is None else value, actor, reason


def _fold_one(tx: Tx, s: str, one: Single) -> int | None:
    """Classify and store one write as `_CLASSIFY`, `_END_CURRENT` and `_INSERT` would for a
    batch holding only it; None (nothing run) if its payload is left to those statements."""
    fields = _write_fields(one)
    if fields is None:
        return None
    block_id, version, value, actor, reason = fields
    chars = len(value)  # `length` counts code points, as len does
    [(limit, created_seq, stored, duplicate)] = tx.rows(render(_STATE_ONE, s), [block_id, version, value])
    known = created_seq is not None and created_seq <= one.seq
    eligible = known and version is not None and (limit is None or chars <= limit)
    before = max(stored or 0, 0)  # greatest(stored_version, 0), as `_CLASSIFY` has it
    applied = eligible and version > before  # type: ignore[operator]
    if not applied and eligible and duplicate:
        return 0  # a redelivered write of a version already applied: no row
    written = 0
    if applied:
        written += tx.run(render(_END_CURRENT_ONE, s), [block_id, one.seq])
    reject = None if applied else "unknown_block" if not known else "over_limit" if not eligible else "stale_write"
    row: list[Any] = [
        block_id, version, value, chars, actor, one.kind.removeprefix("memory.block."), reason, one.seq,
        one.created_us, applied and version > before + 1, not applied, reject,  # type: ignore[operator]
    ]
    return written + tx.run(render(_INSERT_ONE, s), row)


def fold(tx: Tx, s: str, batch: Batch) -> int:
    """Register new blocks, classify and store the batch's writes (ending the versions they
    replace), then open and close holding intervals."""
    # The temp tables live in the fold's transaction: a failure rolls them back with the rest.
    kinds = kinds_in(batch)
    written = 0
    if "memory.block.created" in kinds:
        written += tx.run(render(_META, s))
    if kinds & _WRITES:
        one = None if "memory.block.created" in kinds else single_record(batch, _EDITS)
        done = None if one is None else _fold_one(tx, s, one)
        if done is not None:
            written += done
        else:
            tx.run(render(_CLASSIFY, s))
            written += tx.run(render(_END_CURRENT, s)) + tx.run(render(_INSERT, s))
            tx.run("DROP TABLE temp._block_rows")
    if kinds & _HOLDING:
        tx.run(render(_HOLDERS, s))
        written += tx.run(render(_DETACH, s)) + tx.run(render(_ATTACH, s))
        tx.run("DROP TABLE temp._block_holds")
    return written
