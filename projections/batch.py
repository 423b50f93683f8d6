"""Decoding log records once per batch into one Arrow table that every view's fold reads.

Each record is decoded as `schemas.decode_loose` would: the envelope fields are validated, the
payload stays raw JSON and goes into DuckDB as JSON text, for the views to parse in SQL. Unknown
kinds are fine. Bytes that are not an envelope keep their row (seq, time, subject) with `error`
saying why and `raw` holding the bytes, so nothing read is ever dropped.

The table's columns (the relation `batch` that folds select from):

    seq BIGINT, stored_at TIMESTAMPTZ, subject, id, kind, sender, recipient, tag, reply_to,
    correlation_id, causation_id, priority SMALLINT, created_at, expires_at TIMESTAMPTZ,
    prev_seq BIGINT (the envelope's `Bus-Prev-Seq` header), chain (the subject filter the server
    checked that claim against, from the stored `Nats-Expected-Last-Subject-Sequence-Subject`
    header; NULL for the agent's whole event chain), headers JSON, payload JSON, error, raw BLOB

and two taken from the subject `<ns>.<class>.<name>.…` when a fold reads the batch
(`Batch.fold_table`), as SQL's `split_part(subject, '.', 2)` and `(…, 3)` would give them:

    subject_class (inbox | group | event | reply | dead), subject_name (the agent of an inbox,
    event or dead-letter subject, the tag of a group subject, the requester of a reply)

Decoding is column-wise wherever it can be: records are read into a slim Struct that leaves the
datetimes as text, and the per-column work (datetimes, payload bytes, payload kinds, UTF-8
checks) runs in Arrow's C++ kernels. A record that this way cannot vouch for (a decode error, a
datetime not spelled the way msgspec writes UTC) is decoded by `decode_loose` itself, whose
result or error message then fills its row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate, compress
from typing import Any, ClassVar

import msgspec
import pyarrow as pa
import pyarrow.compute as pc

from bus.log_reader import LogRecord
from schemas import PRIORITY_DEFAULT, DecodeError, decode_loose
from schemas.envelope import ENVELOPE_VERSION, Hops, Priority
from schemas.ids import ID_PATTERN
from schemas.limits import MAX_DEPTH, MAX_ENVELOPE_BYTES, Headers, Ident, Name, refusal

PREV_SEQ_HEADER = "Bus-Prev-Seq"
_FENCE_HEADER = b"Nats-Expected-Last-Subject-Sequence-Subject:"

_UTC_US = pa.timestamp("us", tz="UTC")
_UTC_NS = pa.timestamp("ns", tz="UTC")
_INT32_MAX = 2**31 - 1
_SCHEMA = pa.schema([
    ("seq", pa.int64()), ("stored_at", _UTC_US), ("subject", pa.string()), ("id", pa.string()),
    ("kind", pa.string()), ("sender", pa.string()), ("recipient", pa.string()), ("tag", pa.string()),
    ("reply_to", pa.string()), ("correlation_id", pa.string()), ("causation_id", pa.string()),
    ("priority", pa.int16()), ("created_at", _UTC_US), ("expires_at", _UTC_US), ("prev_seq", pa.int64()),
    ("chain", pa.string()), ("headers", pa.string()), ("payload", pa.string()), ("error", pa.string()),
    ("raw", pa.binary()),
])
# The table's schema, for those that keep batches (the archive's segments).
BATCH_SCHEMA = _SCHEMA
_headers_encoder = msgspec.json.Encoder()
_ID_ANCHORED = f"^{ID_PATTERN}$"


class _Fields(msgspec.Struct, kw_only=True, gc=False):
    """An envelope's fields as the table takes them: the names, types and defaults of
    `schemas.Envelope[msgspec.Raw]`, except that `created_at` and `expires_at` stay text.

    `gc=False` because a batch holds tens of thousands of these at once: tracked by the cycle
    collector they would be rescanned at every young-generation collection (they hold nothing
    that could refer back to them, so they cannot be part of a cycle)."""

    id: Ident
    sender: Name
    payload: msgspec.Raw
    created_at: str
    to: Name | None = None
    tag: Name | None = None
    correlation_id: Ident | None = None
    causation_id: Ident | None = None
    reply_to: Name | None = None
    priority: Priority = PRIORITY_DEFAULT
    expires_at: str | None = None
    # UNSET when absent (nearly always): no empty dict per record. An explicit null is still
    # refused, as the envelope refuses it.
    headers: Headers | msgspec.UnsetType = msgspec.UNSET
    hops: Hops = 0  # checked as the envelope checks it; no column (the envelope JSON keeps it)
    v: int = ENVELOPE_VERSION


_fields_decoder = msgspec.json.Decoder(_Fields)

# The two ways msgspec writes an aware UTC datetime (no fraction, or six digits), every digit
# shown as 0. Arrow reads text of these shapes to the instant msgspec reads, and refuses the
# impossible ones msgspec refuses (Feb 30, 24:00, :60); year 0 and any other spelling (offsets,
# nanoseconds, no zone) are left to msgspec.
_UTC_SHORT = b"0000-00-00T00:00:00Z"
_UTC_LONG = b"0000-00-00T00:00:00.000000Z"
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_TEXT_TO_US = pc.CastOptions.safe(_UTC_US)
_NS_TO_US = pc.CastOptions.unsafe(_UTC_US)

# msgspec writes a tagged payload's tag first, so the kind of `{"kind":"task.requested",...` is
# read straight off the bytes; any payload not shaped so (other writers, escapes) is decoded.
_KIND_AT_START = r'^\{"kind":"(?P<kind>[^"\\]+)"'


class _Kind(msgspec.Struct):
    kind: Any = None


_kind_decoder = msgspec.json.Decoder(_Kind)


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
    # Some record broke the protocol though it was kept (an id that is not a lowercase UUID), or
    # is not an envelope at all: the `integrity` view reports those.
    odd_ids: bool | None = None
    refused: bool | None = None
    # `fold_table()` once worked out (a replaced batch works it out again from its own table).
    _fold_table: pa.Table | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def size(self) -> int:
        return len(self.seqs)

    def fold_table(self) -> pa.Table:
        """The relation folds read as `batch`: `table` and the subject's class and name as
        columns (see the module's docstring). Every view of every lane reads them: splitting
        the few distinct subjects once here costs a tenth of a `split_part` per statement."""
        if self._fold_table is None:
            object.__setattr__(self, "_fold_table", _with_subject_parts(self.table))
        return self._fold_table  # type: ignore[return-value]

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

    def following(self, after_seq: int) -> Batch:
        """These records as following `after_seq` (what gap detection compares against)."""
        if after_seq == self.after_seq:
            return self
        moved = dataclasses.replace(self, after_seq=after_seq)
        object.__setattr__(moved, "_fold_table", self._fold_table)
        return moved

    def window(self, after: int, upto: int | None = None) -> Batch | None:
        """The records with `after` < seq <= `upto` (a zero-copy slice), or None if none."""
        from bisect import bisect_right

        lo = bisect_right(self.seqs, after)
        hi = len(self.seqs) if upto is None else bisect_right(self.seqs, upto)
        if lo >= hi:
            return None
        if lo == 0 and hi == len(self.seqs) and after == self.after_seq:
            return self
        part = dataclasses.replace(
            self,
            table=self.table.slice(lo, hi - lo),
            seqs=self.seqs[lo:hi],
            last_time_ns=self.last_time_ns if hi == len(self.seqs) else _time_at(self.table, hi - 1),
            after_seq=after,
        )
        if self._fold_table is not None:
            object.__setattr__(part, "_fold_table", self._fold_table.slice(lo, hi - lo))
        return part


def merge(batches: Sequence[Batch]) -> Batch:
    """Consecutive batches (in sequence order) as one: a lane that fell behind folds what
    waits for it in one transaction, paying a statement's fixed cost once."""
    if len(batches) == 1:
        return batches[0]
    kinds = [b.kinds for b in batches]
    categories = [b.categories for b in batches]
    claims = [b.claims for b in batches]
    odd_ids = [b.odd_ids for b in batches]
    refused = [b.refused for b in batches]
    merged = Batch(
        table=pa.concat_tables([b.table for b in batches]),
        seqs=[seq for b in batches for seq in b.seqs],
        last_time_ns=batches[-1].last_time_ns,
        after_seq=batches[0].after_seq,
        kinds=None if None in kinds else frozenset().union(*kinds),  # type: ignore[arg-type]
        categories=None if None in categories else frozenset().union(*categories),  # type: ignore[arg-type]
        claims=_any(claims),
        odd_ids=_any(odd_ids),
        refused=_any(refused),
    )
    fold_tables = [b._fold_table for b in batches]
    if all(table is not None for table in fold_tables):  # (then the merged one's is theirs, joined)
        object.__setattr__(merged, "_fold_table", pa.concat_tables(fold_tables))
    return merged


def _any(flags: list[bool | None]) -> bool | None:
    """True if one batch's flag is, False if every one's is False, else None (unknown)."""
    return True if True in flags else (None if None in flags else False)


def _with_subject_parts(table: pa.Table) -> pa.Table:
    """`table` with `subject_class` and `subject_name`: each distinct subject split once."""
    subjects = pc.dictionary_encode(table.column("subject").combine_chunks())
    tokens = [subject.split(".") for subject in subjects.dictionary.to_pylist()]
    parts = [
        pc.take(pa.array([t[at] if len(t) > at else "" for t in tokens], pa.string()), subjects.indices)
        for at in (1, 2)
    ]
    return table.append_column("subject_class", parts[0]).append_column("subject_name", parts[1])


def _time_at(table: pa.Table, index: int) -> int:
    value = table.column("stored_at")[index].value
    return int(value) * 1000


def build_batch(records: Sequence[LogRecord], *, after_seq: int = 0) -> Batch:
    """Decode `records` (non-empty, in sequence order) into a Batch. Never raises on bad bytes."""
    seqs, times, subjects, datas, nats_headers = zip(*records)
    count = len(seqs)
    rows, errors, created, expires = _decode(datas)
    payloads = _payload_bytes([r.payload for r in rows], complete=errors is None)
    headers, prevs, chains = _header_columns([r.headers for r in rows], nats_headers)
    subject_bytes = pa.array(subjects, pa.binary())
    # One comprehension per column: attribute reads specialised by the interpreter, several
    # times cheaper than `attrgetter` or a tuple per row.
    table = pa.Table.from_arrays([
        pa.array(seqs, pa.int64()),
        pc.cast(pa.array(times, _UTC_NS), options=_NS_TO_US),
        _utf8(subject_bytes),
        pa.array([r.id for r in rows], pa.string()),
        _kinds(payloads),
        pa.array([r.sender for r in rows], pa.string()),
        pa.array([r.to for r in rows], pa.string()),
        pa.array([r.tag for r in rows], pa.string()),
        pa.array([r.reply_to for r in rows], pa.string()),
        pa.array([r.correlation_id for r in rows], pa.string()),
        pa.array([r.causation_id for r in rows], pa.string()),
        pa.array([r.priority for r in rows], pa.int16()),
        created,
        expires,
        prevs,
        chains,
        headers,
        _utf8(payloads),
        pa.array(errors, pa.string()) if errors else pa.nulls(count, pa.string()),
        pa.array([d if e else None for d, e in zip(datas, errors)], pa.binary())
        if errors else pa.nulls(count, pa.binary()),
    ], schema=_SCHEMA)
    return Batch(
        table=table, seqs=seqs, last_time_ns=times[-1], after_seq=after_seq,
        kinds=frozenset(k for k in pc.unique(table.column("kind")).to_pylist() if k is not None),
        categories=_categories(subject_bytes, subjects[0]),
        claims=prevs.null_count < count,
        odd_ids=not _all_ids(table),
        refused=errors is not None,
    )


def _all_ids(table: pa.Table) -> bool:
    """True when every id, correlation id and causation id present is an id as the protocol
    spells it (one RE2 pass per column, ~0.06 us a record)."""
    for name in ("id", "correlation_id", "causation_id"):
        column = table.column(name)
        if column.null_count < len(column) and pc.all(pc.match_substring_regex(column, _ID_ANCHORED)).as_py() is False:
            return False
    return True


def _decode(datas: Sequence[bytes]) -> tuple[list[Any], list[str | None] | None, pa.Array, pa.Array]:
    """Each record's fields (`_Fields`, an `Envelope`, or `_UNDECODABLE`), each record's error
    (None when all decoded), and the `created_at` and `expires_at` columns."""
    # Over a limit of schemas.limits (size, nesting): decoded exactly, which refuses it with the
    # reason, and never handed to msgspec (which recurses). Counting brackets clears nearly all.
    count = bytes.count
    exact = [
        i for i, data in enumerate(datas)
        if (len(data) > MAX_ENVELOPE_BYTES or count(data, b"[") + count(data, b"{") > MAX_DEPTH)
        and refusal(data) is not None
    ]
    try:
        if exact:
            raise _Refused
        rows: list[Any] = list(map(_fields_decoder.decode, datas))
    except (_Refused, msgspec.DecodeError, UnicodeDecodeError):
        rows, refused = _decode_fields_each(datas, exact)
        exact = sorted(set(exact).union(refused))
    created = [r.created_at for r in rows]
    expires = [r.expires_at for r in rows]
    odd = _odd_times(created) + _odd_times(expires)
    if odd:
        exact = sorted(set(exact).union(odd))
        for i in odd:
            created[i] = expires[i] = None
    try:
        stamps = [_timestamps(created), _timestamps(expires)]
    except pa.ArrowInvalid:
        # UTC-shaped text naming no real instant (Feb 30): rare enough to decode the batch exactly.
        exact = list(range(len(datas)))
        stamps = [pa.nulls(len(datas), _UTC_US)] * 2
    if not exact:
        return rows, None, stamps[0], stamps[1]
    errors: list[str | None] = [None] * len(datas)
    flags = [False] * len(datas)
    for i in exact:
        rows[i], errors[i] = _decode_exactly(datas[i])
        flags[i] = True
    mask = pa.array(flags, pa.bool_())
    # The envelope's datetimes, converted as Arrow converts any Python datetime.
    created_col, expires_col = (
        pc.replace_with_mask(stamp, mask, pa.array([getattr(rows[i], name) for i in exact], _UTC_US))
        for stamp, name in zip(stamps, ("created_at", "expires_at"))
    )
    return rows, errors if any(errors) else None, created_col, expires_col


class _Refused(Exception):
    """Some record of the batch must not reach the batch-wide decode."""


def _decode_fields_each(datas: Sequence[bytes], skip: Sequence[int]) -> tuple[list[Any], list[int]]:
    """`_Fields` of each record, `_UNDECODABLE` in place of those that did not decode (or are
    in `skip`), whose positions are returned too."""
    decode = _fields_decoder.decode
    skipped = set(skip)
    rows: list[Any] = []
    refused: list[int] = []
    for i, data in enumerate(datas):
        if i in skipped:
            rows.append(_UNDECODABLE)
            continue
        try:
            rows.append(decode(data))
        except (msgspec.DecodeError, UnicodeDecodeError):
            rows.append(_UNDECODABLE)
            refused.append(i)
    return rows, refused


def _decode_exactly(data: bytes) -> tuple[Any, str | None]:
    """The envelope `decode_loose` makes of `data`, or `_UNDECODABLE` and why not. Never raises:
    whatever the bytes make a decoder raise becomes the record's error."""
    try:
        return decode_loose(data), None
    except DecodeError as exc:
        return _UNDECODABLE, str(exc)
    except Exception as exc:  # noqa: BLE001 - one record never stops the fold; its row says why
        return _UNDECODABLE, f"cannot decode: {type(exc).__name__}: {exc}"


def _odd_times(texts: list[str | None]) -> list[int]:
    """Positions of datetime texts not spelled the way msgspec writes a UTC datetime."""
    absent = texts.count(None)
    if absent == len(texts):
        return []
    at = [i for i, t in enumerate(texts) if t is not None] if absent else None
    present: list[str] = texts if at is None else [texts[i] for i in at]  # type: ignore[assignment]
    # All texts at once, with every digit read as 0: in the usual batch one comparison of bytes.
    joined = "\n".join(present)
    shapes = joined.encode().translate(_DIGITS_AS_ZERO)
    zero_year = joined.startswith("0000") or "\n0000" in joined
    if not zero_year and shapes + b"\n" == (_UTC_LONG + b"\n") * len(present):
        return []
    lines = shapes.split(b"\n")
    if zero_year or len(lines) != len(present):  # a text holding a newline, or a year 0
        lines = [b"" if t.startswith("0000") else t.encode().translate(_DIGITS_AS_ZERO) for t in present]
    odd = [k for k, line in enumerate(lines) if line != _UTC_LONG and line != _UTC_SHORT]
    return odd if at is None else [at[k] for k in odd]


def _timestamps(texts: list[str | None]) -> pa.Array:
    """UTC datetime texts as a timestamp column. Raises ArrowInvalid for a date that does not
    exist."""
    if texts.count(None) == len(texts):
        return pa.nulls(len(texts), _UTC_US)
    return pc.cast(pa.array(texts, pa.string()), options=_TEXT_TO_US)


def _payload_bytes(payloads: list[msgspec.Raw | None], *, complete: bool) -> pa.Array:
    """The payloads' JSON as an Arrow binary column. When every record decoded, the payloads are
    concatenated in one pass and wrapped with their offsets (no bytes object per payload)."""
    if complete:
        offsets = list(accumulate(map(len, payloads), initial=0))  # type: ignore[arg-type]
        if offsets[-1] <= _INT32_MAX:
            data = pa.py_buffer(b"".join(payloads))  # type: ignore[arg-type]
            bounds = pa.array(offsets, pa.int32()).buffers()[1]
            return pa.Array.from_buffers(pa.binary(), len(payloads), [None, bounds, data])
    return pa.array([None if p is None else bytes(p) for p in payloads], pa.binary())


def _header_columns(
    headers: list[dict[str, str] | msgspec.UnsetType | None], nats_headers: Sequence[bytes]
) -> tuple[pa.Array, pa.Array, pa.Array]:
    """The `headers` JSON, `prev_seq` and `chain` columns. Few records carry headers, so only
    those are visited."""
    count = len(headers)
    at = list(compress(range(count), headers))
    if not at:
        return pa.nulls(count, pa.string()), pa.nulls(count, pa.int64()), pa.nulls(count, pa.string())
    texts: list[bytes | None] = [None] * count
    prevs: list[int | None] = [None] * count
    chains: list[str | None] = [None] * count
    for i in at:
        texts[i] = _headers_encoder.encode(headers[i])
        prevs[i] = prev = _prev_seq(headers[i])  # type: ignore[arg-type]
        if prev is not None:
            chains[i] = _fence(nats_headers[i])
    return _text(texts), pa.array(prevs, pa.int64()), pa.array(chains, pa.string())


def _kinds(payloads: pa.Array) -> pa.Array:
    """The `kind` of each payload (binary JSON), as an Arrow string column."""
    kinds = pc.extract_regex(payloads, _KIND_AT_START).flatten()[0]
    if kinds.null_count > payloads.null_count:  # some payload whose kind is not at its start
        undecided = pc.and_(pc.is_null(kinds), pc.is_valid(payloads))
        decoded = pa.array(list(map(_decoded_kind, payloads.filter(undecided).to_pylist())), pa.binary())
        kinds = pc.replace_with_mask(kinds, undecided, decoded)
    return _utf8(kinds)


def _categories(subjects: pa.Array, first: bytes) -> frozenset[str]:
    """The subject classes present (`<ns>.<class>.…`): one C pass over the subjects."""
    start = first.find(b".") + 1
    heads = pc.binary_slice(subjects, start, start + 6)
    return frozenset(h.split(b".")[0].decode("ascii", "replace") for h in pc.unique(heads).to_pylist())


def _decoded_kind(payload: bytes | None) -> bytes | None:
    if payload is None:
        return None
    try:
        kind = _kind_decoder.decode(payload).kind
    except (msgspec.DecodeError, UnicodeDecodeError):  # not JSON, or a kind that is not UTF-8
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
    return _utf8(pa.array(values, pa.binary()))


def _utf8(values: pa.Array) -> pa.Array:
    """A binary column of UTF-8 as a string column; bytes that are not UTF-8 are replaced."""
    text = values.view(pa.string())
    try:
        text.validate(full=True)  # the UTF-8 check, without a cast's fixed cost
    except pa.ArrowInvalid:
        return pa.array(
            [None if v is None else v.decode("utf-8", errors="replace") for v in values.to_pylist()], pa.string()
        )
    return text


def batch_of_table(table: pa.Table, *, last_time_ns: int) -> Batch:
    """A Batch of a table with the columns `build_batch` makes (say, read back from an archive
    segment), its flags worked out from the columns: nothing is decoded again. `last_time_ns` is
    the last record's stored time. Raises ValueError for an empty table or other columns."""
    if table.num_rows == 0:
        raise ValueError("a batch holds at least one record")
    if table.schema.names != _SCHEMA.names:
        raise ValueError(f"a batch table has the columns {', '.join(_SCHEMA.names)}")
    table = table.cast(_SCHEMA) if not table.schema.equals(_SCHEMA) else table
    subjects = table.column("subject").combine_chunks().view(pa.binary())
    error = table.column("error")
    return Batch(
        table=table, seqs=table.column("seq").to_pylist(), last_time_ns=last_time_ns,
        kinds=frozenset(k for k in pc.unique(table.column("kind")).to_pylist() if k is not None),
        categories=_categories(subjects, subjects[0].as_py()),
        claims=table.column("prev_seq").null_count < table.num_rows,
        odd_ids=not _all_ids(table),
        refused=error.null_count < table.num_rows,
    )
