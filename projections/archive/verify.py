"""Reading and checking segments: one file against its metadata, the whole chain.

A segment is good when its file reads whole (every page matching its CRC32), its metadata names
the range in its file name, its records are that many, in increasing order inside the range,
their content hash is the one recorded, and its chain hash follows from the previous segment's.
The content hash proves the records (bytes, subjects, headers, sequences, times); the decoded
columns beside them are derived when the segment is sealed, guarded against bit rot by the page
CRCs, not against a deliberate rewrite (which would have to keep the CRCs consistent). Every problem is an
ArchiveCorrupt whose message is one line naming the segment and what is wrong. Synchronous:
call it off the event loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from projections.archive.segment import (
    FORMAT,
    GENESIS,
    METADATA_KEY,
    SCHEMA,
    STATISTICS,
    SegmentMeta,
    chain_hash,
    content_hash,
    decode_meta,
    parse_name,
)
from projections.errors import ArchiveCorrupt, ArchiveError


@dataclass(frozen=True)
class Segment:
    """A segment file and its metadata (read from the file, not yet verified unless said)."""

    path: Path
    meta: SegmentMeta
    file_bytes: int


def segment_paths(directory: Path) -> list[Path]:
    """The segment files of `directory` in log order (other names are not segments). Raises
    ArchiveError when the directory cannot be listed; a missing one holds no segments."""
    try:
        if not directory.exists():
            return []
        named = [(parse_name(p.name), p) for p in directory.iterdir()]
    except OSError as exc:
        raise ArchiveError(f"cannot list the archive {directory}: {exc}") from exc
    return [path for bounds, path in sorted((b, p) for b, p in named if b is not None)]


def read_meta(path: Path) -> Segment:
    """The metadata of the segment file at `path` (its footer only). Raises ArchiveCorrupt
    when the file is not a whole Parquet file with segment metadata matching its name."""
    try:
        metadata = pq.read_metadata(path)
        size = path.stat().st_size
    except (OSError, pa.ArrowException) as exc:
        raise ArchiveCorrupt(f"{path.name}: not a readable Parquet file ({_short(exc)})") from exc
    raw = (metadata.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ArchiveCorrupt(f"{path.name}: no segment metadata (not written by the archive)")
    try:
        meta = decode_meta(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ArchiveCorrupt(f"{path.name}: unreadable segment metadata ({exc})") from exc
    if meta.format != FORMAT:
        raise ArchiveCorrupt(f"{path.name}: segment format {meta.format}, this code reads {FORMAT}")
    if parse_name(path.name) != (meta.first_seq, meta.last_seq):
        raise ArchiveCorrupt(f"{path.name}: its metadata says seq {meta.first_seq}..{meta.last_seq}")
    if metadata.num_rows != meta.count:
        raise ArchiveCorrupt(f"{path.name}: {metadata.num_rows} rows, its metadata says {meta.count}")
    return Segment(path, meta, size)


def verify_file(path: Path, *, prev_chain: str, after_seq: int) -> SegmentMeta:
    """Verify the segment at `path` wholly (see the module docstring), as the one after a
    segment whose chain hash is `prev_chain` and last sequence `after_seq`. Returns its
    metadata. Raises ArchiveCorrupt."""
    segment = read_meta(path)
    meta = segment.meta
    name = path.name
    if meta.after_seq != after_seq or meta.prev_chain_sha256 != prev_chain:
        raise ArchiveCorrupt(
            f"{name}: the chain is broken: it follows seq {meta.after_seq}, the segment before it ends at seq "
            f"{after_seq}" if meta.after_seq != after_seq else
            f"{name}: the chain is broken: its previous chain hash is not the previous segment's"
        )
    try:
        # Every column, each page against its CRC: bit rot in the decoded columns is found too.
        table = pq.read_table(path, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as exc:
        raise ArchiveCorrupt(f"{name}: cannot be read ({_short(exc)})") from exc
    if not table.schema.remove_metadata().equals(SCHEMA):
        raise ArchiveCorrupt(f"{name}: its columns are not a segment's")
    footer = pq.read_metadata(path)
    # The Arrow schema stored in the footer carries a copy of the segment metadata, which is what
    # an Arrow reader shows as the table's metadata: it must be the footer's own, byte for byte.
    if (table.schema.metadata or {}) != {METADATA_KEY: (footer.metadata or {}).get(METADATA_KEY)}:
        raise ArchiveCorrupt(f"{name}: the copy of its metadata in its Arrow schema is not its metadata")
    _check_statistics(path, footer, table)
    seqs = table.column("seq")
    if table.num_rows != meta.count or not meta.count:
        raise ArchiveCorrupt(f"{name}: {table.num_rows} records, its metadata says {meta.count}")
    first, last = seqs[0].as_py(), seqs[-1].as_py()
    if (first, last) != (meta.first_seq, meta.last_seq) or first <= after_seq:
        raise ArchiveCorrupt(f"{name}: records seq {first}..{last}, its metadata says {meta.first_seq}..{meta.last_seq}")
    if meta.count > 1 and not pc.all(pc.greater(seqs.slice(1), seqs.slice(0, meta.count - 1))).as_py():
        raise ArchiveCorrupt(f"{name}: its records are not in increasing sequence order")
    try:
        content = content_hash(table)
    except ValueError as exc:
        raise ArchiveCorrupt(f"{name}: {exc}") from exc
    if content != meta.content_sha256:
        raise ArchiveCorrupt(f"{name}: the content hash does not match: its records were changed")
    expected = chain_hash(prev_chain, after_seq, meta.first_seq, meta.last_seq, meta.count, content)
    if expected != meta.chain_sha256:
        raise ArchiveCorrupt(f"{name}: the chain hash does not match its range and content")
    return meta


def chain_of(directory: Path, stream: str) -> list[Segment]:
    """Every segment of `directory`, their chain checked from the metadata alone (links, ranges,
    stream): cheap, for finding where the archive ends. Raises ArchiveCorrupt at the first
    break, ArchiveError when the directory cannot be read."""
    segments: list[Segment] = []
    prev_chain, after = GENESIS, 0
    for path in segment_paths(directory):
        segment = read_meta(path)
        _check_link(segment, stream, prev_chain, after)
        segments.append(segment)
        prev_chain, after = segment.meta.chain_sha256, segment.meta.last_seq
    return segments


def verify_all(directory: Path, stream: str) -> Iterator[Segment]:
    """Verify every segment of `directory` wholly, in log order, yielding each once verified.
    Raises ArchiveCorrupt at the first problem, ArchiveError when the directory cannot be read."""
    prev_chain, after = GENESIS, 0
    for path in segment_paths(directory):
        segment = read_meta(path)
        _check_link(segment, stream, prev_chain, after)
        verify_file(path, prev_chain=prev_chain, after_seq=after)
        yield segment
        prev_chain, after = segment.meta.chain_sha256, segment.meta.last_seq


def _check_link(segment: Segment, stream: str, prev_chain: str, after: int) -> None:
    meta, name = segment.meta, segment.path.name
    if meta.stream != stream:
        raise ArchiveCorrupt(f"{name}: a segment of stream {meta.stream}, not {stream}")
    if meta.after_seq != after:
        missing = f"seq {after + 1}..{meta.after_seq}" if meta.after_seq > after else f"it overlaps seq ..{after}"
        raise ArchiveCorrupt(f"{name}: the chain is broken before it: a segment is missing ({missing})")
    if meta.prev_chain_sha256 != prev_chain:
        raise ArchiveCorrupt(f"{name}: the chain is broken: its previous chain hash is not the previous segment's")


def _check_statistics(path: Path, metadata: pq.FileMetaData, table: pa.Table) -> None:
    """Each row group's min/max statistics (what a lookup skips row groups by, from the file's
    `metadata`) are those of its values. Raises ArchiveCorrupt."""
    names = table.schema.names
    at = 0
    for index in range(metadata.num_row_groups):
        group = metadata.row_group(index)
        rows = table.slice(at, group.num_rows)
        at += group.num_rows
        for column in STATISTICS:
            stats = group.column(names.index(column)).statistics
            values = rows.column(column)
            if values.null_count == len(values):
                continue
            if stats is None or not stats.has_min_max:
                raise ArchiveCorrupt(f"{path.name}: row group {index} has no statistics for {column}")
            low, high = pc.min_max(values).values()
            try:
                recorded = (stats.min, stats.max)
            except (OverflowError, ValueError, pa.ArrowException) as exc:  # e.g. a timestamp out of range
                raise ArchiveCorrupt(f"{path.name}: row group {index}'s statistics of {column} cannot be read "
                                     f"({_short(exc)})") from exc
            if recorded != (low.as_py(), high.as_py()):
                raise ArchiveCorrupt(f"{path.name}: row group {index}'s statistics of {column} are not its values'")


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
