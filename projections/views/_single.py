"""One record of a batch read in Python, for folds with a cheaper statement for a batch that holds
a single record of their kinds (a memory write arriving on its own): DuckDB spends about a
millisecond on each JSON extraction, window or ON CONFLICT even for one row, and a statement with
the fields bound as parameters costs a fraction of that. The record is read here only when its
fields read exactly as SQL's `->>` would read them; otherwise the fold runs its general statements.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from projections.batch import Batch

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


class Single(NamedTuple):
    """One record of a batch, its payload decoded (see `single_record`)."""

    seq: int
    created_us: int | None  # `created_at` in microseconds since the epoch
    id: str | None
    kind: str
    payload: dict[str, Any]


class Unfit(Exception):
    """A payload field is not of a shape the one-record statements read exactly as SQL would;
    the general statements fold the record instead."""


def single_record(batch: Batch, kinds: frozenset[str]) -> Single | None:
    """The batch's only record with one of `kinds`, if its payload reads the same in Python
    as through SQL's `->>`: an undamaged record (`error` NULL) whose payload is a JSON object
    that msgspec writes back byte for byte. That rules out duplicate keys (SQL reads the
    first, a dict keeps the last) and any spelling whose text `->>` would give differently;
    what msgspec writes (every envelope of this bus) passes. None otherwise: no such record,
    several, or a payload left to the general statements. Raises nothing."""
    table = batch.table
    hits = pc.is_in(table.column("kind"), value_set=pa.array(sorted(kinds), pa.string()))
    if pc.sum(hits).as_py() != 1:
        return None
    at = pc.index(hits, True).as_py()
    row = table.select(["seq", "id", "kind", "payload", "error"]).slice(at, 1).to_pylist()[0]
    body = row["payload"]
    if row["error"] is not None or body is None or "\\u0000" in body:
        return None  # an escaped NUL: not for a VARCHAR parameter to carry
    raw = body.encode()
    try:
        payload = _decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    try:
        if not isinstance(payload, dict) or _encode(payload) != raw:
            return None
    except (msgspec.EncodeError, UnicodeEncodeError):
        return None  # e.g. an escaped lone surrogate, which has no UTF-8 spelling
    created = table.column("created_at")[at]
    if created.type.unit != "us":
        return None
    return Single(row["seq"], created.value if created.is_valid else None, row["id"], row["kind"], payload)


def text(obj: dict[str, Any], key: str) -> str | None:
    """What `obj->>key` gives, for a string or null value. Raises Unfit for another type."""
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    raise Unfit(key)
