"""`dead_letters`: messages that will not be handled, with the reason, the number of delivery
attempts, the error and its traceback, and the original bytes (and the original envelope as JSON when they were
one). An original too large to travel in its dead letter has `original` NULL and is found in
the log at `original_seq`, with `original_size` and `original_sha256` to check it by."""

from __future__ import annotations

from typing import TYPE_CHECKING

from projections.views import Tx, render

if TYPE_CHECKING:
    from projections.batch import Batch

NAME = "dead_letters"
VERSION = 3

TABLES = """
CREATE TABLE {s}.dead_letters (
    seq               BIGINT NOT NULL,   -- where the dead letter is stored
    stored_at         TIMESTAMPTZ,
    id                VARCHAR,
    agent             VARCHAR,           -- whose consumer gave up
    consumer          VARCHAR,
    reason            VARCHAR,           -- permanent | exhausted | undecodable | unknown_kind | invalid | max_deliveries
    attempts          INTEGER,           -- deliveries made before giving up
    error             VARCHAR,
    original_seq      BIGINT,
    original_subject  VARCHAR,
    original_id       VARCHAR,
    original_kind     VARCHAR,
    correlation_id    VARCHAR,
    original          BLOB,              -- the exact bytes that were delivered (NULL: too large, see original_seq)
    original_envelope JSON,              -- the same, when they are a JSON envelope
    original_size     BIGINT,            -- bytes of the original
    original_sha256   VARCHAR,           -- hex SHA-256 of the original (NULL in dead letters older than it)
    traceback         VARCHAR            -- the last attempt's traceback when its handler raised (its last frames)
)
"""

RELATIONS = {"dead_letters": "SELECT * FROM {s}.dead_letters"}

_INSERT = """
INSERT INTO {s}.dead_letters
SELECT seq, stored_at, id, payload->>'agent', payload->>'consumer', payload->>'reason',
       TRY_CAST(payload->>'deliveries' AS INTEGER), payload->>'error',
       TRY_CAST(payload->>'original_seq' AS BIGINT), payload->>'original_subject',
       payload->>'original_id', payload->>'original_kind', correlation_id,
       CASE WHEN carried THEN original END, CASE WHEN carried THEN TRY_CAST(TRY(decode(original)) AS JSON) END,
       coalesce(TRY_CAST(payload->>'original_size' AS BIGINT), octet_length(original)),
       payload->>'original_sha256', payload->>'traceback'
FROM (SELECT *, coalesce(octet_length(original) = TRY_CAST(payload->>'original_size' AS BIGINT), true) AS carried
      FROM (SELECT *, TRY(from_base64(payload->>'original')) AS original
            FROM batch WHERE kind = 'delivery.dead_lettered' AND error IS NULL))
"""


def fold(tx: Tx, s: str, batch: Batch) -> int:
    """Append one row per `delivery.dead_lettered` event."""
    return tx.run(render(_INSERT, s)) if batch.has_kind("delivery.dead_lettered") else 0
