"""`archive_events`: the archive's records as a view the projection service defines over the
segment files, for `bus query` (the query's own SQL may name no file: projections.statement).

One row per archived record, the columns of `events` (decoded when the segment was sealed) and
the record exactly as stored: `stored_ns` (the server's time in ns), `header` (its NATS header
block, empty when it carried only its message id) and `data` (its bytes), and `segment` (the file
it is in). The view lists the segment files by name: the service redefines it when segments are
added (projections.archive.reader.ArchiveView).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from projections.store import sql_text

NAME = "archive_events"

_COLUMNS = """
    seq, stored_at, subject, split_part(subject, '.', 2) AS category, kind, id, sender, recipient, tag,
    reply_to, correlation_id, causation_id, priority, created_at, expires_at, prev_seq,
    CAST(headers AS JSON) AS headers, CAST(payload AS JSON) AS payload, error, raw,
    stored_ns, header, data"""

_EMPTY = """
SELECT NULL::BIGINT AS seq, NULL::TIMESTAMPTZ AS stored_at, NULL::VARCHAR AS subject, NULL::VARCHAR AS category,
       NULL::VARCHAR AS kind, NULL::VARCHAR AS id, NULL::VARCHAR AS sender, NULL::VARCHAR AS recipient,
       NULL::VARCHAR AS tag, NULL::VARCHAR AS reply_to, NULL::VARCHAR AS correlation_id,
       NULL::VARCHAR AS causation_id, NULL::SMALLINT AS priority, NULL::TIMESTAMPTZ AS created_at,
       NULL::TIMESTAMPTZ AS expires_at, NULL::BIGINT AS prev_seq, NULL::JSON AS headers, NULL::JSON AS payload,
       NULL::VARCHAR AS error, NULL::BLOB AS raw, NULL::BIGINT AS stored_ns, NULL::BLOB AS header,
       NULL::BLOB AS data, NULL::VARCHAR AS segment
WHERE false"""


def select_over(paths: Sequence[Path]) -> str:
    """The view's SELECT over the segment files `paths` (in log order); an empty archive gives
    no rows, with the same columns."""
    if not paths:
        return _EMPTY
    files = ", ".join(sql_text(str(path.resolve())) for path in paths)
    return f"SELECT {_COLUMNS}, parse_filename(filename) AS segment FROM read_parquet([{files}], filename = true)"
