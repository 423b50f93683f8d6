"""`archive run`: seal the log, from after the last segment, into segments.

    1. Clean up what a crashed run left (temporary files), check the chain from the segments'
       metadata and verify the last segment wholly: the run goes on only after a good segment.
    2. Record the `archive.segment.sealed` event of any segment a crash left unannounced.
    3. Read the log from after the last segment to its end as of now (`bus.log_reader`, as the
       projections read it), cut it into segments of `segment_records` (the rest too with
       `seal_partial`), decode each in a thread while the one before is written and verified in
       another, record its event.
    4. With `settings.object_store`, copy each segment without a verified copy to the NATS
       Object Store bucket (projections.archive.copies).

Each segment's event is recorded once: its id is derived from the segment's chain hash (a
re-sent event within the log's duplicate window is stored once), and after its ack the event's
sequence is appended to `sealed-events` in the archive directory (synced), which later runs read.

`keep_archiving` applies an ArchivePolicy: a run every `interval_s`, full segments only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bus.errors import BusUnavailable
from bus.log_reader import LogReader, LogRecord
from projections.archive.config import ArchivePolicy, ArchiveSettings
from projections.archive.copies import copy_segments
from projections.archive.segment import GENESIS, SegmentMeta
from projections.archive.fenced import FencedVerifier
from projections.archive.verify import Segment, chain_of
from projections.archive.writer import prepare_segment, remove_leftovers, store_segment, sync_directory
from projections.errors import ArchiveCorrupt, ArchiveError
from schemas.ids import stable_id
from schemas.payloads.archive import ArchiveSegmentSealed

if TYPE_CHECKING:
    from bus import Bus
    from projections.archive.trim import TrimResult

log = logging.getLogger("continuum.projections.archive")

ARCHIVER = "archiver"  # the name the sealed events are recorded under
EVENTS_FILE = "sealed-events"


@dataclass
class ArchiveRun:
    """What one run did: the segments it sealed (with their files' sizes), the events it
    recorded for segments sealed before, and where the archive ends now."""

    sealed: list[tuple[SegmentMeta, int]] = field(default_factory=list)
    announced: list[str] = field(default_factory=list)
    last_seq: int = 0
    records: int = 0
    seconds: float = 0.0
    trim: TrimResult | None = None  # the policy's trim after this run, if it trims
    copied: list[str] = field(default_factory=list)  # segments copied to the object store now


async def run_archive(
    bus: Bus, settings: ArchiveSettings, *, on_sealed: Callable[[SegmentMeta], None] | None = None
) -> ArchiveRun:
    """Archive `bus`'s log (see the module docstring). Raises ArchiveCorrupt (the archive fails
    verification: nothing is written after a bad segment), ArchiveError (cannot write),
    BusUnavailable (the log cannot be read or the event recorded: run again)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    stream = bus.subjects.stream
    segments = await asyncio.to_thread(_prepare, settings.directory, stream)
    run = ArchiveRun(last_seq=segments[-1].meta.last_seq if segments else 0)
    recorded = await asyncio.to_thread(_recorded, settings.directory)
    for segment in segments:
        if segment.meta.name not in recorded:
            await _announce(bus, settings.directory, segment.meta, segment.file_bytes)
            run.announced.append(segment.meta.name)
    previous = segments[-1].meta if segments else None
    head = await bus.last_seq()
    after = previous.last_seq if previous is not None else 0
    wanted = head - after >= (1 if settings.seal_partial else settings.segment_records)
    if wanted:
        async with LogReader(bus, start_seq=after + 1, name="archive") as reader:
            previous = await _seal_until(bus, settings, reader, head, previous, run, on_sealed)
    run.last_seq = previous.last_seq if previous is not None else 0
    if settings.object_store:  # the second target (projections.archive.copies), once sealed here
        run.copied = await copy_segments(bus, settings, fresh={meta.name for meta, _ in run.sealed})
    run.seconds = loop.time() - started
    return run


class Sealer:
    """Seals segments one after another in two stages, each in a thread: a segment is decoded
    and hashed (Python: `prepare_segment`) while the one before is written, synced and verified
    (Arrow's C++, the GIL released: `store_segment`). `sealed` is called with each segment once
    it is verified, in log order (it records the sealed event). Use it as an async context
    manager: leaving waits for the segment being written, whatever happens (its file is then
    whole or absent), and a failure of that write gives way to the one being raised."""

    def __init__(
        self, settings: ArchiveSettings, stream: str, previous: SegmentMeta | None,
        sealed: Callable[[SegmentMeta, int], Awaitable[None]],
    ) -> None:
        self._settings = settings
        self._stream = stream
        self._prepared_last = previous  # the chain goes on from the last segment prepared
        self._sealed = sealed
        self._storing: asyncio.Task[tuple[SegmentMeta, int]] | None = None

    async def __aenter__(self) -> Sealer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._storing is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._storing)

    async def seal(self, records: Sequence[LogRecord]) -> None:
        """Prepare `records` as the next segment, then start writing it once the one before is
        sealed. Raises ValueError, ArchiveError, ArchiveCorrupt (of the segment before)."""
        prepared = await asyncio.to_thread(prepare_segment, self._stream, records, self._prepared_last)
        self._prepared_last = prepared.meta
        await self.finish()  # one segment written at a time, in log order
        self._storing = asyncio.create_task(asyncio.to_thread(store_segment, self._settings, prepared))

    async def finish(self) -> None:
        """Wait for the segment being written and hand it to `sealed`. Raises ArchiveError,
        ArchiveCorrupt."""
        if self._storing is None:
            return
        # Shielded: a cancellation here leaves the write to `__aexit__`, which waits for it.
        meta, file_bytes = await asyncio.shield(self._storing)
        self._storing = None
        await self._sealed(meta, file_bytes)


async def _seal_until(
    bus: Bus, settings: ArchiveSettings, reader: LogReader, head: int, previous: SegmentMeta | None,
    run: ArchiveRun, on_sealed: Callable[[SegmentMeta], None] | None,
) -> SegmentMeta | None:
    """Read up to `head`, sealing a segment each `segment_records` (a Sealer: the next read
    and decoded while the one before is written). Returns the last segment sealed (or
    `previous`)."""
    size = settings.segment_records
    pending: list[LogRecord] = []
    last = previous

    async def sealed(meta: SegmentMeta, file_bytes: int) -> None:
        nonlocal last
        last = meta
        run.sealed.append((meta, file_bytes))
        run.records += meta.count
        await _announce(bus, settings.directory, meta, file_bytes)
        if on_sealed is not None:
            on_sealed(meta)

    async with Sealer(settings, bus.subjects.stream, previous, sealed) as sealer:
        read_upto = 0  # (the reader's own `last_seq` counts records queued, not yet read)
        while read_upto < head:
            records = await reader.read(size)
            pending.extend(records)
            read_upto = records[-1].seq
            while len(pending) >= size:
                await sealer.seal(pending[:size])
                del pending[:size]
        # What is left is short of a full segment: sealed only when asked.
        if pending and settings.seal_partial:
            await sealer.seal(pending)
        await sealer.finish()
    return last


def _prepare(directory: Path, stream: str) -> list[Segment]:
    """Remove a crashed run's leftovers, check the chain, verify the last segment wholly.
    Raises ArchiveCorrupt, ArchiveError."""
    removed = remove_leftovers(directory)
    if removed:
        log.warning("removed what a crashed archive run left: %s", ", ".join(removed))
    segments = chain_of(directory, stream)
    if segments:
        last = segments[-1]
        prev_chain = segments[-2].meta.chain_sha256 if len(segments) > 1 else GENESIS
        # In a child process: a damaged footer can abort pyarrow's full read (projections.archive.fenced).
        with FencedVerifier() as verifier:
            verifier.verify(last.path, stream=stream, prev_chain=prev_chain, after_seq=last.meta.after_seq)
    return segments


def _recorded(directory: Path) -> set[str]:
    """The segments whose sealed event is known to be on the log."""
    path = directory / EVENTS_FILE
    try:
        lines = path.read_text().splitlines() if path.exists() else []
    except OSError as exc:
        raise ArchiveError(f"cannot read {path}: {exc}") from exc
    return {line.split()[0] for line in lines if line.strip()}


async def _announce(bus: Bus, directory: Path, meta: SegmentMeta, file_bytes: int) -> None:
    """Record `meta`'s sealed event, then note it in `sealed-events`. Raises BusUnavailable,
    ArchiveError."""
    payload = ArchiveSegmentSealed(
        stream=meta.stream, name=meta.name, first_seq=meta.first_seq, last_seq=meta.last_seq,
        after_seq=meta.after_seq, count=meta.count, content_sha256=meta.content_sha256,
        prev_chain_sha256=meta.prev_chain_sha256, chain_sha256=meta.chain_sha256, file_bytes=file_bytes,
        first_stored_ns=meta.first_stored_ns, last_stored_ns=meta.last_stored_ns,
    )
    sent = await bus.record(ARCHIVER, payload, id=stable_id("archive.segment.sealed", meta.stream, meta.chain_sha256))
    await asyncio.to_thread(_note, directory, meta.name, sent.ack.seq)


def _note(directory: Path, name: str, seq: int) -> None:
    path = directory / EVENTS_FILE
    try:
        with open(path, "a") as out:
            out.write(f"{name} {seq}\n")
            out.flush()
            os.fsync(out.fileno())
        sync_directory(directory)
    except OSError as exc:
        raise ArchiveError(f"cannot write {path}: {exc}") from exc


async def keep_archiving(
    bus: Bus, policy: ArchivePolicy, *, on_run: Callable[[ArchiveRun], None] | None = None,
    on_failure: Callable[[Exception], None] | None = None,
) -> None:
    """Apply `policy` until cancelled: every `interval_s`, seal the full segments the log has
    grown by (never a partial one), then, when the policy trims, trim the log (`trim.run_trim`).
    A run or trim that fails for want of the server or the disk, or is refused (BusUnavailable,
    ArchiveError, TrimRefused) is logged (and given to `on_failure`) and tried again at the next
    interval; a damaged archive (ArchiveCorrupt) ends it, raised: nothing is archived or trimmed
    after a bad segment until an operator looks."""
    from projections.archive.trim import run_trim  # trim builds on this module

    settings = dataclasses.replace(policy.settings, seal_partial=False)
    while True:
        try:
            run = await run_archive(bus, settings)
            if policy.trim is not None:
                run.trim = await run_trim(bus, settings, policy.trim)
        except ArchiveCorrupt:
            raise
        except (BusUnavailable, ArchiveError) as exc:
            log.warning("archive run failed (%s); trying again in %gs", exc, policy.interval_s)
            if on_failure is not None:
                on_failure(exc)
        else:
            if on_run is not None:
                on_run(run)
        await asyncio.sleep(policy.interval_s)
