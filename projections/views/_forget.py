"""Folding a forget (`privacy.forgotten`, bus.privacy.forget): the rows a view opened from an
agent's sealed records before the forget are deleted (the private views) or put back to the stub
an unopenable record gets (`events`), so the views hold what a rebuild after the forget holds:
nothing of them (projections.opening leaves records it cannot open sealed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bus.privacy.sealing import PRIVATE_KINDS
from projections.views import Tx, render

if TYPE_CHECKING:
    from projections.batch import Batch

FORGOTTEN = "privacy.forgotten"

# The agents forgotten in this batch, and where: rows of records before that sequence go.
_FORGOTTEN = f"""(SELECT payload->>'subject' AS agent, min(seq) AS at FROM batch
    WHERE kind = '{FORGOTTEN}' AND error IS NULL AND payload->>'unit' = 'agent' GROUP BY ALL)"""
_PRIVATE = ", ".join(f"'{kind}'" for kind in sorted(PRIVATE_KINDS))


def erase_rows(tx: Tx, s: str, batch: Batch, *tables: str) -> int:
    """Delete the rows of `tables` (each with `agent` and `seq`) that the batch's forgets cover."""
    if not batch.has_kind(FORGOTTEN):
        return 0
    return sum(
        tx.run(render(f"DELETE FROM {{s}}.{table} USING {_FORGOTTEN} AS f "
                      f"WHERE {{s}}.{table}.agent = f.agent AND {{s}}.{table}.seq < f.at", s))
        for table in tables
    )


def erase_all_rows(tx: Tx, s: str, batch: Batch, table: str) -> int:
    """Delete the rows of `table` (with `agent`) of every agent the batch forgets."""
    if not batch.has_kind(FORGOTTEN):
        return 0
    return tx.run(render(f"DELETE FROM {{s}}.{table} USING {_FORGOTTEN} AS f WHERE {{s}}.{table}.agent = f.agent", s))


def stub_events(tx: Tx, s: str, batch: Batch) -> int:
    """Put the `events` rows of the forgotten agents' private records back to the stub."""
    if not batch.has_kind(FORGOTTEN):
        return 0
    return tx.run(render(f"""
UPDATE {{s}}.events SET kind = 'sealed',
    payload = json_object('kind', 'sealed', 'of', {{s}}.events.kind, 'key', 'agent.' || f.agent)
FROM {_FORGOTTEN} AS f
WHERE {{s}}.events.category = 'event' AND split_part({{s}}.events.subject, '.', 3) = f.agent
  AND {{s}}.events.kind IN ({_PRIVATE}) AND {{s}}.events.seq < f.at""", s))


def stub_chain(tx: Tx, s: str, batch: Batch) -> int:
    """Mark the forgotten agents' private records in `conversations.chain` as sealed (the kind a
    rebuild, unable to open them, records)."""
    if not batch.has_kind(FORGOTTEN):
        return 0
    return tx.run(render(f"""
UPDATE {{s}}.chain SET kind = 'sealed'
FROM {_FORGOTTEN} AS f
WHERE {{s}}.chain.category = 'event' AND {{s}}.chain.sender = f.agent
  AND {{s}}.chain.kind IN ({_PRIVATE}) AND {{s}}.chain.seq < f.at""", s))
