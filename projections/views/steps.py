"""`steps`: every recorded step of every handler run (`agent.step` events): which agent, for
which inbound message, its number and name, the attempt that recorded it, how long it took and
its result (JSON).

A step is recorded once (its subject `<ns>.event.<agent>.step.<inbound-id>.<index>` is written
with an expected last sequence of 0), so there is one row per (agent, inbound_id, step_index).
`id` is the step's id, the idempotency key the handler saw as `ctx.step_id`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from projections.views import Tx, render
from projections.views._forget import erase_rows

if TYPE_CHECKING:
    from projections.batch import Batch

NAME = "steps"
VERSION = 2

TABLES = """
CREATE TABLE {s}.steps (
    seq            BIGINT NOT NULL,   -- where the step record is stored
    stored_at      TIMESTAMPTZ,
    id             VARCHAR,           -- the step id (ctx.step_id)
    agent          VARCHAR,
    inbound_id     VARCHAR,           -- the message whose handler ran the step
    inbound_kind   VARCHAR,
    step_index     INTEGER,
    name           VARCHAR,
    attempt        INTEGER,           -- the delivery attempt that recorded it
    elapsed_ms     DOUBLE,
    result         JSON,
    correlation_id VARCHAR
)
"""

RELATIONS = {"steps": "SELECT * FROM {s}.steps"}

_INSERT = """
INSERT INTO {s}.steps
SELECT seq, stored_at, id, payload->>'agent', payload->>'inbound_id', payload->>'inbound_kind',
       TRY_CAST(payload->>'index' AS INTEGER), payload->>'name',
       TRY_CAST(payload->>'attempt' AS INTEGER), TRY_CAST(payload->>'elapsed_ms' AS DOUBLE),
       payload->'result', correlation_id
FROM batch WHERE kind = 'agent.step' AND error IS NULL
"""


def fold(tx: Tx, s: str, batch: "Batch") -> int:
    """Append one row per `agent.step` event."""
    erase_rows(tx, s, batch, "steps")  # a forget (projections.views._forget), before and after
    written = tx.run(render(_INSERT, s)) if batch.has_kind("agent.step") else 0
    erase_rows(tx, s, batch, "steps")
    return written
