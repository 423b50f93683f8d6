"""Decoding log records once per batch into one Arrow table that every view's fold reads.

Each record is decoded with `schemas.decode_loose`: the envelope fields are validated, the
payload stays `msgspec.Raw` and goes into DuckDB as JSON text, for the views to parse in SQL.
Unknown kinds are fine. Bytes that are not an envelope keep their row (seq, time, subject) with
`error` saying why and `raw` holding the bytes, so nothing read is ever dropped.

The table's columns (the relation `batch` that folds select from):

    seq BIGINT, stored_at TIMESTAMPTZ, subject, id, kind, sender, recipient, tag, reply_to,
    correlation_id, causation_id, priority SMALLINT, created_at, expires_at TIMESTAMPTZ,
    prev_seq BIGINT (the envelope's `Bus-Prev-Seq` header), chain (the subject filter the server
    checked that claim against, from the stored `Nats-Expected-Last-Subject-Sequence-Subject`
    header; NULL for the agent's whole event chain), headers JSON, payload JSON, error, raw BLOB
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, ClassVar

import msgspec
import pyarrow as pa
import pyarrow.compute as pc

from projections.reader import LogRecord
from schemas import DecodeError, decode_loose

PREV_SEQ_HEADER = "Bus-Prev-Seq"
_FENCE_HEADER = b"Nats-Expected-Last-Subject-Sequence-Subject:"

_UTC_US = pa.timestamp("us", tz="UTC")
_UTC_NS = pa.timestamp("ns", tz="UTC")
_fields = attrgetter(
    "id", "sender", "to", "tag", "reply_to", "correlation_id", "causation_id",
    "priority", "created_at", "expires_at", "headers", "payload",
)
_headers_encoder = msgspec.json.Encoder()


class _Kind(msgspec.Struct):
    kind: Any = None


_kind_decoder = msgspec.json.Decoder(_Kind)
_KIND_PREFIX = b'{"kind":"'


class _Undecodable:
    """Stands in for an envelope that did not decode: every field empty."""

    id = sender = to = tag = reply_to = correlation_id = causation_id = None
    priority = created_at = expires_at = payload = None
    headers: ClassVar[dict[str, str]] = {}


_UNDECODABLE = _Undecodable()


@dataclass(frozen=True, slots=True)
class Batch:
    """Decoded records in sequence order, as an Arrow table; `after_seq` is the sequence
    applied just before them (folds use it to see gaps in the log)."""

    table: pa.Table
    seqs: Sequence[int]
    last_time_ns: int
    after_seq: int = 0
    # What the records hold (None: unknown, assume anything), so folds can skip the statements
    # that would read nothing: a statement costs milliseconds even on an empty input.
    kinds: frozenset[str] | None = None
    categories: frozenset[str] | None = None
    claims: bool | None = None  # some record carries Bus-Prev-Seq

    @property
    def size(self) -> int:
        return len(self.seqs)

    def has_kind(self, *kinds: str) -> bool:
        """True if some record may have one of these payload kinds."""
        return self.kinds is None or not self.kinds.isdisjoint(kinds)

    def has_category(self, *categories: str) -> bool:
        """True if some record may be on a subject of one of these classes (inbox, group,
        event, reply, dead)."""
        return self.categories is None or not self.categories.isdisjoint(categories)

    @property
    def contiguous(self) -> bool:
        """True if the records follow `after_seq` without a hole."""
        return self.seqs[0] == self.after_seq + 1 and self.seqs[-1] - self.seqs[0] + 1 == len(self.seqs)

    @property
    def first_seq(self) -> int:
        return self.seqs[0]

    @property
    def last_seq(self) -> int:
        return self.seqs[-1]

    def window(self, after: int, upto: int | None = None) -> Batch | None:
        """The records with `after` < seq <= `upto` (a zero-copy slice), or None if none."""
        from bisect import bisect_right

        lo = bisect_right(self.seqs, after)
        hi = len(self.seqs) if upto is None else bisect_right(self.seqs, upto)
        if lo >= hi:
            return None
        if lo == 0 and hi == len(self.seqs) and after == self.after_seq:
            return self
        return dataclasses.replace(
            self,
            table=self.table.slice(lo, hi - lo),
            seqs=self.seqs[lo:hi],
            last_time_ns=self.last_time_ns if hi == len(self.seqs) else _time_at(self.table, hi - 1),
            after_seq=after,
        )


def merge(batches: Sequence[Batch]) -> Batch:
    """Consecutive batches (in sequence order) as one: a lane that fell behind folds what
    waits for it in one transaction, paying a statement's fixed cost once."""
    if len(batches) == 1:
        return batches[0]
    kinds = [b.kinds for b in batches]
    categories = [b.categories for b in batches]
    claims = [b.claims for b in batches]
    return Batch(
        table=pa.concat_tables([b.table for b in batches]),
        seqs=[seq for b in batches for seq in b.seqs],
        last_time_ns=batches[-1].last_time_ns,
        after_seq=batches[0].after_seq,
        kinds=None if None in kinds else frozenset().union(*kinds),  # type: ignore[arg-type]
        categories=None if None in categories else frozenset().union(*categories),  # type: ignore[arg-type]
        claims=True if True in claims else (None if None in claims else False),
    )


def _time_at(table: pa.Table, index: int) -> int:
    value = table.column("stored_at")[index].value
    return int(value) * 1000


def build_batch(records: Sequence[LogRecord], *, after_seq: int = 0) -> Batch:
    """Decode `records` (non-empty, in sequence order) into a Batch. Never raises on bad bytes."""
    seqs, times, subjects, datas, nats_headers = zip(*records)
    try:
        envelopes: list[Any] = list(map(decode_loose, datas))
        errors: list[str | None] | None = None
    except DecodeError:
        envelopes, errors = _decode_each(datas)
    (ids, senders, tos, tags, reply_tos, correlations, causations,
     priorities, created, expires, headers, payloads) = zip(*map(_fields, envelopes))
    payload_bytes = [None if p is None else bytes(p) for p in payloads] if errors else list(map(bytes, payloads))
    prevs = [_prev_seq(h) if h else None for h in headers]
    chains = [None if p is None else _fence(h) for p, h in zip(prevs, nats_headers)]
    table = pa.table({
        "seq": pa.array(seqs, pa.int64()),
        "stored_at": pa.array(times, _UTC_NS).cast(_UTC_US, safe=False),
        "subject": _text(subjects),
        "id": pa.array(ids, pa.string()),
        "kind": _kinds(payload_bytes),
        "sender": pa.array(senders, pa.string()),
        "recipient": pa.array(tos, pa.string()),
        "tag": pa.array(tags, pa.string()),
        "reply_to": pa.array(reply_tos, pa.string()),
        "correlation_id": pa.array(correlations, pa.string()),
        "causation_id": pa.array(causations, pa.string()),
        "priority": pa.array(priorities, pa.int16()),
        "created_at": pa.array(created, _UTC_US),
        "expires_at": pa.array(expires, _UTC_US),
        "prev_seq": pa.array(prevs, pa.int64()),
        "chain": pa.array(chains, pa.string()),
        "headers": _text([_headers_encoder.encode(h) if h else None for h in headers]),
        "payload": _text(payload_bytes),
        "error": pa.array(errors if errors else [None] * len(seqs), pa.string()),
        "raw": pa.array(
            [d if e else None for d, e in zip(datas, errors)] if errors else [None] * len(seqs), pa.binary()
        ),
    })
    return Batch(
        table=table, seqs=seqs, last_time_ns=times[-1], after_seq=after_seq,
        kinds=frozenset(k for k in pc.unique(table.column("kind")).to_pylist() if k is not None),
        categories=_categories(subjects),
        claims=table.column("prev_seq").null_count < len(seqs),
    )


def _categories(subjects: Sequence[bytes]) -> frozenset[str]:
    """The subject classes present (`<ns>.<class>.…`): one C pass over the subjects."""
    column = pa.array(subjects, pa.binary())
    start = subjects[0].find(b".") + 1
    heads = pc.binary_slice(column, start, start + 6)
    return frozenset(h.split(b".")[0].decode("ascii", "replace") for h in pc.unique(heads).to_pylist())


def _decode_each(datas: Sequence[bytes]) -> tuple[list[Any], list[str | None]]:
    envelopes: list[Any] = []
    errors: list[str | None] = []
    for data in datas:
        try:
            envelopes.append(decode_loose(data))
            errors.append(None)
        except DecodeError as exc:
            envelopes.append(_UNDECODABLE)
            errors.append(str(exc))
    return envelopes, errors


def _kinds(payloads: list[bytes | None]) -> pa.Array:
    """The `kind` of each payload, as an Arrow string column.

    msgspec writes a tagged payload's tag first, so `{"kind":"task.requested",...` is read
    straight off the bytes; any payload not shaped so (other writers, escapes) is decoded."""
    prefix = _KIND_PREFIX
    start = len(prefix)
    kinds: list[bytes | None] = [
        p[start:p.find(b'"', start)] if p is not None and p.startswith(prefix) else None for p in payloads
    ]
    for i, kind in enumerate(kinds):
        if kind is None or b"\\" in kind or not kind:
            kinds[i] = _decoded_kind(payloads[i])
    return _text(kinds)


def _decoded_kind(payload: bytes | None) -> bytes | None:
    if payload is None:
        return None
    try:
        kind = _kind_decoder.decode(payload).kind
    except msgspec.DecodeError:
        return None
    return kind.encode() if isinstance(kind, str) else None


def _prev_seq(headers: dict[str, str]) -> int | None:
    value = headers.get(PREV_SEQ_HEADER)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return -1  # present but not a number: the integrity view reports it as a broken link


def _fence(header: bytes) -> str | None:
    """The subject filter of a server-checked expected-sequence append, from its header block."""
    at = header.find(_FENCE_HEADER)
    if at < 0:
        return None
    end = header.find(b"\r\n", at)
    return header[at + len(_FENCE_HEADER):end if end >= 0 else None].strip().decode("utf-8", errors="replace") or None


def _text(values: Sequence[bytes | None]) -> pa.Array:
    """UTF-8 bytes as an Arrow string column (one C pass; a slow pass only for bad bytes)."""
    try:
        return pa.array(values, pa.binary()).cast(pa.string())
    except pa.ArrowInvalid:
        return pa.array([None if v is None else v.decode("utf-8", errors="replace") for v in values], pa.string())
