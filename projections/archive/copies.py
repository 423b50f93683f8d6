"""The archive's second target: each segment's file copied to a NATS Object Store bucket.

    copied = await copy_segments(bus, settings, fresh=names)     # after `archive run` sealed
    states = await copy_states(bus, settings, segments, whole=False)   # `archive list|verify`
    prefix = await copied_prefix(bus, settings, segments, first_seq)   # how far a trim may go
    restored = await restore_archive(bus, settings, bus.subjects.stream)  # the disk was lost

The bucket is `CONTINUUM_ARCHIVE_<NS>` (bus.object_store: ADR-20's layout, replicated and placed
like the log), one object per segment, named as its file, holding the file's exact bytes: its
digest is the file's SHA-256. A segment is copied once it verified locally (when sealed by this
run, or wholly here for one sealed before), read back from the bucket and checked (every chunk,
the digest and the size), then recorded: an `archive.segment.copied` event (its id derived from
the bucket, the segment's chain hash and the object's nuid, so a re-sent one is stored once within
the duplicate window), whose sequence, with the file's SHA-256 and size, is then appended to `copied-events`
in the archive directory (synced). Only then does the segment count as archived in the bucket.

A run after a crash finds each segment in one of three states and finishes it: no object (or
one that is not this file's bytes: copied again), an object that is the file's but whose event is
not noted (read back, then recorded), or noted with its metadata still naming the file's bytes
(nothing to do; one direct get). So nothing is copied twice and nothing is left uncopied; a copy
removed or replaced in the bucket since is copied again. Chunks a put killed before its metadata
left (no object names them) are purged by a later run once untouched for SWEEP_AFTER_S.

Everything here raises ArchiveError (the bucket cannot be written, or a copy does not read back),
ArchiveCorrupt (a local segment fails verification), BusUnavailable.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from bus.errors import BusUnavailable, ConfigurationError, ObjectCorrupt, PermissionDenied
from bus.object_store import ObjectInfo, ObjectStore
from projections.archive.config import ArchiveSettings
from projections.archive.segment import GENESIS, parse_name
from projections.archive.verify import Segment, chain_of, verify_all, verify_file
from projections.archive.writer import TEMP_PREFIX, sync_directory
from projections.errors import ArchiveCorrupt, ArchiveError
from schemas.ids import stable_id
from schemas.payloads.archive import ArchiveSegmentCopied

if TYPE_CHECKING:
    from bus import Bus

log = logging.getLogger("continuum.projections.archive")

COPIES_FILE = "copied-events"
# Chunks no object names and untouched this long are a killed copy's (a copy in progress writes a
# chunk every few ms); a run purges them.
SWEEP_AFTER_S = 600.0
ARCHIVER = "archiver"  # as projections.archive.archiver records its events


@dataclass(frozen=True)
class CopyNote:
    """A line of `copied-events`: the copy's event sequence (0: recorded before a restore) and
    the file it copied (SHA-256 hex, size)."""

    name: str
    seq: int
    sha256: str
    file_bytes: int


@dataclass(frozen=True)
class CopyState:
    """One segment's copy: `state` is `copied` (verified and recorded), `pending` (the object is
    the file's, its event not recorded yet), `missing`, `differs` (the object is not this file's
    bytes) or `damaged` (the object does not read back as its metadata says)."""

    name: str
    state: Literal["copied", "pending", "missing", "differs", "damaged"]
    detail: str = ""

    @property
    def good(self) -> bool:
        return self.state == "copied"


async def open_bucket(bus: Bus) -> ObjectStore:
    """The archive's bucket, made when missing (replicated like the log). Raises ArchiveError
    (the bucket cannot be made: refused, or replicas the servers cannot hold), BusUnavailable."""
    try:
        return await ObjectStore.open(bus.transport, bus.subjects.archive_bucket, like=bus.subjects.stream)
    except (PermissionDenied, ConfigurationError) as exc:
        raise ArchiveError(f"the archive's object store {bus.subjects.archive_bucket} cannot be opened: {exc}") from exc


async def copy_segments(bus: Bus, settings: ArchiveSettings, *, fresh: Collection[str] = ()) -> list[str]:
    """Copy every segment of the archive without a recorded, verified copy to the bucket, in log
    order (the module docstring); `fresh` names segments verified by this run already. Returns
    the names copied or recorded now. Raises ArchiveError, ArchiveCorrupt, BusUnavailable."""
    store = await open_bucket(bus)
    segments = await asyncio.to_thread(chain_of, settings.directory, bus.subjects.stream)
    notes = await asyncio.to_thread(read_notes, settings.directory)
    done: list[str] = []
    prev_chain, after = GENESIS, 0
    for segment in segments:
        name = segment.meta.name
        note = notes.get(name)
        if note is None or not await _still_there(store, note):
            if name not in fresh:  # verified when sealed by an earlier run: wholly again before it is copied
                await asyncio.to_thread(verify_file, segment.path, prev_chain=prev_chain, after_seq=after)
            await _copy_one(bus, store, settings.directory, segment)
            done.append(name)
        prev_chain, after = segment.meta.chain_sha256, segment.meta.last_seq
    await _sweep(store)
    return done


async def _sweep(store: ObjectStore) -> None:
    """Purge what puts killed before their metadata left (chunks no object names, untouched for
    SWEEP_AFTER_S). Never fails the run: a sweep that cannot be done now is done by a later one."""
    try:
        purged = await store.sweep(older_than_s=SWEEP_AFTER_S)
    except (BusUnavailable, ObjectCorrupt, PermissionDenied) as exc:
        log.warning("%s: chunks left by killed copies were not swept this time (%s)", store.bucket, exc)
        return
    if purged:
        log.warning("%s: purged the chunks of %d copies killed before their metadata", store.bucket, len(purged))


async def _still_there(store: ObjectStore, note: CopyNote) -> bool:
    """A recorded copy's metadata still names the noted bytes (one direct get; its chunks are
    read back by `archive verify` and by a trim). A copy removed or replaced is copied again."""
    try:
        info = await store.info(note.name)
    except ObjectCorrupt:
        return False
    if info is None or info.sha256 is None:
        return False
    return info.size == note.file_bytes and info.sha256.hex() == note.sha256


async def _copy_one(bus: Bus, store: ObjectStore, directory: Path, segment: Segment) -> None:
    name = segment.meta.name
    data = await asyncio.to_thread(_read, segment.path)
    sha = await asyncio.to_thread(lambda: hashlib.sha256(data).digest())
    try:
        info = await store.info(name, trusted=False)
        if info is None or info.sha256 != sha or info.size != len(data) or not await _reads_back(store, info):
            info = await store.put(name, data, metadata={
                "continuum.stream": segment.meta.stream, "continuum.chain_sha256": segment.meta.chain_sha256,
            })
            if not await _reads_back(store, info):
                raise ArchiveError(f"{name}: its copy in {store.bucket} does not read back as written")
    except ObjectCorrupt as exc:
        raise ArchiveError(f"{name}: cannot copy it to {store.bucket}: {exc}") from exc
    payload = ArchiveSegmentCopied(
        stream=segment.meta.stream, name=name, bucket=store.bucket, last_seq=segment.meta.last_seq,
        chain_sha256=segment.meta.chain_sha256, file_sha256=sha.hex(), file_bytes=len(data),
        chunks=info.chunks, nuid=info.nuid,
    )
    # The id names the object's version (nuid): a copy recorded again after a crash is stored once,
    # a copy made again (removed or replaced in the bucket) is a new fact.
    sent = await bus.record(ARCHIVER, payload, id=stable_id("archive.segment.copied", store.bucket,
                                                             segment.meta.chain_sha256, info.nuid))
    await asyncio.to_thread(_note, directory, CopyNote(name, sent.ack.seq, sha.hex(), len(data)))


async def _reads_back(store: ObjectStore, info: ObjectInfo) -> bool:
    """Every chunk of the object read, its digest and size as its metadata says."""
    try:
        async for _ in store.chunks(info):
            pass
    except ObjectCorrupt as exc:
        log.warning("%s", exc)
        return False
    return True


async def copy_states(bus: Bus, settings: ArchiveSettings, segments: list[Segment], *, whole: bool) -> list[CopyState]:
    """Each segment's copy state (see CopyState). Without `whole`, from the bucket's metadata and
    `copied-events` (a segment not noted there is hashed to tell `pending` from `differs`); with
    `whole`, every copy is read back and compared with its file's bytes. Raises ArchiveError,
    BusUnavailable."""
    store = await open_bucket(bus)
    notes = await asyncio.to_thread(read_notes, settings.directory)
    states: list[CopyState] = []
    for segment in segments:
        states.append(await _state(store, segment, notes.get(segment.meta.name), whole=whole))
    return states


async def _state(store: ObjectStore, segment: Segment, note: CopyNote | None, *, whole: bool) -> CopyState:
    name = segment.meta.name
    try:
        info = await store.info(name)
    except ObjectCorrupt as exc:
        return CopyState(name, "damaged", str(exc))
    if info is None:
        return CopyState(name, "missing", f"{store.bucket} holds no copy")
    if whole or note is None:
        sha = (await asyncio.to_thread(lambda: hashlib.sha256(_read(segment.path)).digest())).hex()
        size = segment.file_bytes
    else:
        sha, size = note.sha256, note.file_bytes
    if info.size != size or info.sha256 is None or info.sha256.hex() != sha:
        return CopyState(name, "differs", f"the copy in {store.bucket} is not the file's bytes "
                                          f"({info.size:,} bytes, {info.digest or 'no digest'})")
    if whole:
        try:
            async for _ in store.chunks(info):
                pass
        except ObjectCorrupt as exc:
            return CopyState(name, "damaged", str(exc))
    if note is None:
        return CopyState(name, "pending", "copied, not recorded yet (the next `archive run` records it)")
    return CopyState(name, "copied")


async def copied_prefix(bus: Bus, settings: ArchiveSettings, segments: list[Segment], first_seq: int) -> list[Segment]:
    """The leading segments whose copy is recorded and verified (a trim goes no further): each
    noted in `copied-events` with its metadata in the bucket naming the noted SHA-256 and size,
    and read back wholly when the segment still holds records at or after `first_seq` (as the
    trim verifies those segments' files wholly). Raises ArchiveError, BusUnavailable."""
    store = await open_bucket(bus)
    notes = await asyncio.to_thread(read_notes, settings.directory)
    prefix: list[Segment] = []
    for segment in segments:
        note = notes.get(segment.meta.name)
        if note is None:
            break
        state = await _state(store, segment, note, whole=segment.meta.last_seq >= first_seq)
        if not state.good:
            log.warning("%s: its copy is not verified (%s: %s); the log is trimmed below it at most",
                        segment.meta.name, state.state, state.detail)
            break
        prefix.append(segment)
    return prefix


@dataclass
class Restored:
    """What a restore did: the segments written from the bucket, those already present."""

    written: list[str]
    present: list[str]
    segments: list[Segment]


async def restore_archive(bus: Bus, settings: ArchiveSettings, stream: str) -> Restored:
    """Rebuild the archive directory from the bucket (the machine's disk was lost): each segment
    object not in the directory is read (every chunk, digest and size checked), written under a
    temporary name, synced and linked into place; one present already must be the object's
    bytes. Then the whole chain is verified, and `sealed-events` and `copied-events` note every
    segment (sequence 0: recorded before the restore), so a later run announces and copies
    nothing again. Raises ArchiveCorrupt (a restored chain that does not verify, an object that
    is not what its metadata says), ArchiveError, BusUnavailable."""
    from projections.archive.archiver import EVENTS_FILE  # the archiver imports this module

    store = await open_bucket(bus)
    try:
        objects = sorted((i for i in await store.list() if parse_name(i.name) is not None), key=lambda i: i.name)
    except ObjectCorrupt as exc:
        raise ArchiveCorrupt(f"the bucket {store.bucket} holds damaged metadata: {exc}") from exc
    directory = settings.directory
    written: list[str] = []
    present: list[str] = []
    for info in objects:
        path = directory / info.name
        if await asyncio.to_thread(path.exists):
            sha = await asyncio.to_thread(lambda: hashlib.sha256(_read(path)).digest())
            if sha != info.sha256:
                raise ArchiveError(f"{info.name}: the file in {directory} is not the copy in {store.bucket}; "
                                   "nothing is overwritten (move it away and restore again)")
            present.append(info.name)
            continue
        try:
            _, data = await store.read(info.name)
        except ObjectCorrupt as exc:
            raise ArchiveCorrupt(f"{info.name}: {exc}") from exc
        await asyncio.to_thread(_place, directory, info.name, data)
        written.append(info.name)
    segments = await asyncio.to_thread(lambda: list(verify_all(directory, stream)))
    notes = await asyncio.to_thread(read_notes, directory)
    sealed = await asyncio.to_thread(_noted_names, directory / EVENTS_FILE)
    for segment in segments:
        name = segment.meta.name
        if name not in sealed:
            await asyncio.to_thread(_append_line, directory / EVENTS_FILE, f"{name} 0")
        if name not in notes:
            sha = await asyncio.to_thread(lambda: hashlib.sha256(_read(segment.path)).hexdigest())
            await asyncio.to_thread(_note, directory, CopyNote(name, 0, sha, segment.file_bytes))
    return Restored(written=written, present=present, segments=segments)


def _place(directory: Path, name: str, data: bytes) -> None:
    temp = directory / f"{TEMP_PREFIX}{name}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(temp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.link(temp, directory / name)
        temp.unlink()
        sync_directory(directory)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise ArchiveError(f"cannot write {name} in {directory}: {exc}") from exc


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ArchiveError(f"cannot read {path}: {exc}") from exc


def read_notes(directory: Path) -> dict[str, CopyNote]:
    """The copies noted in `copied-events` (a line that cannot be parsed is ignored: its segment
    is copied or recorded again, by the same id). Raises ArchiveError."""
    path = directory / COPIES_FILE
    try:
        lines = path.read_text().splitlines() if path.exists() else []
    except OSError as exc:
        raise ArchiveError(f"cannot read {path}: {exc}") from exc
    notes: dict[str, CopyNote] = {}
    for line in lines:
        parts = line.split()
        if len(parts) == 4 and parts[1].isdigit() and parts[3].isdigit() and len(parts[2]) == 64:
            notes[parts[0]] = CopyNote(parts[0], int(parts[1]), parts[2], int(parts[3]))
    return notes


def _noted_names(path: Path) -> set[str]:
    try:
        return {line.split()[0] for line in path.read_text().splitlines() if line.strip()} if path.exists() else set()
    except OSError as exc:
        raise ArchiveError(f"cannot read {path}: {exc}") from exc


def _note(directory: Path, note: CopyNote) -> None:
    _append_line(directory / COPIES_FILE, f"{note.name} {note.seq} {note.sha256} {note.file_bytes}")


def _append_line(path: Path, line: str) -> None:
    try:
        with open(path, "ab") as out:
            # A line a crash cut short stays alone on its line (and is ignored when read).
            torn = out.tell() > 0 and _last_byte(path) != b"\n"
            out.write((("\n" if torn else "") + line + "\n").encode())
            out.flush()
            os.fsync(out.fileno())
        sync_directory(path.parent)
    except OSError as exc:
        raise ArchiveError(f"cannot write {path}: {exc}") from exc


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as existing:
        existing.seek(-1, os.SEEK_END)
        return existing.read(1)
