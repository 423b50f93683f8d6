"""Wire types of the query service (core NATS request/reply, not events in the log).

A query is a read: it is answered by the process that owns the DuckDB file and is not recorded
as an event.

Limits (each refused with a `too_large` failure whose message names the limit): a request is at
most the server's max_payload when sent (checked by `Bus.query` before sending) and at most
`QuerySettings.max_request_bytes` (1 MiB by default) and `schemas.limits.MAX_DEPTH` nested
arrays deep when received; an answer is at most the server's max_payload; a query may grow the
service's memory by at most `QuerySettings.memory_limit_bytes`. A failure's message is at most
`MAX_MESSAGE_CHARS` long (DuckDB's errors can quote the whole SQL).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, Literal

import msgspec

QueryErrorKind = Literal["bad_sql", "not_allowed", "timeout", "lag", "too_large", "internal"]
MAX_MESSAGE_CHARS = 4096


class QueryRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Read-only SQL with positional `?` parameters. With `min_seq`, the answer waits until the
    views have applied that stream sequence (read-your-writes)."""

    sql: str
    params: list[Any] = []
    min_seq: int | None = None
    max_rows: int = 10_000
    timeout_s: float = 10.0


class QueryResult(msgspec.Struct, frozen=True, kw_only=True, tag="result", tag_field="status"):
    """Columns, their DuckDB type names, and rows in column order (as JSON values: times as
    ISO 8601 text, JSON columns as text; `records()` converts them back)."""

    columns: list[str]
    types: list[str]
    rows: list[list[Any]]
    applied_seq: int
    truncated: bool = False
    elapsed_ms: float = 0.0

    def records(self) -> list[dict[str, Any]]:
        """The rows as dicts by column name, with timestamps and dates as `datetime`/`date` and
        JSON columns decoded."""
        convert = [_CONVERTERS.get(t) for t in self.types]
        return [
            {name: (value if fn is None or value is None else fn(value)) for name, fn, value in zip(self.columns, convert, row)}
            for row in self.rows
        ]


def _decode_json(value: Any) -> Any:
    return msgspec.json.decode(value) if isinstance(value, str) else value


_CONVERTERS: dict[str, Any] = {
    "TIMESTAMP WITH TIME ZONE": lambda v: msgspec.convert(v, datetime),
    "TIMESTAMP": lambda v: msgspec.convert(v, datetime),
    "DATE": lambda v: msgspec.convert(v, date),
    "JSON": _decode_json,
}


class QueryFailure(msgspec.Struct, frozen=True, kw_only=True, tag="failure", tag_field="status"):
    """Why a query was not answered."""

    kind: QueryErrorKind
    message: str


def failure(kind: QueryErrorKind, message: str) -> QueryFailure:
    """A QueryFailure, its message cut to `MAX_MESSAGE_CHARS` (an answer must fit in a message)."""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 1] + "…"
    return QueryFailure(kind=kind, message=message)


QueryResponse = QueryResult | QueryFailure
