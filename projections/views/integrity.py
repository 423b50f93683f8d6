"""`integrity`: what is wrong with the log as the projection saw it. Never folded silently.

Three checks:
* Agent chains. An event recorded with `bus.record(agent, ..., expected_seq=N)` carries
  `Bus-Prev-Seq: N`: the agent's previous event (on the subject filter the server checked, by
  default all of `<ns>.event.<agent>.>`) is at stream sequence N. If the last event on that chain
  the views saw is older than N, the event at N is `missing`; if it is newer, the chain was
  `fork`ed or rewritten (a write that did not see its predecessor). A header that is not a
  number is a `bad_link`. A narrower chain (a `fence` filter) is checked from its second
  link on: its history before the first fenced write is not known.
* The stream. Sequences that never reached the views (a hole in the log between two that did)
  are a `stream_gap`.
* The records. Bytes that are not an envelope (`events.error` says why) are `not_an_envelope`; an
  envelope whose `id`, `correlation_id` or `causation_id` is not a UUID in lowercase text (the
  protocol requires it; agents dead-letter such a message as `invalid`, the views keep it as it
  is, e.g. from a log written before that was enforced) is a `bad_id`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from projections.views import Tx, render
from schemas.ids import ID_PATTERN

if TYPE_CHECKING:
    from projections.batch import Batch

NAME = "integrity"
VERSION = 2

TABLES = """
CREATE TABLE {s}.integrity (
    seq          BIGINT NOT NULL,   -- the event at which the problem was seen
    stored_at    TIMESTAMPTZ,
    problem      VARCHAR NOT NULL,  -- missing | fork | bad_link | stream_gap | not_an_envelope | bad_id
    agent        VARCHAR,
    chain        VARCHAR,           -- the subject filter of the agent chain
    subject      VARCHAR,
    id           VARCHAR,
    kind         VARCHAR,
    claimed_prev BIGINT,            -- the previous sequence the event claims (stream_gap: first missing)
    seen_prev    BIGINT,            -- the previous sequence the views saw (stream_gap: last missing)
    detail       VARCHAR
);
CREATE TABLE {s}.chain_heads (
    chain    VARCHAR PRIMARY KEY,   -- a subject filter, e.g. default.event.alice.>
    agent    VARCHAR NOT NULL,
    last_seq BIGINT NOT NULL
)
"""

RELATIONS = {"integrity": "SELECT * FROM {s}.integrity"}

# Events of the batch, each under its agent and the chain filter it claims to extend; every
# chain that concerns the batch (`known`: followed since the agent's first event); and which
# events fall under which chain.
_EVENTS = """
ev AS (
    SELECT seq, stored_at, subject, id, kind, prev_seq, subject_name AS agent,
           split_part(subject, '.', 1) || '.event.' || subject_name || '.>' AS agent_chain,
           chain AS claimed_chain
    FROM batch WHERE subject_class = 'event'
), chains AS (
    SELECT agent, chain, bool_or(known) AS known FROM (
        SELECT agent, agent_chain AS chain, TRUE AS known FROM ev
        UNION ALL
        SELECT agent, claimed_chain, FALSE FROM ev WHERE claimed_chain IS NOT NULL AND prev_seq IS NOT NULL
        UNION ALL
        SELECT agent, chain, FALSE FROM {s}.chain_heads WHERE agent IN (SELECT agent FROM ev)
    ) GROUP BY agent, chain
), member AS (
    SELECT c.chain, c.agent, c.known, e.seq
    FROM chains AS c JOIN ev AS e ON e.agent = c.agent
    WHERE c.chain = e.agent_chain
       OR coalesce(TRY(regexp_full_match(e.subject,
              replace(replace(replace(c.chain, '.', '\\.'), '*', '[^.]+'), '>', '.+'))), FALSE)
)
"""

_CHECK = """
INSERT INTO {s}.integrity
WITH """ + _EVENTS + """, first_claim AS (
    SELECT claimed_chain AS chain, min(seq) AS first_seq
    FROM ev WHERE claimed_chain IS NOT NULL AND prev_seq IS NOT NULL GROUP BY claimed_chain
), linked AS (
    -- A chain is followed from the agent's first event (its whole chain) or from the first claim
    -- on it (a narrower one): so the outcome does not depend on where batches begin.
    SELECT m.chain, m.seq, m.known,
           lag(m.seq) OVER (PARTITION BY m.chain ORDER BY m.seq) AS batch_prev,
           h.last_seq AS head
    FROM member AS m
    LEFT JOIN {s}.chain_heads AS h ON h.chain = m.chain
    LEFT JOIN first_claim AS f ON f.chain = m.chain
    WHERE m.known OR h.last_seq IS NOT NULL OR m.seq >= f.first_seq
), checked AS (
    SELECT e.*, coalesce(e.claimed_chain, e.agent_chain) AS chain,
           CASE WHEN l.batch_prev IS NOT NULL THEN l.batch_prev
                WHEN l.head IS NOT NULL THEN l.head
                WHEN l.known THEN 0 END AS seen_prev
    FROM ev AS e JOIN linked AS l ON l.chain = coalesce(e.claimed_chain, e.agent_chain) AND l.seq = e.seq
    WHERE e.prev_seq IS NOT NULL
)
SELECT seq, stored_at,
       CASE WHEN prev_seq < 0 THEN 'bad_link' WHEN prev_seq > seen_prev THEN 'missing' ELSE 'fork' END,
       agent, chain, subject, id, kind, prev_seq, seen_prev,
       CASE WHEN prev_seq < 0 THEN 'Bus-Prev-Seq is not a sequence number'
            WHEN prev_seq > seen_prev THEN 'its previous event at seq ' || prev_seq || ' never reached the views (last seen on this chain: ' || seen_prev || ')'
            ELSE 'it claims seq ' || prev_seq || ' as its previous event, but seq ' || seen_prev || ' came after that on this chain' END
FROM checked
WHERE seen_prev IS NOT NULL AND prev_seq <> seen_prev
"""

_GAPS = """
INSERT INTO {s}.integrity
SELECT seq, stored_at, 'stream_gap', NULL, NULL, subject, id, kind, prev + 1, seq - 1,
       'sequences ' || (prev + 1) || '..' || (seq - 1) || ' are missing from the log'
FROM (SELECT seq, stored_at, subject, id, kind, coalesce(lag(seq) OVER (ORDER BY seq), ?) AS prev FROM batch)
WHERE seq > prev + 1
"""

_ADVANCE = """
INSERT INTO {s}.chain_heads
WITH """ + _EVENTS + """
SELECT chain, any_value(agent), max(seq) FROM member GROUP BY chain
ON CONFLICT (chain) DO UPDATE SET last_seq = greatest(last_seq, excluded.last_seq)
"""


# `batch.id` is NULL exactly when the record did not decode (`error` says why).
_ID = "'^" + ID_PATTERN + "$'"
_RECORDS = """
INSERT INTO {s}.integrity
SELECT seq, stored_at, CASE WHEN id IS NULL THEN 'not_an_envelope' ELSE 'bad_id' END,
       CASE WHEN subject_class = 'event' THEN subject_name END,
       NULL, subject, id, kind, NULL, NULL,
       CASE WHEN id IS NULL THEN error
            ELSE (CASE WHEN NOT regexp_matches(id, """ + _ID + """) THEN 'id'
                       WHEN NOT regexp_matches(coalesce(correlation_id, id), """ + _ID + """) THEN 'correlation_id'
                       ELSE 'causation_id' END)
                 || ' is not a UUID in lowercase text: agents dead-letter such a message as invalid' END
FROM batch
WHERE id IS NULL
   OR NOT regexp_matches(id, """ + _ID + """)
   OR NOT regexp_matches(coalesce(correlation_id, id), """ + _ID + """)
   OR NOT regexp_matches(coalesce(causation_id, id), """ + _ID + """)
"""


def fold(tx: Tx, s: str, batch: Batch) -> int:
    """Record the problems the batch shows, then move every chain's head to its last event.
    (Nothing to check without a claimed link, a hole, a refused record or an odd id; nothing to
    advance without events.)"""
    found = 0
    if batch.claims is not False:
        found = tx.run(render(_CHECK, s))
    if not batch.contiguous:
        found += tx.run(render(_GAPS, s), [batch.after_seq])
    if batch.refused is not False or batch.odd_ids is not False:
        found += tx.run(render(_RECORDS, s))
    if batch.has_category("event"):
        tx.run(render(_ADVANCE, s))
    return found
