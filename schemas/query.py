"""Wire types of the query service (core NATS request/reply, not events in the log).

A query is a read: it is answered by the process that owns the DuckDB file and is not recorded
as an event.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

QueryErrorKind = Literal["bad_sql", "not_allowed", "timeout", "lag", "too_large", "internal"]


class QueryRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Read-only SQL with positional `?` parameters. With `min_seq`, the answer waits until the
    views have applied that stream sequence (read-your-writes)."""

    sql: str
    params: list[Any] = []
    min_seq: int | None = None
    max_rows: int = 10_000
    timeout_s: float = 10.0


class QueryResult(msgspec.Struct, frozen=True, kw_only=True, tag="result", tag_field="status"):
    """Columns, their DuckDB type names, and rows in column order."""

    columns: list[str]
    types: list[str]
    rows: list[list[Any]]
    applied_seq: int
    truncated: bool = False
    elapsed_ms: float = 0.0


class QueryFailure(msgspec.Struct, frozen=True, kw_only=True, tag="failure", tag_field="status"):
    """Why a query was not answered."""

    kind: QueryErrorKind
    message: str


QueryResponse = QueryResult | QueryFailure
