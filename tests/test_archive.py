"""The log's archive: sealed, verified, hash-chained Parquet segments (`bus archive run|list|verify`).

Real nats-server, real Parquet files: what the archive holds is compared with the log as the
projections read it, byte for byte.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bus import Bus
from bus.server import EmbeddedServer
from projections.archive.archiver import EVENTS_FILE, ArchiveRun, keep_archiving, run_archive
from projections.archive.config import ArchivePolicy, ArchiveSettings
from projections.archive.verify import chain_of, verify_all
from projections.archive.writer import TEMP_PREFIX
from projections.errors import ArchiveCorrupt
from schemas.payloads import Note

from conftest import admin_env, read_records, wait_for
from test_cli import BUS, cli_env, run_bus  # noqa: F401 - the fixture is used by name

SEGMENT = 1_000


async def publish_notes(bus: Bus, count: int, *, start: int = 0) -> int:
    """Send `count` notes (in concurrent groups, as agents do); returns the log's last seq."""
    for at in range(start, start + count, 500):
        await asyncio.gather(*(bus.send("keeper", Note(text=f"note {i}")) for i in range(at, min(at + 500, start + count))))
    return await bus.last_seq()


def settings_in(tmp_path: Path, **overrides: object) -> ArchiveSettings:
    return ArchiveSettings(directory=tmp_path / "archive" / "default", segment_records=SEGMENT, **overrides)  # type: ignore[arg-type]


async def sealed_events(bus: Bus, upto: int) -> list[bytes]:
    return [r.data for r in await read_records(bus, upto) if b'"kind":"archive.segment.sealed"' in r.data]


async def test_archive_holds_the_logs_exact_records_in_chained_segments(bus: Bus, tmp_path: Path) -> None:
    """Full segments are sealed by default, the rest with seal_partial; the segments tile the
    log from seq 1 with the exact bytes, subjects, sequences and stored times, each verified and
    chained, and each announced by one `archive.segment.sealed` event."""
    head = await publish_notes(bus, 2_500)
    settings = settings_in(tmp_path)
    run = await run_archive(bus, settings)
    assert [(m.first_seq, m.last_seq, m.count) for m, _ in run.sealed] == [(1, 1000, 1000), (1001, 2000, 1000)]
    partial = await run_archive(bus, settings_in(tmp_path, seal_partial=True))
    assert [m.first_seq for m, _ in partial.sealed] == [2001]
    sealed_at = partial.sealed[0][0].last_seq
    assert sealed_at >= head  # the first run's two events are in the last segment
    segments = list(verify_all(settings.directory, bus.subjects.stream))
    assert [s.meta.after_seq for s in segments] == [0, 1000, 2000]
    assert segments[1].meta.prev_chain_sha256 == segments[0].meta.chain_sha256
    records = [r for r in await read_records(bus, sealed_at) if r.seq <= sealed_at]
    archived = [pq.read_table(s.path, columns=["seq", "stored_ns", "subject", "data", "kind"]) for s in segments]
    rows = [row for t in archived for row in zip(*(t.column(c).to_pylist() for c in ("seq", "stored_ns", "subject", "data")))]
    assert rows == [(r.seq, r.time_ns, r.subject.decode(), r.data) for r in records]
    assert archived[0].column("kind")[0].as_py() == "note"  # the fold's columns are there, decoded
    events = await sealed_events(bus, await bus.last_seq())
    assert len(events) == 3


async def test_a_second_run_seals_nothing_twice_and_announces_what_a_crash_left(bus: Bus, tmp_path: Path) -> None:
    """Run again: nothing new is sealed and no event recorded twice. A crash's leftovers (a
    temporary file, a segment whose event was never noted) are cleaned up and announced once."""
    await publish_notes(bus, 2_000)
    settings = settings_in(tmp_path)
    first = await run_archive(bus, settings)
    assert len(first.sealed) == 2
    again = await run_archive(bus, settings)
    assert again.sealed == [] and again.announced == [] and again.last_seq == 2000
    (settings.directory / f"{TEMP_PREFIX}seg-x.parquet").write_bytes(b"half a file")
    lines = (settings.directory / EVENTS_FILE).read_text().splitlines()
    (settings.directory / EVENTS_FILE).write_text(lines[0] + "\n")  # as if killed before noting the second
    after_crash = await run_archive(bus, settings)
    assert after_crash.announced == [first.sealed[1][0].name]
    assert not any(p.name.startswith(TEMP_PREFIX) for p in settings.directory.iterdir())
    # Re-recorded with the same id within the duplicate window: stored once.
    assert len(await sealed_events(bus, await bus.last_seq())) == 2


async def test_a_damaged_archive_is_refused_with_one_line_and_nothing_is_written(bus: Bus, tmp_path: Path) -> None:
    """A truncated segment, a changed record or a missing segment fails verification with a line
    naming the segment; `run` then archives nothing after it."""
    await publish_notes(bus, 3_000)
    settings = settings_in(tmp_path)
    await run_archive(bus, settings)
    paths = [s.path for s in chain_of(settings.directory, bus.subjects.stream)]
    assert len(paths) == 3

    # A changed record: rewritten with the same metadata and one byte of one message different.
    table = pq.read_table(paths[1])
    data = table.column("data").to_pylist()
    data[5] = data[5].replace(b"note", b"NOTE")

    pq.write_table(table.set_column(table.schema.get_field_index("data"), "data", pa.array(data, pa.binary())), paths[1])
    with pytest.raises(ArchiveCorrupt, match=r"seg-0+1001-0+2000\.parquet: the content hash does not match"):
        list(verify_all(settings.directory, bus.subjects.stream))

    # Truncated: the last segment (the one a run verifies before going on).
    whole = paths[2].read_bytes()
    paths[2].write_bytes(whole[: len(whole) // 2])
    await publish_notes(bus, 1_000, start=3_000)
    with pytest.raises(ArchiveCorrupt, match=r"seg-0+2001-0+3000\.parquet: not a readable Parquet file"):
        await run_archive(bus, settings)
    assert len(list(settings.directory.glob("seg-*"))) == 3

    # Missing: the middle segment gone.
    paths[2].write_bytes(whole)
    paths[1].unlink()
    with pytest.raises(ArchiveCorrupt, match=r"seg-0+2001-0+3000\.parquet: the chain is broken before it: a segment is missing \(seq 1001\.\.2000\)"):
        chain_of(settings.directory, bus.subjects.stream)


async def test_archive_cli_runs_lists_and_verifies(
    bus: Bus, nats_server: EmbeddedServer, admin_credentials: str, cli_env: dict[str, str], tmp_path: Path,  # noqa: F811
) -> None:
    """`bus archive run --all` seals and says what; `list` shows the segments; `verify` says ok,
    and exits 1 with one BROKEN line once a segment is damaged; bad arguments exit 2 in one line."""
    await publish_notes(bus, 1_500)
    env = admin_env(cli_env, nats_server, admin_credentials)
    ran = await run_bus("archive", "run", "--all", "--segment-records", "1000", env=env, cwd=tmp_path)
    assert ran.code == 0, ran.stderr
    assert "sealed seg-00000000000000000001-00000000000000001000.parquet" in ran.stdout
    assert "archived 1,500 records in 2 segment(s)" in ran.stdout
    listed = await run_bus("archive", "list", env=env, cwd=tmp_path)
    assert listed.code == 0 and "2 segment(s), 1,500 records, up to seq 1500" in listed.stdout
    as_json = await run_bus("archive", "list", "--format", "json", env=env, cwd=tmp_path)
    rows = msgspec.json.decode(as_json.stdout)
    assert [(r["first_seq"], r["last_seq"], r["count"]) for r in rows] == [(1, 1000, 1000), (1001, 1500, 500)]
    assert rows[1]["prev_chain_sha256"] == rows[0]["chain_sha256"]
    elsewhere = await run_bus("archive", "verify", "--dir", str(tmp_path / "nothing"), env=env, cwd=tmp_path)
    assert elsewhere.code == 0 and elsewhere.stdout.startswith("ok: no segments in")
    not_a_dir = await run_bus("archive", "list", "--dir", str(Path(env["BUS_HOME"]) / "archive" / "default" / "sealed-events"),
                              env=env, cwd=tmp_path)
    assert not_a_dir.code == 2 and len(not_a_dir.stderr.strip().splitlines()) == 1 and "cannot list" in not_a_dir.stderr
    verified = await run_bus("archive", "verify", env=env, cwd=tmp_path)
    assert verified.code == 0 and verified.stdout.startswith("ok: 2 segment(s), 1,500 records"), verified
    home = Path(env["BUS_HOME"]) / "archive" / "default"
    first = home / "seg-00000000000000000001-00000000000000001000.parquet"
    first.write_bytes(first.read_bytes()[:100])
    broken = await run_bus("archive", "verify", env=env, cwd=tmp_path)
    assert broken.code == 1
    assert broken.stdout.splitlines()[0].startswith("BROKEN: seg-00000000000000000001-00000000000000001000.parquet: not a readable Parquet file")
    bad = await run_bus("archive", "run", "--segment-records", "0", env=env, cwd=tmp_path)
    assert bad.code == 2 and "must be" in bad.stderr and bad.stdout == ""
    refused = await run_bus("archive", "run", env=env, cwd=tmp_path)
    assert refused.code == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "not a readable Parquet file" in refused.stderr


async def test_the_policy_seals_full_segments_as_the_log_grows(bus: Bus, tmp_path: Path) -> None:
    """`keep_archiving` seals each full segment once the log has grown by one, never a partial
    one, until cancelled (the cancellation reaches the caller)."""
    settings = ArchiveSettings(directory=tmp_path / "archive" / "default", segment_records=500)
    runs: list[ArchiveRun] = []
    keeping = asyncio.create_task(keep_archiving(bus, ArchivePolicy(settings=settings, interval_s=0.05), on_run=runs.append))
    try:
        await publish_notes(bus, 1_200)
        await wait_for(lambda: len(list(settings.directory.glob("seg-*"))) == 2, timeout_s=30, what="two full segments sealed")
        await publish_notes(bus, 400, start=1_200)  # 1,600 notes and 2 events: a third segment, not a fourth
        await wait_for(lambda: len(list(settings.directory.glob("seg-*"))) == 3, timeout_s=30, what="the third segment sealed")
        ran = len(runs)
        await wait_for(lambda: len(runs) > ran + 2, timeout_s=30, what="more runs with nothing to seal")
    finally:
        keeping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await keeping
    segments = chain_of(settings.directory, bus.subjects.stream)
    assert [s.meta.count for s in segments] == [500, 500, 500]


async def test_archive_cli_keeps_archiving_until_stopped(
    bus: Bus, nats_server: EmbeddedServer, admin_credentials: str, cli_env: dict[str, str], tmp_path: Path,  # noqa: F811
) -> None:
    """`bus archive run --every S` seals segments as they fill and ends cleanly (exit 0) on
    SIGTERM; combined with --all it is refused (exit 2)."""
    env = admin_env(cli_env, nats_server, admin_credentials)
    await publish_notes(bus, 1_000)
    proc = await asyncio.create_subprocess_exec(
        *BUS, "archive", "run", "--every", "0.1", "--segment-records", "500", env=env, cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []

        async def two_sealed() -> bool:
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()  # type: ignore[union-attr]
            lines.append(line)
            return sum(text.startswith("sealed ") for text in lines) == 2

        await wait_for(two_sealed, timeout_s=30, what="two segments sealed by the policy")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    refused = await run_bus("archive", "run", "--every", "1", "--all", env=env, cwd=tmp_path)
    assert refused.code == 2 and "cannot be combined" in refused.stderr


async def test_a_flipped_byte_anywhere_in_a_segment_is_found_or_changes_nothing_read(bus: Bus, tmp_path: Path) -> None:
    """Bit rot anywhere in a segment file (a decoded column's page, the records' bytes, the
    footer) either fails verification with one line naming the segment, or changes nothing that
    is read (a byte of the footer that no reader uses): never a silent change, never an
    exception of another kind."""
    await publish_notes(bus, 1_000)
    settings = settings_in(tmp_path)
    run = await run_archive(bus, settings)
    path = settings.directory / run.sealed[0][0].name
    whole = path.read_bytes()
    original = pq.read_table(path)
    found = unused = 0
    for at in range(0, len(whole), max(1, len(whole) // 60)):
        damaged = bytearray(whole)
        damaged[at] ^= 0x5A
        path.write_bytes(bytes(damaged))
        try:
            list(verify_all(settings.directory, bus.subjects.stream))
        except ArchiveCorrupt as exc:
            message = str(exc)
            assert message.startswith(path.name + ": ") and "\n" not in message, (at, message)
            found += 1
            continue
        assert pq.read_table(path).equals(original, check_metadata=True), f"byte {at} changed what is read"
        unused += 1
    path.write_bytes(whole)
    assert [s.meta.count for s in verify_all(settings.directory, bus.subjects.stream)] == [1_000]
    assert found >= 0.9 * (found + unused)  # nearly every byte matters (measured: 60 of 61)


async def test_cancelling_a_run_leaves_a_whole_archive_that_the_next_run_goes_on_from(bus: Bus, tmp_path: Path) -> None:
    """A run cancelled while it seals raises CancelledError after the segment being written is
    whole (no temporary file left); the next run goes on after it, and every segment is
    announced exactly once."""
    await publish_notes(bus, 3_000)
    settings = ArchiveSettings(directory=tmp_path / "archive" / "default", segment_records=300, seal_partial=True)
    running = asyncio.create_task(run_archive(bus, settings))
    await wait_for(lambda: len(list(settings.directory.glob("seg-*"))) >= 2, timeout_s=30, what="two segments sealed")
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert not any(p.name.startswith(TEMP_PREFIX) for p in settings.directory.iterdir())
    await run_archive(bus, settings)
    segments = list(verify_all(settings.directory, bus.subjects.stream))
    assert segments[0].meta.first_seq == 1 and sum(s.meta.count for s in segments) == segments[-1].meta.last_seq
    events = await sealed_events(bus, await bus.last_seq())
    assert len(events) == len(segments) == len(set(events))


async def test_sigkill_at_any_point_loses_nothing_and_seals_nothing_twice(
    bus: Bus, nats_server: EmbeddedServer, admin_credentials: str, cli_env: dict[str, str], tmp_path: Path,  # noqa: F811
) -> None:
    """`bus archive run` killed with SIGKILL while it seals (after a random number of segments,
    several times over) leaves an archive that verifies; the next runs go on from it, the
    segments tile the log from seq 1, and each is announced by exactly one event."""
    import random

    env = admin_env(cli_env, nats_server, admin_credentials)
    directory = Path(env["BUS_HOME"]) / "archive" / "default"
    await publish_notes(bus, 6_000)
    rng = random.Random(15)
    for _ in range(4):
        target = len(list(directory.glob("seg-*"))) + rng.randrange(1, 4)
        proc = await asyncio.create_subprocess_exec(
            *BUS, "archive", "run", "--segment-records", "250", env=env, cwd=tmp_path,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL,
        )
        try:
            await wait_for(lambda: proc.returncode is not None or len(list(directory.glob("seg-*"))) >= target,
                           timeout_s=60, interval_s=0.002, what="the run to reach its kill point")
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        list(verify_all(directory, bus.subjects.stream))  # whatever it left verifies
    done = await run_bus("archive", "run", "--segment-records", "250", env=env, cwd=tmp_path)
    assert done.code == 0, done.stderr
    segments = list(verify_all(directory, bus.subjects.stream))
    assert segments[0].meta.first_seq == 1
    assert [s.meta.after_seq for s in segments[1:]] == [s.meta.last_seq for s in segments[:-1]]
    assert sum(s.meta.count for s in segments) == segments[-1].meta.last_seq >= 6_000
    chains = [msgspec.json.decode(e)["payload"]["chain_sha256"] for e in await sealed_events(bus, await bus.last_seq())]
    assert sorted(chains) == sorted(s.meta.chain_sha256 for s in segments)


def _footer_abort_segment(directory: Path) -> Path:
    """A 1,000-record segment built from fixed records (no server): the same bytes every time, so
    the footer bytes that make pyarrow abort are known."""
    from datetime import UTC, datetime, timedelta

    from bus.log_reader import LogRecord
    from projections.archive.writer import write_segment
    from schemas import Codec
    from schemas.envelope import Envelope

    codec = Codec()
    base = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    records = [
        LogRecord(i, 1_767_322_000_000_000_000 + i * 1_000_000, b"default.inbox.keeper.tester", codec.encode(Envelope(
            id=f"018f0000-0000-7000-8000-{i:012d}", sender="tester", to="keeper", payload=Note(text=f"note {i}"),
            created_at=base + timedelta(milliseconds=i),
        )))
        for i in range(1, 1001)
    ]
    meta, _ = write_segment(ArchiveSettings(directory=directory), "CONTINUUM_DEFAULT", records, None)
    return directory / meta.name


# Offsets into that segment's footer whose byte, XOR 0x5A, makes pyarrow's C++ abort the process
# ("ColumnMetaData type does not match ColumnDescriptor physical type: UNKNOWN vs. BYTE_ARRAY"):
# found by flipping every footer byte, each in a process of its own (3 of 4,908 bytes).
FOOTER_ABORTS = (733, 868, 1212)


async def test_verify_reports_a_segment_the_parquet_reader_aborts_on_as_broken_and_lives(
    cli_env: dict[str, str], tmp_path: Path,  # noqa: F811
) -> None:
    """A flipped footer byte that makes pyarrow's C++ abort the process reading it: `bus archive
    verify` (which reads each segment in a child process) says the segment is broken, naming it
    and the signal, and exits 1 instead of dying; the same check in-process aborts (the control
    that the byte provokes the abort)."""
    import sys

    directory = tmp_path / "archive"
    path = _footer_abort_segment(directory)
    whole = path.read_bytes()
    footer_at = len(whole) - 8 - int.from_bytes(whole[-8:-4], "little")
    for offset in FOOTER_ABORTS:
        damaged = bytearray(whole)
        damaged[footer_at + offset] ^= 0x5A
        path.write_bytes(bytes(damaged))
        control = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import sys; from pathlib import Path; from projections.archive.verify import verify_file; "
            "verify_file(Path(sys.argv[1]), prev_chain='0' * 64, after_seq=0)", str(path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        assert await control.wait() == -signal.SIGABRT, f"footer byte {offset} no longer aborts pyarrow: find new ones"
        result = await run_bus("archive", "verify", "--dir", str(directory), env=cli_env, cwd=tmp_path)
        assert result.code == 1, (offset, result.stdout, result.stderr)
        assert f"BROKEN: {path.name}: the Parquet reader was killed by SIGABRT reading it: the file is damaged" in result.stdout
        assert "0 segment(s) before it verified" in result.stdout
    path.write_bytes(whole)
    ok = await run_bus("archive", "verify", "--dir", str(directory), env=cli_env, cwd=tmp_path)
    assert ok.code == 0 and "ok: 1 segment(s), 1,000 records" in ok.stdout, ok.stdout
