"""`archive trim`: purge the log below what the verified archive holds, class by class.

    1. Verify the archive: the chain from every segment's metadata, and wholly (records, content
       and chain hashes) every segment still (partly) in the log; check the log's record at the
       last segment's end is the one archived (an archive of another log is refused). With the
       object store on, the archive counts only up to the last segment whose copy there is
       recorded and verified (projections.archive.copies.copied_prefix).
    2. Bound each retention class (projections.archive.retention): below the archive's end, or its
       expiry time; never younger than the policy's minimum age; never at or above a delivery
       still waiting (steps, model calls, messages) or a memory agent's latest snapshot; for
       fenced subjects, never the last record of a subject.
    3. Ask the projection service, if one answers, to have applied everything to be purged.
    4. Record an `archive.log.trimmed` event (who, why, each class's bound), then purge: each
       class on its filters (a fenced class subject by subject, below its last record), then the
       whole log below the lowest bound of all (subjects of no class).

Each purge is one server operation on a prefix of a subject filter, and every bound follows
from the verified archive and the log's state alone, so a trim killed at any point has purged
only what was archived and verified; the next trim plans again and completes it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.compute as pc
import pyarrow.parquet as pq

from bus.errors import BusUnavailable, NoResponders, QueryError
from bus.log_trim import ConsumerFloors, consumer_floors, first_seq_since, last_seq_by_subject, purge_below, subject_counts
from projections.archive.archiver import ARCHIVER
from projections.archive.config import ArchiveSettings
from projections.archive.copies import copied_prefix
from projections.archive.retention import RetentionClass, TrimSettings
from projections.archive.segment import GENESIS
from projections.archive.fenced import FencedVerifier
from projections.archive.verify import Segment, chain_of
from projections.errors import ArchiveCorrupt, TrimRefused
from schemas import DecodeError
from schemas.payloads import LogTrimmed, MemorySnapshotted, TrimmedClass

if TYPE_CHECKING:
    from bus import Bus

log = logging.getLogger("continuum.projections.archive")

SNAPSHOT_KIND = "agent.memory.snapshot"


@dataclass(frozen=True)
class VerifiedArchive:
    """Where the verified archive ends: its last segment's last sequence and chain hash."""

    last_seq: int
    chain_sha256: str
    segments: int


@dataclass
class ClassBound:
    """One class's share of a trim: its records on `filters` below `below_seq` go, except, for
    a fenced class, each subject's last record (`per_subject`: subject -> its own bound)."""

    rule: RetentionClass
    filters: list[str]
    below_seq: int
    reason: str
    per_subject: dict[str, int] | None = None


@dataclass
class TrimPlan:
    """What a trim will purge (see the module docstring)."""

    first_seq: int
    last_seq: int
    archive: VerifiedArchive
    classes: list[ClassBound]
    rest_below: int
    views: str

    @property
    def highest(self) -> int:
        """The highest sequence any purge of the plan may remove (0: none)."""
        bounds = [self.rest_below] + [c.below_seq for c in self.classes]
        bounds += [b for c in self.classes for b in (c.per_subject or {}).values()]
        return max(bounds) - 1 if bounds else 0


@dataclass
class TrimResult:
    plan: TrimPlan
    event_seq: int = 0
    purged: int = 0
    by_class: dict[str, int] = field(default_factory=dict)


async def run_trim(bus: Bus, archive: ArchiveSettings, settings: TrimSettings, *, dry_run: bool = False) -> TrimResult:
    """Plan and apply a trim (the module docstring). Raises ArchiveCorrupt (nothing purged: the
    archive fails verification), TrimRefused (nothing purged), ArchiveError, BusUnavailable,
    PermissionDenied (a credential that may not purge: an operator's is needed)."""
    plan = await plan_trim(bus, archive, settings)
    if dry_run:
        return TrimResult(plan)
    return await apply_trim(bus, plan, settings)


async def plan_trim(bus: Bus, archive: ArchiveSettings, settings: TrimSettings) -> TrimPlan:
    """Each class's bound (steps 1-3 of the module docstring); nothing is purged. Raises
    ArchiveCorrupt, TrimRefused, ArchiveError, BusUnavailable."""
    policy = settings.policy
    ns = bus.subjects.ns
    first, last = await bus.log_bounds()
    verified = await asyncio.to_thread(verify_archive, archive.directory, bus.subjects.stream, first)
    if verified.last_seq > last:
        raise TrimRefused(f"the archive ends at seq {verified.last_seq}, after the log's last record (seq {last}): "
                          "it is not this log's (the stream was recreated?); nothing was purged")
    await _same_log(bus, archive.directory, verified)
    if archive.object_store:
        verified = await _copied(bus, archive, verified, first)
    now = datetime.now(UTC)
    young = await first_seq_since(bus, now - timedelta(seconds=policy.min_age_s))
    floors = await consumer_floors(bus) if any(c.until_settled or c.until_delivered for c in policy.classes) else None
    snapshots = await snapshot_floor(bus) if any(c.until_snapshot for c in policy.classes) else None
    classes: list[ClassBound] = []
    for rule in policy.classes:
        classes.append(await _bound(bus, rule, verified, now, young, floors, snapshots))
    kept = [b for c in classes for b in (c.per_subject or {}).values()]
    # Subjects of no class: below every class's bound and every last record kept.
    rest = min([verified.last_seq + 1, young, *(c.below_seq for c in classes), *kept])
    plan = TrimPlan(first_seq=first, last_seq=last, archive=verified, classes=classes, rest_below=rest, views="")
    for c in classes:
        c.filters = [f"{ns}.{f}" for f in c.rule.filters]
    plan.views = await _views_caught_up(bus, plan.highest, settings.views_wait_s)
    return plan


async def apply_trim(bus: Bus, plan: TrimPlan, settings: TrimSettings) -> TrimResult:
    """Record the trim's event, then purge (step 4 of the module docstring). Raises
    BusUnavailable, PermissionDenied."""
    result = TrimResult(plan)
    if plan.highest < plan.first_seq:
        return result  # every bound is at or below the log's first record: nothing to purge, nothing to record
    event = LogTrimmed(
        stream=bus.subjects.stream, by=settings.by, reason=settings.reason,
        archived_seq=plan.archive.last_seq, archive_chain_sha256=plan.archive.chain_sha256,
        classes=[
            TrimmedClass(name=c.rule.name, filters=c.filters, below_seq=c.below_seq, reason=c.reason,
                         kept_last=len(c.per_subject or {}))
            for c in plan.classes
        ],
        below_seq=plan.rest_below,
    )
    result.event_seq = (await bus.record(ARCHIVER, event)).ack.seq
    for c in plan.classes:
        purged = 0
        if c.per_subject is not None:
            for subject, below in sorted(c.per_subject.items()):
                purged += await purge_below(bus, subject, below)
        else:
            for subject_filter in c.filters:
                purged += await purge_below(bus, subject_filter, c.below_seq)
        result.by_class[c.rule.name] = purged
        result.purged += purged
    rest = await purge_below(bus, bus.subjects.all, plan.rest_below)
    result.by_class[settings.policy.everything_else] = rest
    result.purged += rest
    return result


def verify_archive(directory: Path, stream: str, first_seq: int) -> VerifiedArchive:
    """Check the chain of every segment from its metadata, and wholly every segment holding
    records at or after `first_seq` (the log's first). Raises ArchiveCorrupt, ArchiveError."""
    segments = chain_of(directory, stream)
    prev_chain, after = GENESIS, 0
    # In a child process: a damaged footer can abort pyarrow's full read (projections.archive.fenced).
    with FencedVerifier() as verifier:
        for segment in segments:
            if segment.meta.last_seq >= first_seq:
                verifier.verify(segment.path, stream=stream, prev_chain=prev_chain, after_seq=after)
            prev_chain, after = segment.meta.chain_sha256, segment.meta.last_seq
    return VerifiedArchive(last_seq=after, chain_sha256=prev_chain, segments=len(segments))


async def _same_log(bus: Bus, directory: Path, verified: VerifiedArchive) -> None:
    """The log's record at the archive's last sequence is the one archived (when the log still
    holds it). Raises TrimRefused."""
    if not verified.last_seq:
        return
    stored = await bus.transport.direct_get(bus.subjects.stream, {"seq": verified.last_seq})
    if stored is None:
        return  # purged already (an expired class, or an earlier trim)
    segments = await asyncio.to_thread(chain_of, directory, bus.subjects.stream)
    archived = await asyncio.to_thread(_archived_record, segments[-1], verified.last_seq)
    if archived != (stored.subject, stored.data):
        raise TrimRefused(
            f"the log's record at seq {verified.last_seq} is not the one archived in {segments[-1].path.name}: "
            "the archive is not this log's (nothing was purged)"
        )


async def _copied(bus: Bus, archive: ArchiveSettings, verified: VerifiedArchive, first_seq: int) -> VerifiedArchive:
    """The verified archive cut to its segments whose copy in the object store is recorded and
    verified (projections.archive.copies): nothing is trimmed below an uncopied segment."""
    segments = await asyncio.to_thread(chain_of, archive.directory, bus.subjects.stream)
    prefix = await copied_prefix(bus, archive, segments, first_seq)
    if len(prefix) == len(segments):
        return verified
    if not prefix:
        return VerifiedArchive(last_seq=0, chain_sha256=GENESIS, segments=0)
    return VerifiedArchive(last_seq=prefix[-1].meta.last_seq, chain_sha256=prefix[-1].meta.chain_sha256,
                           segments=len(prefix))


def _archived_record(segment: Segment, seq: int) -> tuple[str, bytes] | None:
    table = pq.read_table(segment.path, columns=["seq", "subject", "data"])
    row = table.filter(pc.equal(table.column("seq"), seq))
    if row.num_rows != 1:
        return None
    return row.column("subject")[0].as_py(), row.column("data")[0].as_py()


async def _bound(
    bus: Bus, rule: RetentionClass, archive: VerifiedArchive, now: datetime, young: int,
    floors: ConsumerFloors | None, snapshots: int | None,
) -> ClassBound:
    if rule.expire_after_s is not None:
        cutoff = now - timedelta(seconds=rule.expire_after_s)
        expired = await first_seq_since(bus, cutoff)
        # Archived or expired, whichever goes further: an expiring class is never kept longer
        # than the rest of the log.
        if expired > archive.last_seq + 1:
            below, reasons = expired, [f"expired: stored before {cutoff:%Y-%m-%d %H:%M:%S}Z"]
        else:
            below, reasons = archive.last_seq + 1, [f"archived and verified to seq {archive.last_seq}"]
    else:
        below = archive.last_seq + 1
        reasons = [f"archived and verified to seq {archive.last_seq}"]
    limits = [(young, "younger than the minimum age")]
    if rule.until_settled and floors is not None:
        limits.append((floors.settled, "a delivery still waits for its acknowledgement"))
    if rule.until_delivered and floors is not None:
        limits.append((floors.delivered, "a consumer has still to deliver or settle it"))
    if rule.until_snapshot and snapshots is not None:
        limits.append((snapshots, "a memory agent's latest snapshot"))
    for limit, why in limits:
        if limit < below:
            below = limit
            reasons.append(f"held at seq {limit}: {why}")
    bound = ClassBound(rule=rule, filters=list(rule.filters), below_seq=below, reason="; ".join(reasons))
    if rule.keep_last_per_subject:
        bound.per_subject = {}
        for subject_filter in rule.filters:
            for subject, last in (await last_seq_by_subject(bus, f"{bus.subjects.ns}.{subject_filter}")).items():
                bound.per_subject[subject] = min(below, last)
    return bound


async def snapshot_floor(bus: Bus) -> int:
    """The lowest position + 1 of every memory agent's latest whole snapshot: an agent with
    memory events of its own (or a snapshot) restarts from its latest snapshot plus what follows,
    so nothing of memory at or after it may go. 1 (nothing) when such an agent has no whole
    snapshot. Raises BusUnavailable."""
    ns = bus.subjects.ns
    agents = {s.split(".")[2] for s in await subject_counts(bus, f"{ns}.event.*.memory.>")}
    agents |= {s.split(".")[2] for s in await subject_counts(bus, f"{ns}.event.*.{SNAPSHOT_KIND}")}
    floor = await bus.last_seq() + 1
    for agent in sorted(agents):
        stored = await bus.transport.direct_get(bus.subjects.stream, {"last_by_subj": bus.subjects.event(agent, SNAPSHOT_KIND)})
        if stored is None:
            return 1
        try:
            payload = bus.codec.decode(stored.data).payload
        except DecodeError:
            return 1
        if not isinstance(payload, MemorySnapshotted) or payload.part != payload.parts - 1:
            return 1  # a snapshot a crash left unfinished: the one before is not looked for
        floor = min(floor, payload.position + 1)
    return floor


async def _views_caught_up(bus: Bus, highest: int, wait_s: float) -> str:
    """Whether the projection service's views have applied `highest` (waited for up to `wait_s`).
    Raises TrimRefused when they have not; says so when no service answers."""
    if wait_s <= 0 or highest <= 0:
        return "not asked"
    try:
        await bus.query("SELECT 1", min_seq=highest, timeout_s=wait_s)
    except NoResponders:
        return "no projection service answered: a views file behind this trim must be rebuilt (bus projections rebuild)"
    except QueryError as exc:
        if exc.kind == "timeout":
            raise TrimRefused(f"the views have not applied seq {highest} within {wait_s:g}s: nothing was purged "
                              "(a trim goes no further than the views)") from exc
        raise TrimRefused(f"the projection service could not be asked ({exc}): nothing was purged") from exc
    except BusUnavailable as exc:
        if "no projection service" in str(exc):
            return "no projection service answered: a views file behind this trim must be rebuilt (bus projections rebuild)"
        raise
    return f"the views have applied seq {highest}"


__all__ = ["ArchiveCorrupt", "TrimPlan", "TrimResult", "apply_trim", "plan_trim", "run_trim", "verify_archive"]
