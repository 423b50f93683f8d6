"""One segment: its metadata (kept in the Parquet file's own key-value metadata), its file
name, the content hash of its records and the hash chain from segment to segment.

A segment covers the log's records with `after_seq` < seq <= `last_seq`: `after_seq` is the
previous segment's `last_seq` (0 for the first), so the segments tile the log without a hole or
an overlap even where the log's own sequence skips.

Content hash: SHA-256, column by column in this order, over
    seq        each value as 8 bytes little-endian
    stored_ns  the same (the server's stored time, ns since the epoch)
    subject, header, data
               (the subject as the views' UTF-8 text, the others as bytes)
               each value's length as 8 bytes little-endian, then every value's bytes
Chain hash: SHA-256 of `"<prev chain>:<after_seq>:<first_seq>:<last_seq>:<count>:<content>"`,
the first segment's previous chain being 64 zeros.
"""

from __future__ import annotations

import hashlib
import re

import msgspec
import pyarrow as pa
import pyarrow.compute as pc

from projections.batch import BATCH_SCHEMA

FORMAT = 1
METADATA_KEY = b"continuum.segment"
GENESIS = "0" * 64
SUFFIX = ".parquet"
_NAME = re.compile(r"^seg-(\d{20})-(\d{20})\.parquet$")
# A segment's columns: the fold's batch (projections.batch), then the record as stored.
SCHEMA = pa.schema([*BATCH_SCHEMA, ("stored_ns", pa.int64()), ("header", pa.binary()), ("data", pa.binary())])
# The columns whose min/max statistics are written (what lookups prune row groups by); verify
# checks them against the values.
STATISTICS = ("seq", "stored_at", "stored_ns", "id", "kind", "correlation_id")
# The columns the hashes cover, in hashing order.
HASHED_INTS = ("seq", "stored_ns")
HASHED_BYTES = ("subject", "header", "data")


class SegmentMeta(msgspec.Struct, frozen=True, kw_only=True):
    """What one segment holds (see the module docstring)."""

    stream: str
    first_seq: int
    last_seq: int
    after_seq: int
    count: int
    content_sha256: str
    prev_chain_sha256: str
    chain_sha256: str
    first_stored_ns: int
    last_stored_ns: int
    format: int = FORMAT

    @property
    def name(self) -> str:
        return segment_name(self.first_seq, self.last_seq)


_meta_decoder = msgspec.json.Decoder(SegmentMeta)


def segment_name(first_seq: int, last_seq: int) -> str:
    """The file name of the segment holding `first_seq`..`last_seq` (sorts in log order)."""
    return f"seg-{first_seq:020d}-{last_seq:020d}{SUFFIX}"


def parse_name(name: str) -> tuple[int, int] | None:
    """(first_seq, last_seq) of a segment file name, or None for any other name."""
    match = _NAME.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def encode_meta(meta: SegmentMeta) -> bytes:
    return msgspec.json.encode(meta)


def decode_meta(raw: bytes) -> SegmentMeta:
    """Raises msgspec.DecodeError (or ValidationError) for metadata that is not a segment's."""
    return _meta_decoder.decode(raw)


def chain_hash(prev_chain: str, after_seq: int, first_seq: int, last_seq: int, count: int, content: str) -> str:
    """The chain hash of a segment (see the module docstring)."""
    text = f"{prev_chain}:{after_seq}:{first_seq}:{last_seq}:{count}:{content}"
    return hashlib.sha256(text.encode()).hexdigest()


def content_hash(table: pa.Table) -> str:
    """The content hash of a segment's records (see the module docstring), from the Arrow
    buffers directly: no Python object per record. Raises ValueError when a hashed column holds
    a null (a segment never does) or has the wrong type."""
    digest = hashlib.sha256()
    for name in HASHED_INTS:
        column = table.column(name)
        if not pa.types.is_int64(column.type) or column.null_count:
            raise ValueError(f"column {name} must be int64 without nulls")
        for chunk in column.chunks:
            digest.update(_values(chunk, 8))
    for name in HASHED_BYTES:
        column = table.column(name)
        if not (pa.types.is_binary(column.type) or pa.types.is_string(column.type)) or column.null_count:
            raise ValueError(f"column {name} must be binary or text without nulls")
        lengths = pc.cast(pc.binary_length(column), pa.int64())
        for chunk in lengths.chunks:
            digest.update(_values(chunk, 8))
        for chunk in column.chunks:
            if len(chunk):
                offsets = pa.Array.from_buffers(pa.int32(), len(chunk) + 1, [None, chunk.buffers()[1]], offset=chunk.offset)
                start, end = offsets[0].as_py(), offsets[-1].as_py()
                digest.update(memoryview(chunk.buffers()[2])[start:end])
    return digest.hexdigest()


def _values(chunk: pa.Array, width: int) -> memoryview:
    """The fixed-width values of `chunk` as bytes (its slice of the data buffer)."""
    if not len(chunk):
        return memoryview(b"")
    return memoryview(chunk.buffers()[1])[chunk.offset * width:(chunk.offset + len(chunk)) * width]
