"""Retention: `bus archive trim` purges the log only below archived and verified segments, class by
class, records each trim as an event, and a SIGKILL at any point purges nothing unarchived.

Real nats-server, real Parquet files; the log is read back after each trim and compared with the
archive, record by record.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from agents.runtime.state import StateStore
from bus import Bus, BusConfig
from bus.server import EmbeddedServer
from projections.archive.archiver import run_archive
from projections.archive.config import ArchiveSettings
from projections.archive.retention import DEFAULT_RETENTION, RetentionClass, RetentionPolicy, TrimSettings, overlap
from projections.archive.trim import run_trim
from projections.archive.verify import verify_all
from projections.errors import ArchiveCorrupt, TrimRefused
from schemas.payloads import AgentHeartbeat, LogTrimmed, Note

from conftest import admin_env, read_records, wait_for
from test_archive import publish_notes
from test_cli import BUS, cli_env, run_bus  # noqa: F401 - the fixture is used by name

SEGMENT = 1_000
# A trim in a test: nothing is too young, and no projection service is asked.
NOW = TrimSettings(policy=dataclasses.replace(DEFAULT_RETENTION, min_age_s=0), by="tester", reason="test",
                   views_wait_s=0)


def archive_in(tmp_path: Path, **overrides: object) -> ArchiveSettings:
    return ArchiveSettings(directory=tmp_path / "archive" / "default", **{"segment_records": SEGMENT, **overrides})  # type: ignore[arg-type]


def archived_rows(directory: Path) -> dict[int, tuple[str, bytes]]:
    rows: dict[int, tuple[str, bytes]] = {}
    for path in sorted(directory.glob("seg-*.parquet")):
        table = pq.read_table(path, columns=["seq", "subject", "data"])
        rows.update(zip(table.column("seq").to_pylist(),
                        zip(table.column("subject").to_pylist(), table.column("data").to_pylist())))
    return rows


async def log_rows(bus: Bus) -> dict[int, tuple[str, bytes]]:
    last = await bus.last_seq()
    # The stored bytes, as the archive holds them (private records, such as agent state, sealed).
    return {r.seq: (r.subject.decode(), r.data) for r in await read_records(bus, last, sealed=True) if r.seq <= last}


async def trims_recorded(bus: Bus) -> list[LogTrimmed]:
    found = []
    for r in await read_records(bus, await bus.last_seq()):
        if b'"kind":"archive.log.trimmed"' in r.data:
            found.append(bus.codec.decode(r.data).payload)
    return found


async def assert_nothing_lost(bus: Bus, directory: Path) -> int:
    """Every record ever stored is in the log or in the verified archive (the same bytes in
    both where both hold it), and nothing above the archive is gone. Returns the archive's end."""
    segments = list(verify_all(directory, bus.subjects.stream))
    archived_to = segments[-1].meta.last_seq if segments else 0
    archived, live = archived_rows(directory), await log_rows(bus)
    last = await bus.last_seq()
    missing = [s for s in range(1, last + 1) if s not in live and s not in archived]
    assert not missing, f"records lost: {missing[:10]}..."
    assert all(archived[s] == live[s] for s in archived.keys() & live.keys())
    first, _ = await bus.log_bounds()
    assert first <= archived_to + 1, f"the log was trimmed to {first}, above the archive's end {archived_to}"
    return archived_to


async def test_trim_purges_only_below_the_verified_archive_and_records_who_and_why(bus: Bus, tmp_path: Path) -> None:
    """After sealing two full segments of a 2,500-record log, a trim purges seq 1..2000 and
    nothing after; the `archive.log.trimmed` event (recorded before the purge) says who, why and
    each class's bound; a second trim purges nothing more."""
    await publish_notes(bus, 2_500)
    settings = archive_in(tmp_path)
    await run_archive(bus, settings)
    before = await log_rows(bus)
    result = await run_trim(bus, settings, NOW)
    assert result.plan.archive.last_seq == 2_000 and result.purged == 2_000
    first, last = await bus.log_bounds()
    assert first == 2_001
    after = await log_rows(bus)
    assert min(after) == 2_001 and all(after[s] == r for s, r in before.items() if s > 2_000)
    await assert_nothing_lost(bus, settings.directory)
    [event] = await trims_recorded(bus)
    assert (event.by, event.reason, event.archived_seq, event.below_seq) == ("tester", "test", 2_000, 2_001)
    messages = next(c for c in event.classes if c.name == "messages")
    assert messages.below_seq == 2_001 and "archived and verified to seq 2000" in messages.reason
    assert result.event_seq == last  # the trim added its event, and nothing else
    again = await run_trim(bus, settings, NOW)
    assert again.purged == 0 and (await bus.log_bounds())[0] == 2_001


async def test_a_damaged_or_foreign_archive_refuses_the_trim_and_nothing_is_purged(bus: Bus, tmp_path: Path) -> None:
    """A segment whose bytes were changed fails verification: the trim raises ArchiveCorrupt
    before purging anything. Nothing archived: nothing is purged."""
    await publish_notes(bus, 2_000)
    settings = archive_in(tmp_path)
    assert (await run_trim(bus, settings, NOW)).purged == 0  # no archive yet
    await run_archive(bus, settings)
    last = sorted(settings.directory.glob("seg-*.parquet"))[-1]
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF
    last.write_bytes(bytes(data))
    with pytest.raises(ArchiveCorrupt):
        await run_trim(bus, settings, NOW)
    assert (await bus.log_bounds())[0] == 1
    assert await trims_recorded(bus) == []


async def test_an_archive_of_another_log_refuses_the_trim(bus_config: BusConfig, tmp_path: Path) -> None:
    """The stream deleted and created again under the same name: the old archive goes past the
    new log's end (refused), or its last record is not the new log's record at that sequence
    (refused); nothing is purged either way."""
    settings = archive_in(tmp_path)
    async with Bus(bus_config) as bus:
        await publish_notes(bus, 2_000)
        await run_archive(bus, settings)
        await bus.js.delete_stream(bus.subjects.stream)
    async with Bus(bus_config) as bus:
        await publish_notes(bus, 500)
        with pytest.raises(TrimRefused, match="after the log's last record"):
            await run_trim(bus, settings, NOW)
        await publish_notes(bus, 1_600, start=500)
        with pytest.raises(TrimRefused, match="not the one archived"):
            await run_trim(bus, settings, NOW)
        assert (await bus.log_bounds())[0] == 1 and await trims_recorded(bus) == []


async def test_expiring_classes_go_even_unarchived_and_the_rest_waits_for_the_archive(bus: Bus, tmp_path: Path) -> None:
    """A class that expires (heartbeats after a second here) is purged below its expiry time
    even though nothing is archived; every other record stays until it is archived."""
    for i in range(20):
        await bus.record("worker", AgentHeartbeat(agent="worker", pid=1, handled=i))
    await bus.record("worker", Note(text="kept"))
    marker = await bus.record("worker", Note(text="after the beats"))
    policy = RetentionPolicy(classes=(
        RetentionClass(name="heartbeats", filters=("event.*.agent.heartbeat",), expire_after_s=1.0),
        *DEFAULT_RETENTION.classes[1:],
    ), min_age_s=0)
    from bus.log_trim import first_seq_since
    from datetime import UTC, datetime, timedelta

    await wait_for(lambda: _expired(bus, marker.ack.seq, first_seq_since, datetime, UTC, timedelta),
                   timeout_s=10, what="the heartbeats to be a second old")
    beats_after = await bus.record("worker", AgentHeartbeat(agent="worker", pid=1, handled=99))
    result = await run_trim(bus, archive_in(tmp_path), TrimSettings(policy=policy, views_wait_s=0))
    assert result.by_class["heartbeats"] == 20 and result.purged == 20
    live = await log_rows(bus)
    kinds = [bus.codec.decode(data).kind for _, data in live.values()]
    assert kinds.count("agent.heartbeat") == 1 and kinds.count("note") == 2
    assert beats_after.ack.seq in live


async def _expired(bus: Bus, seq: int, first_seq_since, datetime, UTC, timedelta) -> bool:  # type: ignore[no-untyped-def]
    return await first_seq_since(bus, datetime.now(UTC) - timedelta(seconds=1.0)) > seq


async def _after(proc: asyncio.subprocess.Process, seq_now, before: int) -> bool:  # type: ignore[no-untyped-def]
    return proc.returncode is not None or await seq_now() > before


def _sealed_more(proc: asyncio.subprocess.Process, directory: Path, before: int) -> bool:
    return proc.returncode is not None or len(list(directory.glob("seg-*.parquet"))) > before


def test_retention_classes_must_not_overlap() -> None:
    """A record belongs to one class: overlapping filters are refused when the policy is built."""
    assert overlap("event.*.agent.state", "event.a.>") and overlap("inbox.>", "inbox.x.y")
    assert not overlap("event.*.agent.state", "event.*.agent.heartbeat") and not overlap("inbox.>", "group.>")
    assert not overlap("event.*.memory.block.>", "event.*.memory.fact.>")
    with pytest.raises(ValueError, match="overlap"):
        RetentionPolicy(classes=(RetentionClass(name="a", filters=("event.>",)),
                                 RetentionClass(name="b", filters=("event.*.agent.state",))))
    RetentionPolicy(classes=DEFAULT_RETENTION.classes)  # the defaults are disjoint


@pytest.mark.parametrize("rounds", [
    pytest.param(8, marks=pytest.mark.timeout(300)),  # ~25 s quiet; 16 `bus` processes on a loaded machine
    pytest.param(40, id="soak", marks=[pytest.mark.soak, pytest.mark.timeout(900)]),
])
async def test_sigkill_during_trim_loses_nothing_and_never_trims_above_the_verified_archive(
    bus: Bus, nats_server: EmbeddedServer, admin_credentials: str, cli_env: dict[str, str], tmp_path: Path,  # noqa: F811
    rounds: int,
) -> None:
    """`bus archive run` and `bus archive trim` killed with SIGKILL at random points, round after
    round while the log grows: every record is always in the log or the verified archive, the
    log is never trimmed above the archive, fenced subjects keep their last record, and a last
    trim without a kill completes. Odd rounds kill the trim right after it recorded its event
    (between the record and the purges), even ones at a random time. 8 rounds; 40 with -m soak."""
    env = {**admin_env(cli_env, nats_server, admin_credentials), "USER": "tester"}
    directory = Path(env["BUS_HOME"]) / "archive" / "default"
    rng = random.Random(1515)
    state = StateStore(bus, "fenced")
    version = 0
    killed = {"run": 0, "trim": 0}
    trimmed_subject = bus.subjects.event("archiver", "archive.log.trimmed")

    async def trim_event_seq() -> int:
        stored = await bus.transport.direct_get(bus.subjects.stream, {"last_by_subj": trimmed_subject})
        return 0 if stored is None else stored.seq

    for round_ in range(rounds):
        await publish_notes(bus, 700, start=round_ * 700)
        version = await state.save({"round": round_}, version=version)
        for command in (["archive", "run", "--segment-records", "250"], ["archive", "trim", "--min-age", "0", "--views-wait", "0"]):
            events_before = await trim_event_seq()
            segments_before = len(list(directory.glob("seg-*.parquet")))
            proc = await asyncio.create_subprocess_exec(
                *BUS, *command, env=env, cwd=tmp_path,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL,
            )
            try:
                if command[1] == "trim" and round_ % 2:
                    # Right after it recorded its event: between the record and the purges.
                    await wait_for(lambda: _after(proc, trim_event_seq, events_before), timeout_s=30, interval_s=0.002,
                                   what="the trim to record its event")
                elif command[1] == "run" and round_ % 2 == 0:
                    # Right after it sealed a segment, while it seals the next: not a matter of
                    # how fast this machine is (a quick run ends before any random time).
                    await wait_for(lambda: _sealed_more(proc, directory, segments_before), timeout_s=30,
                                   interval_s=0.002, what="the run to seal a segment")
                else:
                    await asyncio.wait_for(proc.wait(), rng.uniform(0.5, 1.8))
            except TimeoutError:
                pass
            if proc.returncode is None:
                proc.kill()
                killed[command[1]] += 1
            await proc.wait()
            await assert_nothing_lost(bus, directory)
            assert (await state.load()).version == version  # the fenced subject's last record stays
    sealed = await run_bus("archive", "run", "--all", env=env, cwd=tmp_path)
    assert sealed.code == 0, sealed.stderr
    done = await run_bus("archive", "trim", "--min-age", "0", "--views-wait", "0", "--reason", "last", env=env, cwd=tmp_path)
    assert done.code == 0, done.stderr
    archived_to = await assert_nothing_lost(bus, directory)
    first, _ = await bus.log_bounds()
    assert first == min(archived_to + 1, version)  # the state record, older than the archive's end, is kept
    assert (await state.load()).value == {"round": rounds - 1}
    events = await trims_recorded(bus)
    assert events and events[-1].reason == "last" and events[-1].by == "tester"
    assert killed["trim"] >= max(2, rounds // 4) and killed["run"] >= 1, killed  # the seed kills mid-way, several times
    assert all(e.archived_seq <= archived_to for e in events)


@pytest.mark.timeout(300)  # a loaded machine: the views may take minutes to catch up
async def test_after_archive_and_trim_a_rebuild_equals_the_views_of_the_log_never_trimmed(bus: Bus, tmp_path: Path) -> None:
    """A projection service folds the whole mixed log live (its views are those of the log never
    trimmed); the log is archived and trimmed, the trim first asking that service to have
    applied what it purges; then a rebuild in that service, and a rebuild in a service starting
    on a new views file after the trim, both equal the live views (every table's content hash),
    the archived share folded from the Parquet files."""
    from projections.config import ProjectionSettings
    from projections.service import ProjectionService
    from test_archive_rebuild import caught_up, mixed_log, rebuilt_hashes

    await mixed_log(bus)
    archive = archive_in(tmp_path, segment_records=1_500)
    settings = ProjectionSettings(db_path=str(tmp_path / "live.duckdb"), archive_dir=str(archive.directory))
    async with ProjectionService(bus, settings) as service:
        run = await run_archive(bus, archive)
        tail = (await bus.send("keeper", Note(text="the tail"))).ack.seq
        await caught_up(bus, tail)
        trim = dataclasses.replace(NOW, views_wait_s=120)
        result = await run_trim(bus, archive, trim)
        assert result.plan.views.startswith("the views have applied") and result.purged > 0
        assert (await bus.log_bounds())[0] > 1_000  # most of what was archived is gone from the log
        await caught_up(bus, result.event_seq)
        never_trimmed = await service.content_hashes()
        report = await service.rebuild(wait=True)
        assert report.archived == run.last_seq
        assert await service.content_hashes() == never_trimmed
    fresh, _, archived = await rebuilt_hashes(
        bus, ProjectionSettings(db_path=str(tmp_path / "fresh.duckdb"), archive_dir=str(archive.directory)),
        result.event_seq,
    )
    assert archived == run.last_seq and fresh == never_trimmed


async def test_trim_cli_dry_run_trim_and_the_policy_on_the_archivers_schedule(
    bus: Bus, nats_server: EmbeddedServer, admin_credentials: str, cli_env: dict[str, str], tmp_path: Path,  # noqa: F811
) -> None:
    """`bus archive trim --dry-run` says each class's bound and purges nothing; `bus archive
    trim` purges and names its event; `run --trim` needs --every; `run --every S --trim` seals
    and trims on its schedule until SIGTERM (exit 0)."""
    import signal

    env = {**admin_env(cli_env, nats_server, admin_credentials), "USER": "ops"}
    await publish_notes(bus, 1_000)
    ran = await run_bus("archive", "run", "--segment-records", "500", env=env, cwd=tmp_path)
    assert ran.code == 0, ran.stderr
    dry = await run_bus("archive", "trim", "--dry-run", "--min-age", "0", "--views-wait", "0", env=env, cwd=tmp_path)
    assert dry.code == 0, dry.stderr
    assert "the verified archive ends at seq 1000" in dry.stdout and "messages" in dry.stdout
    assert "below seq 1001" in dry.stdout and "dry run: nothing was purged" in dry.stdout
    assert (await bus.log_bounds())[0] == 1
    young = await run_bus("archive", "trim", "--views-wait", "0", env=env, cwd=tmp_path)  # the default minimum age: an hour
    assert young.code == 0 and (await bus.log_bounds())[0] == 1, young.stdout
    done = await run_bus("archive", "trim", "--min-age", "0", "--views-wait", "0", "--reason", "disk", env=env, cwd=tmp_path)
    assert done.code == 0, done.stderr
    assert "trimmed 1,000 records; recorded as archive.log.trimmed at seq" in done.stdout
    assert (await bus.log_bounds())[0] == 1_001
    [event] = await trims_recorded(bus)
    assert (event.by, event.reason) == ("ops", "disk")
    refused = await run_bus("archive", "run", "--trim", env=env, cwd=tmp_path)
    assert refused.code == 2 and "--every" in refused.stderr

    await publish_notes(bus, 1_000, start=1_000)
    proc = await asyncio.create_subprocess_exec(
        *BUS, "archive", "run", "--every", "0.2", "--segment-records", "500", "--trim", "--min-age", "0",
        "--views-wait", "0", env=env, cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_for(lambda: _first_above(bus, 2_000), timeout_s=60, what="the policy to seal and trim")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    await assert_nothing_lost(bus, Path(env["BUS_HOME"]) / "archive" / "default")


async def _first_above(bus: Bus, seq: int) -> bool:
    return (await bus.log_bounds())[0] > seq



@pytest.mark.timeout(300)  # a loaded machine: the views may take minutes to catch up
async def test_views_behind_a_trim_and_a_new_views_file_fold_the_archive_before_the_log(
    bus: Bus, tmp_path: Path,
) -> None:
    """A projection service stops at some seq; the log grows, is archived and trimmed past it.
    Started again on the same views file with the archive served, and a service started on a
    new views file, each fold what left the log from the archive before reading the log: with no
    rebuild, their views equal those of a service that folded the whole log live, never
    trimmed (every table's content hash)."""
    from projections.config import ProjectionSettings
    from projections.service import ProjectionService
    from test_archive_rebuild import caught_up, mixed_log

    archive = archive_in(tmp_path, segment_records=1_500)
    behind = ProjectionSettings(db_path=str(tmp_path / "behind.duckdb"), archive_dir=str(archive.directory))
    await publish_notes(bus, 300)
    async with ProjectionService(bus, behind):
        await caught_up(bus, 300)
    live = ProjectionSettings(db_path=str(tmp_path / "live.duckdb"), archive_dir=str(archive.directory))
    async with ProjectionService(bus, live) as always:
        await mixed_log(bus)
        await run_archive(bus, archive)
        await caught_up(bus, await bus.last_seq())
        result = await run_trim(bus, archive, dataclasses.replace(NOW, views_wait_s=120))
        assert result.purged > 0 and (await bus.log_bounds())[0] > 301
        await caught_up(bus, result.event_seq)
        never_trimmed = await always.content_hashes()
    fresh = ProjectionSettings(db_path=str(tmp_path / "fresh.duckdb"), archive_dir=str(archive.directory))
    for settings in (behind, fresh):
        async with ProjectionService(bus, settings) as restarted:
            await caught_up(bus, result.event_seq)
            assert await restarted.content_hashes() == never_trimmed, settings.db_path
