"""Facts about the log's archive: sealed segments of the log written to Parquet files.

Recorded at `<ns>.event.archiver.archive.segment.sealed` by `bus archive run` (or a service
applying the archive policy), once per segment, after the file was written, synced, renamed into
place and read back verified.
"""

from __future__ import annotations

import msgspec

from schemas.envelope import Payload


class ArchiveSegmentSealed(Payload, frozen=True, kw_only=True, tag="archive.segment.sealed"):
    """One sealed segment: the records with `after_seq` < seq <= `last_seq` (`count` of them,
    the first at `first_seq`), in the file `name` of the archive directory. `content_sha256` is
    the SHA-256 of its records (sequences, stored times, subjects, headers, bytes), `chain_sha256`
    that of the previous segment's chain hash and this segment's range and content hash, so a
    segment removed, replaced or reordered breaks every chain hash after it."""

    stream: str
    name: str
    first_seq: int
    last_seq: int
    after_seq: int
    count: int
    content_sha256: str
    prev_chain_sha256: str
    chain_sha256: str
    file_bytes: int
    first_stored_ns: int = 0
    last_stored_ns: int = 0


class ArchiveSegmentCopied(Payload, frozen=True, kw_only=True, tag="archive.segment.copied"):
    """The segment `name` (its chain hash `chain_sha256`, up to `last_seq`) was copied to the
    NATS Object Store bucket `bucket` and read back verified: the object holds the file's exact
    bytes (`file_bytes` of them, SHA-256 `file_sha256`, hex) in `chunks` chunks under `nuid`.
    Recorded at `<ns>.event.archiver.archive.segment.copied`, after the segment's sealed event."""

    stream: str
    name: str
    bucket: str
    last_seq: int
    chain_sha256: str
    file_sha256: str
    file_bytes: int
    chunks: int
    nuid: str


class TrimmedClass(msgspec.Struct, frozen=True, kw_only=True):
    """What one retention class of a trim purges: its records on `filters` below `below_seq`
    (0: none), and why that bound (e.g. "archived to seq 4000", "expired: stored before ...")."""

    name: str
    filters: list[str]
    below_seq: int
    reason: str
    kept_last: int = 0


class LogTrimmed(Payload, frozen=True, kw_only=True, tag="archive.log.trimmed"):
    """The log was trimmed by `by` for `reason` (an operator's words, or "policy"): per retention
    class, its records below a sequence were purged from the stream. Recorded before the purges
    it describes (a crash in between leaves the record and a partial trim the next one completes).
    `archived_seq` is where the verified archive ended (its last segment's chain hash
    `archive_chain_sha256`): no class that waits for the archive is purged above it."""

    stream: str
    by: str
    reason: str
    archived_seq: int
    archive_chain_sha256: str
    classes: list[TrimmedClass]
    below_seq: int = 0  # every record of the log below it may be gone (the lowest bound of all)
