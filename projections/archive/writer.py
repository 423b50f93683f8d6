"""Writing one segment: the records decoded into the fold's columns, plus their exact bytes
(`prepare_segment`), written to a temporary name, synced, linked into place, and read back
verified (`store_segment`).

A crash at any point leaves either no segment file (a temporary one at most, removed by the next
run) or a whole, synced one; the next run verifies it before going on after it. Synchronous:
call it off the event loop.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bus.log_reader import LogRecord
from projections.archive.config import ArchiveSettings
from projections.archive.segment import (
    GENESIS,
    METADATA_KEY,
    STATISTICS,
    SegmentMeta,
    chain_hash,
    content_hash,
    encode_meta,
)
from projections.archive.verify import verify_file
from projections.errors import ArchiveCorrupt, ArchiveError
from projections.runner import decode

TEMP_PREFIX = ".tmp-"
# Columns of few distinct values: dictionary-encoded (the bytes and JSON columns are not).
_DICTIONARY = ["subject", "kind", "sender", "recipient", "tag", "reply_to", "chain"]


def archive_table(records: Sequence[LogRecord]) -> pa.Table:
    """The segment table of `records` (non-empty, in sequence order): the fold's batch columns
    (`projections.batch`), then `stored_ns`, `header` and `data`. Never raises on bad bytes: a
    record that does not decode keeps its row with the error, as in the views."""
    batch = decode(records)
    table = batch.table
    table = table.append_column("stored_ns", pa.array([r.time_ns for r in records], pa.int64()))
    table = table.append_column("header", pa.array([r.header for r in records], pa.binary()))
    return table.append_column("data", pa.array([r.data for r in records], pa.binary()))


@dataclass(frozen=True)
class Prepared:
    """A segment decoded and hashed, not yet written: its table (metadata included) and meta."""

    table: pa.Table
    meta: SegmentMeta


def prepare_segment(stream: str, records: Sequence[LogRecord], previous: SegmentMeta | None) -> Prepared:
    """Decode and hash `records` (non-empty, in sequence order, all after `previous`) as the
    segment after `previous` (None: the first). The Python-bound half of sealing (the
    decode); `store_segment` is the rest. Raises ValueError for records not after `previous`."""
    after_seq = previous.last_seq if previous is not None else 0
    if not records or records[0].seq <= after_seq:
        raise ValueError(f"a segment after seq {after_seq} needs records after it")
    table = archive_table(records)
    content = content_hash(table)
    prev_chain = previous.chain_sha256 if previous is not None else GENESIS
    first, last, count = records[0].seq, records[-1].seq, len(records)
    meta = SegmentMeta(
        stream=stream, first_seq=first, last_seq=last, after_seq=after_seq, count=count,
        content_sha256=content, prev_chain_sha256=prev_chain,
        chain_sha256=chain_hash(prev_chain, after_seq, first, last, count, content),
        first_stored_ns=records[0].time_ns, last_stored_ns=records[-1].time_ns,
    )
    return Prepared(table.replace_schema_metadata({METADATA_KEY: encode_meta(meta)}), meta)


def store_segment(settings: ArchiveSettings, prepared: Prepared) -> tuple[SegmentMeta, int]:
    """Write a prepared segment under a temporary name, fsync it, link it into place (never over
    an existing file: a segment is sealed once, even by two runs at once), fsync the directory,
    then read it back and verify it. Returns its metadata and the file's size in bytes. Mostly
    Arrow's C++ (the GIL released). Raises ArchiveError (cannot write: disk full, permissions,
    the segment exists already) and ArchiveCorrupt (what was read back is not what was
    written); either way no file of this call is left under the segment's name."""
    meta = prepared.meta
    directory = settings.directory
    path = directory / meta.name
    temp = directory / f"{TEMP_PREFIX}{meta.name}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(temp, "wb") as out:
            pq.write_table(
                prepared.table, out, compression="zstd", compression_level=settings.zstd_level,
                row_group_size=settings.row_group_records, use_dictionary=_DICTIONARY, write_page_checksum=True,
                write_statistics=list(STATISTICS),
            )
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            raise ArchiveError(f"{path} exists already: a segment is sealed once (another run sealed it?)") from None
        temp.unlink()
        sync_directory(directory)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise ArchiveError(f"cannot write segment {meta.name} in {directory}: {exc}") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    try:
        verified = verify_file(path, prev_chain=meta.prev_chain_sha256, after_seq=meta.after_seq)
        if verified != meta:
            raise ArchiveCorrupt(f"{meta.name}: read back, its metadata differs from what was written")
    except ArchiveCorrupt:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    return meta, path.stat().st_size


def write_segment(
    settings: ArchiveSettings, stream: str, records: Sequence[LogRecord], previous: SegmentMeta | None
) -> tuple[SegmentMeta, int]:
    """`prepare_segment` then `store_segment`: seal `records` as the segment after `previous`.
    Raises ValueError, ArchiveError, ArchiveCorrupt (see those)."""
    return store_segment(settings, prepare_segment(stream, records, previous))


def remove_leftovers(directory: Path) -> list[str]:
    """Remove the temporary files a crashed run left in `directory`; returns their names.
    Raises ArchiveError when the directory cannot be read or a file removed."""
    try:
        leftovers = [p for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX)] if directory.exists() else []
        for path in leftovers:
            path.unlink()
    except OSError as exc:
        raise ArchiveError(f"cannot clean up {directory}: {exc}") from exc
    return [p.name for p in leftovers]


def sync_directory(directory: Path) -> None:
    """fsync a directory, so a rename into it survives a power cut. Raises OSError."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
