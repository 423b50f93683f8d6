"""`messages`: one row per stored envelope sent to an agent, a tag, or as a reply, with its
lifecycle: sent, delivered n times, handled (by whom), failed, dead-lettered, expired, and timings.

The lifecycle comes from facts recorded by the consumers: `delivery.report` events (one
Settlement per ended delivery attempt), `delivery.dead_lettered` and `delivery.expired`, all of
which point at the envelope by its stream sequence. A terminal status (handled, skipped,
dead_lettered, expired) is never replaced by a later non-terminal one (a redelivered broadcast
retried by another agent does not undo "handled"); among terminal facts the latest wins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from projections.views import Tx, render

if TYPE_CHECKING:
    from projections.batch import Batch

NAME = "messages"
VERSION = 4

TABLES = """
CREATE TABLE {s}.messages (
    seq              BIGINT NOT NULL,   -- where the envelope is stored (settlements point here)
    id               VARCHAR,
    kind             VARCHAR,
    sender           VARCHAR,
    recipient        VARCHAR,
    tag              VARCHAR,
    reply_to         VARCHAR,
    correlation_id   VARCHAR,
    causation_id     VARCHAR,
    priority         SMALLINT,
    created_at       TIMESTAMPTZ,
    stored_at        TIMESTAMPTZ,
    expires_at       TIMESTAMPTZ,
    status           VARCHAR NOT NULL,  -- sent | retried | failed | handled | skipped | dead_lettered | expired
    status_at        TIMESTAMPTZ,       -- when the fact that set the status was stored
    deliveries       INTEGER NOT NULL,  -- delivery attempts that ended, over every consumer
    max_attempt      INTEGER NOT NULL,
    failures         INTEGER NOT NULL,  -- attempts that ended retried, failed or dead-lettered
    handled_by       VARCHAR,           -- agents whose handler succeeded, sorted, comma-separated
                                        -- (a scalar, not a list: DuckDB updates lists by rewriting rows)
    first_handled_at TIMESTAMPTZ,
    handler_ms       DOUBLE,            -- handler time of the first successful attempt
    last_error       VARCHAR,
    dead_lettered_at TIMESTAMPTZ,
    dead_reason      VARCHAR,
    expired_at       TIMESTAMPTZ,
    -- Durations from created_at, stored when their ends are known rather than computed by every
    -- query (three such expressions cost a point lookup ~1 ms, a third of it).
    publish_ms       DOUBLE,            -- to stored_at
    handled_ms       DOUBLE,            -- to first_handled_at
    settled_ms       DOUBLE,            -- to status_at, once the status is terminal
    last_traceback   VARCHAR            -- the traceback of the last failed attempt (its last frames)
);
-- Point lookups by envelope id (the common question: "what became of my message?").
CREATE INDEX messages_by_id ON {s}.messages (id)
"""

RELATIONS = {
    "messages": """
SELECT * REPLACE (coalesce(string_split(handled_by, ','), []::VARCHAR[]) AS handled_by)
FROM {s}.messages
""",
}

_INSERT = """
INSERT INTO {s}.messages
SELECT seq, id, kind, sender, recipient, tag, reply_to, correlation_id, causation_id, priority,
       created_at, stored_at, expires_at, 'sent', stored_at, 0, 0, 0, NULL,
       NULL, NULL, NULL, NULL, NULL, NULL, (epoch_us(stored_at) - epoch_us(created_at)) / 1000.0, NULL, NULL, NULL
FROM batch
WHERE error IS NULL AND subject_class IN ('inbox', 'group', 'reply')
"""

_TERMINAL = "('handled', 'skipped', 'dead_lettered', 'expired')"

# Facts of this batch about messages, aggregated per message; `ord` orders them as the log does.
# Every combination below (sum, first, last, union, terminal-sticky last) gives the same row
# whether the facts arrive in one batch or many.
# A message's status after the batch's facts (SET expressions all read the row as it was, so the
# durations that depend on the new status repeat these).
_NEW_STATUS = """CASE WHEN a.last_terminal IS NOT NULL THEN a.last_terminal
                  WHEN m.status IN {terminal} THEN m.status
                  ELSE coalesce(a.last_outcome, m.status) END"""
_NEW_STATUS_AT = """CASE WHEN a.last_terminal IS NOT NULL THEN a.last_terminal_at
                     WHEN m.status IN {terminal} THEN m.status_at
                     ELSE coalesce(a.last_outcome_at, m.status_at) END"""

_SETTLE = """
WITH reports AS (
    SELECT seq, stored_at, payload->>'agent' AS agent,
           from_json(payload->'settlements',
                     '[{"stream_seq":"BIGINT","attempt":"INTEGER","outcome":"VARCHAR","handler_ms":"DOUBLE","error":"VARCHAR","traceback":"VARCHAR"}]') AS sts
    FROM batch WHERE kind = 'delivery.report' AND error IS NULL
), settled AS (
    SELECT seq, stored_at, agent, unnest(sts) AS st, generate_subscripts(sts, 1) AS idx FROM reports
), facts AS (
    SELECT st.stream_seq AS target, seq * 65536 + idx AS ord, stored_at AS fact_at, agent, st.outcome AS outcome,
           st.attempt AS attempt, coalesce(st.handler_ms, 0.0) AS handler_ms, st.error AS error,
           st.traceback AS traceback, NULL::VARCHAR AS reason, 1 AS delivery
    FROM settled
    UNION ALL
    SELECT TRY_CAST(payload->>'original_seq' AS BIGINT), seq * 65536, stored_at, payload->>'agent',
           'dead_lettered', TRY_CAST(payload->>'deliveries' AS INTEGER), NULL, payload->>'error',
           payload->>'traceback', payload->>'reason', 0
    FROM batch WHERE kind = 'delivery.dead_lettered' AND error IS NULL
    UNION ALL
    SELECT TRY_CAST(payload->>'original_seq' AS BIGINT), seq * 65536, stored_at, payload->>'agent',
           'expired', NULL, NULL, NULL, NULL, NULL, 0
    FROM batch WHERE kind = 'delivery.expired' AND error IS NULL
), agg AS (
    SELECT target,
           arg_max(outcome, ord) FILTER (WHERE outcome IN {terminal})  AS last_terminal,
           arg_max(fact_at, ord) FILTER (WHERE outcome IN {terminal})       AS last_terminal_at,
           arg_max(outcome, ord) FILTER (WHERE outcome IS NOT NULL)    AS last_outcome,
           arg_max(fact_at, ord) FILTER (WHERE outcome IS NOT NULL)         AS last_outcome_at,
           sum(delivery)::INTEGER                                      AS deliveries,
           coalesce(max(attempt), 0)                                   AS max_attempt,
           count(*) FILTER (WHERE delivery = 1 AND outcome IN ('retried', 'failed', 'dead_lettered'))::INTEGER
                                                                       AS failures,
           list_sort(list_distinct(list(agent) FILTER (WHERE outcome = 'handled' AND delivery = 1 AND agent IS NOT NULL)))
                                                                       AS handled_by,
           min(fact_at) FILTER (WHERE outcome = 'handled')                  AS first_handled_at,
           arg_min(handler_ms, ord) FILTER (WHERE outcome = 'handled') AS handler_ms,
           arg_max(error, ord) FILTER (WHERE error IS NOT NULL)        AS last_error,
           arg_max(traceback, ord) FILTER (WHERE traceback IS NOT NULL) AS last_traceback,
           min(fact_at) FILTER (WHERE outcome = 'dead_lettered')            AS dead_lettered_at,
           arg_min(reason, ord) FILTER (WHERE reason IS NOT NULL)      AS dead_reason,
           min(fact_at) FILTER (WHERE outcome = 'expired')                  AS expired_at
    FROM facts WHERE target IS NOT NULL GROUP BY target
)
UPDATE {s}.messages AS m SET
    status = {status},
    status_at = {status_at},
    deliveries = m.deliveries + a.deliveries,
    max_attempt = greatest(m.max_attempt, a.max_attempt),
    failures = m.failures + a.failures,
    handled_by = CASE WHEN a.handled_by IS NULL THEN m.handled_by
                      ELSE array_to_string(list_sort(list_distinct(list_concat(
                               coalesce(string_split(m.handled_by, ','), []::VARCHAR[]), a.handled_by))), ',') END,
    first_handled_at = coalesce(m.first_handled_at, a.first_handled_at),
    handler_ms = CASE WHEN m.first_handled_at IS NULL THEN a.handler_ms ELSE m.handler_ms END,
    last_error = coalesce(a.last_error, m.last_error),
    last_traceback = coalesce(a.last_traceback, m.last_traceback),
    dead_lettered_at = coalesce(m.dead_lettered_at, a.dead_lettered_at),
    dead_reason = coalesce(m.dead_reason, a.dead_reason),
    expired_at = coalesce(m.expired_at, a.expired_at),
    handled_ms = (epoch_us(coalesce(m.first_handled_at, a.first_handled_at)) - epoch_us(m.created_at)) / 1000.0,
    settled_ms = CASE WHEN ({status}) IN {terminal}
                      THEN (epoch_us({status_at}) - epoch_us(m.created_at)) / 1000.0 END
FROM agg AS a
WHERE m.seq = a.target
""".replace("{status}", _NEW_STATUS).replace("{status_at}", _NEW_STATUS_AT).replace("{terminal}", _TERMINAL)



def fold(tx: Tx, s: str, batch: Batch) -> int:
    """Insert the batch's messages, then apply the batch's delivery facts to their rows."""
    written = tx.run(render(_INSERT, s)) if batch.has_category("inbox", "group", "reply") else 0
    if batch.has_kind("delivery.report", "delivery.dead_lettered", "delivery.expired"):
        written += tx.run(render(_SETTLE, s))
    return written
