"""The archive's second target: every segment copied to the NATS Object Store bucket
`CONTINUUM_ARCHIVE_<NS>`, verified there, recorded; trims wait for the copies; `archive list|verify`
show and check them; `archive restore` rebuilds the directory from the bucket.

Real nats-server (one, and the three-node cluster for a replicated bucket), real Parquet files;
copies are compared with the files byte for byte.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
import shutil
from pathlib import Path

import msgspec
import pytest

from bus import Bus, BusConfig
from bus.cluster import LocalCluster
from bus.object_store import ObjectInfo, ObjectStore, digest_of, meta_subject
from bus.server import EmbeddedServer
from cluster import ClusterAccess
from projections.archive.archiver import EVENTS_FILE, run_archive
from projections.archive.config import ArchiveSettings
from projections.archive.copies import COPIES_FILE, copy_states, read_notes, restore_archive
from projections.archive.trim import run_trim
from projections.archive.verify import verify_all
from projections.config import ProjectionSettings
from projections.errors import ArchiveCorrupt
from schemas.payloads import Note

from conftest import admin_env, read_records, wait_for
from test_archive import publish_notes
from test_archive_rebuild import mixed_log, rebuilt_hashes
from test_archive_trim import NOW, archived_rows, assert_nothing_lost, log_rows
from test_cli import BUS, cli_env, run_bus  # noqa: F401 - the fixture is used by name

SEGMENT = 1_000


def copying(tmp_path: Path, **overrides: object) -> ArchiveSettings:
    return ArchiveSettings(directory=tmp_path / "archive" / "default", object_store=True,
                           **{"segment_records": SEGMENT, **overrides})  # type: ignore[arg-type]


async def bucket(bus: Bus) -> ObjectStore:
    return await ObjectStore.open(bus.transport, bus.subjects.archive_bucket, like=bus.subjects.stream)


async def copied_events(bus: Bus, directory: Path | None = None) -> list[dict]:
    """The `archive.segment.copied` events ever recorded: in the log, and (after a trim) in the
    archive's segments at `directory`."""
    records = {seq: data for seq, (_, data) in (archived_rows(directory) if directory is not None else {}).items()}
    records.update({seq: data for seq, (_, data) in (await log_rows(bus)).items()})
    return [msgspec.json.decode(data)["payload"] for _, data in sorted(records.items())
            if b'"kind":"archive.segment.copied"' in data]


async def assert_copies_are_the_files(bus: Bus, directory: Path) -> list[str]:
    """Every segment file has an object in the bucket holding its exact bytes (digest = the
    file's SHA-256), and one `archive.segment.copied` event; returns the segment names."""
    store = await bucket(bus)
    names = []
    for segment in verify_all(directory, bus.subjects.stream):
        info, data = await store.read(segment.meta.name)
        assert data == segment.path.read_bytes()
        assert info.digest == digest_of(hashlib.sha256(data).digest())
        assert info.metadata["continuum.chain_sha256"] == segment.meta.chain_sha256
        names.append(segment.meta.name)
    events = await copied_events(bus, directory)
    assert {e["name"] for e in events} == set(names)
    for name in names:  # the last event of each segment names the object in the bucket now
        [*_, last] = [e for e in events if e["name"] == name]
        assert last["nuid"] == (await store.info(name)).nuid  # type: ignore[union-attr]
    assert set(read_notes(directory)) == set(names)
    return names


async def forge(bus: Bus, name: str, info: ObjectInfo | bytes) -> None:
    raw = info if isinstance(info, bytes) else msgspec.json.encode(info)
    await bus.transport.request(meta_subject(bus.subjects.archive_bucket, name), raw, headers={"Nats-Rollup": "sub"})


async def test_a_run_copies_each_segment_once_verified_and_recorded(bus: Bus, tmp_path: Path) -> None:
    """With the object store on, each sealed segment's file is copied to the bucket, read back
    verified and recorded by one `archive.segment.copied` event (after its sealed event); a
    second run copies nothing; a segment sealed later is copied by its run; every state is
    `copied`."""
    await publish_notes(bus, 2_500)
    settings = copying(tmp_path)
    run = await run_archive(bus, settings)
    assert run.copied == [m.name for m, _ in run.sealed] and len(run.copied) == 2
    again = await run_archive(bus, settings)
    assert again.sealed == [] and again.copied == []
    partial = await run_archive(bus, dataclasses.replace(settings, seal_partial=True))
    assert len(partial.copied) == 1
    names = await assert_copies_are_the_files(bus, settings.directory)
    assert len(await copied_events(bus)) == len(names)  # none twice
    records = await read_records(bus, await bus.last_seq())
    kinds = [msgspec.json.decode(r.data)["payload"] for r in records if b'"kind":"archive.segment.' in r.data]
    for name in names:  # each segment's sealed event comes before its copied event
        order = [k["kind"] for k in kinds if k["name"] == name]
        assert order == ["archive.segment.sealed", "archive.segment.copied"], (name, order)
    segments = list(verify_all(settings.directory, bus.subjects.stream))
    states = await copy_states(bus, settings, segments, whole=True)
    assert [s.state for s in states] == ["copied"] * 3
    replicas = (await bus.js.stream_info(f"OBJ_{bus.subjects.archive_bucket}")).config.num_replicas
    assert replicas == (await bus.js.stream_info(bus.subjects.stream)).config.num_replicas


async def test_a_run_after_a_crash_copies_what_was_left_and_nothing_twice(bus: Bus, tmp_path: Path) -> None:
    """What a crash can leave, finished by the next run: segments sealed but never copied (the
    object store was off, or the run died before), an object stored whose event was not noted
    (read back and recorded, not copied again: the same event id), a half-written or hostile
    object (garbage metadata: copied again), a copy removed from the bucket (copied again)."""
    await publish_notes(bus, 4_000)
    settings = copying(tmp_path)
    await run_archive(bus, dataclasses.replace(settings, object_store=False))
    names = [s.meta.name for s in verify_all(settings.directory, bus.subjects.stream)]
    first = await run_archive(bus, settings)
    assert first.sealed == [] and first.copied == names  # sealed before: verified wholly, then copied
    store = await bucket(bus)
    nuids = {n: (await store.info(n)).nuid for n in names}  # type: ignore[union-attr]

    (settings.directory / COPIES_FILE).unlink()  # died after the puts, before noting the events
    await forge(bus, names[1], b"\x00garbage")  # a hostile (or torn) metadata message
    await store.delete(names[2])  # removed from the bucket
    second = await run_archive(bus, settings)
    assert second.copied == names
    after = {n: (await store.info(n)).nuid for n in names}  # type: ignore[union-attr]
    assert after[names[0]] == nuids[names[0]] and after[names[3]] == nuids[names[3]]  # not copied again
    assert after[names[1]] != nuids[names[1]] and after[names[2]] != nuids[names[2]]
    await assert_copies_are_the_files(bus, settings.directory)
    counts = [sum(e["name"] == n for e in await copied_events(bus)) for n in names]
    assert counts == [1, 2, 2, 1]  # recorded again after the crash: stored once; copied again: a new event


async def test_trim_goes_no_further_than_the_verified_copies(bus: Bus, tmp_path: Path) -> None:
    """With the object store on, a trim purges only below segments whose copy is recorded and
    verified: nothing while no segment is copied, below the first segment while the second's
    copy is damaged (its chunks do not match its metadata), all of it once copied again."""
    await publish_notes(bus, 2_500)
    settings = copying(tmp_path)
    await run_archive(bus, dataclasses.replace(settings, object_store=False))
    nothing = await run_trim(bus, settings, NOW)
    assert nothing.purged == 0 and nothing.plan.archive.last_seq == 0 and (await bus.log_bounds())[0] == 1
    await run_archive(bus, settings)
    names = [s.meta.name for s in verify_all(settings.directory, bus.subjects.stream)]
    store = await bucket(bus)
    info = await store.info(names[1])
    assert info is not None
    await forge(bus, names[1], msgspec.structs.replace(info, chunks=info.chunks + 1))  # truncated
    partly = await run_trim(bus, settings, NOW)
    assert partly.plan.archive.last_seq == 1_000 and (await bus.log_bounds())[0] == 1_001
    await assert_nothing_lost(bus, settings.directory)
    await store.put(names[1], (settings.directory / names[1]).read_bytes())  # an operator re-put it
    whole = await run_trim(bus, settings, NOW)
    assert whole.plan.archive.last_seq == 2_000 and (await bus.log_bounds())[0] == 2_001
    await assert_nothing_lost(bus, settings.directory)


async def test_list_verify_and_restore_commands_show_check_and_rebuild_the_copies(
    bus: Bus, nats_server: EmbeddedServer, admin_credentials: str, cli_env: dict[str, str], tmp_path: Path,  # noqa: F811
) -> None:
    """`bus archive run --object-store` copies; `list` shows each copy's state; `verify` reads
    every copy back (exit 1 with one line per missing or damaged copy, naming it); after the
    directory is lost, `restore` rebuilds it from the bucket, byte for byte, the chain verified,
    and a run after it announces and copies nothing again."""
    env = {**admin_env(cli_env, nats_server, admin_credentials), "BUS_ARCHIVE_OBJECT_STORE": "1"}
    directory = Path(env["BUS_HOME"]) / "archive" / "default"
    await publish_notes(bus, 2_100)
    ran = await run_bus("archive", "run", "--segment-records", "700", env=env, cwd=tmp_path)
    assert ran.code == 0, ran.stderr
    assert ran.stdout.count("copied seg-") == 3
    listed = await run_bus("archive", "list", env=env, cwd=tmp_path)
    assert listed.code == 0 and listed.stdout.count("  copied") == 3 and "3 copied" in listed.stdout, listed.stdout
    local_only = await run_bus("archive", "list", "--format", "json", env={**env, "BUS_ARCHIVE_OBJECT_STORE": "0"},
                               cwd=tmp_path)
    assert "copy" not in msgspec.json.decode(local_only.stdout)[0]
    ok = await run_bus("archive", "verify", env=env, cwd=tmp_path)
    assert ok.code == 0 and "3 copies in CONTINUUM_ARCHIVE_DEFAULT read back whole" in ok.stdout, ok.stdout

    names = sorted(p.name for p in directory.glob("seg-*"))
    store = await bucket(bus)
    await store.delete(names[0])
    info = await store.info(names[2])
    assert info is not None
    await forge(bus, names[2], msgspec.structs.replace(info, digest=digest_of(hashlib.sha256(b"other").digest())))
    broken = await run_bus("archive", "verify", env=env, cwd=tmp_path)
    assert broken.code == 1
    lines = [line for line in broken.stdout.splitlines() if line.startswith("BROKEN COPY")]
    assert len(lines) == 2 and f"{names[0]}: missing" in lines[0] and f"{names[2]}: differs" in lines[1], broken.stdout
    repaired = await run_bus("archive", "run", "--segment-records", "700", env=env, cwd=tmp_path)
    assert repaired.code == 0 and repaired.stdout.count("copied seg-") == 2, repaired.stdout
    assert (await run_bus("archive", "verify", env=env, cwd=tmp_path)).code == 0

    original = {p.name: p.read_bytes() for p in directory.glob("seg-*")}
    events_before = len(await copied_events(bus))
    shutil.rmtree(directory)  # the machine's disk is lost
    restored = await run_bus("archive", "restore", env=env, cwd=tmp_path)
    assert restored.code == 0, restored.stderr
    assert "restored 3 segment(s)" in restored.stdout and "the chain verified" in restored.stdout
    assert {p.name: p.read_bytes() for p in directory.glob("seg-*")} == original
    after = await run_bus("archive", "run", "--segment-records", "700", env=env, cwd=tmp_path)
    assert after.code == 0 and "copied" not in after.stdout and "recorded the sealed event" not in after.stdout, after.stdout
    assert len(await copied_events(bus)) == events_before


async def test_views_rebuilt_from_a_restored_archive_equal_those_from_the_original(bus: Bus, tmp_path: Path) -> None:
    """Archive a log of every view's kinds with copies, lose the directory, restore it from the
    bucket elsewhere: a rebuild from the restored archive equals a rebuild from the original
    archive (and from the log), table by table."""
    await mixed_log(bus)
    settings = copying(tmp_path, segment_records=1_500)
    run = await run_archive(bus, settings)
    assert len(run.copied) >= 3
    last = (await bus.send("keeper", Note(text="the tail"))).ack.seq
    from_original, _, archived = await rebuilt_hashes(
        bus, ProjectionSettings(db_path=str(tmp_path / "original.duckdb"), archive_dir=str(settings.directory)), last,
    )
    elsewhere = dataclasses.replace(settings, directory=tmp_path / "restored")
    shutil.rmtree(settings.directory)
    restored = await restore_archive(bus, elsewhere, bus.subjects.stream)
    assert len(restored.written) == len(run.copied) and restored.segments[-1].meta.last_seq == run.last_seq
    assert (elsewhere.directory / EVENTS_FILE).exists()
    from_restored, _, archived_again = await rebuilt_hashes(
        bus, ProjectionSettings(db_path=str(tmp_path / "restored.duckdb"), archive_dir=str(elsewhere.directory)), last,
    )
    assert archived_again == archived == run.last_seq
    assert from_restored == from_original


async def test_a_hostile_object_in_the_bucket_stops_a_restore_with_one_line_and_loses_nothing(
    bus: Bus, tmp_path: Path
) -> None:
    """A copy whose bytes are not what its metadata says (a wrong digest, a truncated object) or
    garbage metadata: restore raises ArchiveCorrupt naming the segment, writes no file for it,
    and the bucket is unchanged (the good copies restore once the bad one is copied again)."""
    await publish_notes(bus, 3_000)
    settings = copying(tmp_path)
    await run_archive(bus, settings)
    names = [s.meta.name for s in verify_all(settings.directory, bus.subjects.stream)]
    store = await bucket(bus)
    good = await store.info(names[1])
    assert good is not None
    target = dataclasses.replace(settings, directory=tmp_path / "restored")
    for forged in (msgspec.structs.replace(good, digest=digest_of(hashlib.sha256(b"x").digest())),
                   msgspec.structs.replace(good, chunks=good.chunks + 2, size=good.size + 5)):
        await forge(bus, names[1], forged)
        with pytest.raises(ArchiveCorrupt) as caught:
            await restore_archive(bus, target, bus.subjects.stream)
        assert str(caught.value).startswith(f"{names[1]}: ") and "\n" not in str(caught.value)
        assert not (target.directory / names[1]).exists()
        assert not any(p.name.startswith(".tmp-") for p in target.directory.iterdir())
    await forge(bus, names[1], b"[1, 2")
    with pytest.raises(ArchiveCorrupt, match="damaged metadata"):
        await restore_archive(bus, target, bus.subjects.stream)
    await run_archive(bus, settings)  # the copier sees the damaged copy and copies it again
    restored = await restore_archive(bus, target, bus.subjects.stream)
    assert [s.meta.name for s in restored.segments] == names


async def test_the_bucket_is_replicated_like_the_log_and_a_copy_survives_a_node_stopped(
    nats_cluster: LocalCluster, cluster_access: ClusterAccess, tmp_path: Path,
) -> None:
    """On a three-node cluster the archive's bucket is made with the log's replicas (R1 here),
    moves with the log when `bus stream update --replicas 3` changes it (R3), and then, with one
    node stopped (the bucket's leader), every copy still reads back whole and a restore rebuilds
    the archive from the two nodes left."""
    from test_cluster_config import cluster_env

    config = BusConfig(url=nats_cluster.url, monitor_url=nats_cluster.monitor_url, credentials=cluster_access.admin,
                       tls=cluster_access.tls)
    settings = copying(tmp_path, segment_records=500)
    obj_stream = ""
    async with Bus(config) as bus:
        obj_stream = f"OBJ_{bus.subjects.archive_bucket}"
        await publish_notes(bus, 1_200)
        run = await run_archive(bus, settings)
        assert len(run.copied) == 2
        assert (await bus.js.stream_info(obj_stream)).config.num_replicas == 1
    updated = await run_bus("stream", "update", "--replicas", "3", env=cluster_env(tmp_path, nats_cluster, cluster_access),
                            cwd=tmp_path)
    assert updated.code == 0 and f"{obj_stream}: num_replicas 1 -> 3" in updated.stdout, updated.stdout + updated.stderr
    async with Bus(config) as bus:

        async def replicated() -> bool:
            info = await bus.js.stream_info(obj_stream)
            replicas = [r for r in (info.cluster.replicas or []) if r.current] if info.cluster else []
            return info.config.num_replicas == 3 and len(replicas) == 2 and info.cluster.leader is not None  # type: ignore[union-attr]

        await wait_for(replicated, timeout_s=60, interval_s=0.2, what="the bucket's three replicas current")
        leader = (await bus.js.stream_info(obj_stream)).cluster.leader  # type: ignore[union-attr]
    await nats_cluster.node_named(leader).stop()
    shutil.rmtree(settings.directory)
    async with Bus(config) as bus:
        restored = await asyncio.wait_for(restore_archive(bus, settings, bus.subjects.stream), 60)
        assert [s.meta.name for s in restored.segments] == run.copied
        states = await copy_states(bus, settings, restored.segments, whole=True)
        assert [s.state for s in states] == ["copied", "copied"]


@pytest.mark.parametrize("rounds", [
    pytest.param(6, id="ci"),
    pytest.param(30, id="soak", marks=[pytest.mark.soak, pytest.mark.timeout(900)]),
])
async def test_sigkill_while_copying_copies_nothing_twice_leaves_nothing_missing_and_trims_nothing_uncopied(
    rounds: int, bus: Bus, nats_server: EmbeddedServer, admin_credentials: str, cli_env: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    """`bus archive run --object-store` killed with SIGKILL at random points of its copying
    (after a random number of copies, plus a random delay: inside a put, between the put and its
    event, between the event and its note), `rounds` times: every copy noted reads back as its
    file; a trim after each kill purges nothing below a segment without a verified copy; the
    last run leaves every segment copied, each recorded by exactly one event."""
    env = {**admin_env(cli_env, nats_server, admin_credentials), "BUS_ARCHIVE_OBJECT_STORE": "1"}
    directory = Path(env["BUS_HOME"]) / "archive" / "default"
    settings = ArchiveSettings(directory=directory, object_store=True, segment_records=250)
    rng = random.Random(20)
    await publish_notes(bus, 2_000)
    store = await bucket(bus)
    obj_stream = f"OBJ_{bus.subjects.archive_bucket}"
    killed_running = pending_seen = 0
    for round_ in range(rounds):
        if round_ % 3 == 0:
            await publish_notes(bus, 1_000)  # more to seal and copy
        # The kill point: a random number of the bucket's writes into this run (a segment's copy
        # is a chunk and then its metadata), plus at times a random delay: inside a put, between
        # the put and its event, between the event and its note.
        start_seq = (await bus.js.stream_info(obj_stream)).state.last_seq
        target = start_seq + rng.randrange(1, 7)
        delay = rng.choice([0.0, 0.0, rng.uniform(0, 0.02)])

        async def reached() -> bool:
            return proc.returncode is not None or (await bus.js.stream_info(obj_stream)).state.last_seq >= target

        proc = await asyncio.create_subprocess_exec(
            *BUS, "archive", "run", "--segment-records", "250", env=env, cwd=tmp_path,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL,
        )
        try:
            await wait_for(reached, timeout_s=120, interval_s=0.001, what="the run to reach its kill point")
            await asyncio.sleep(delay)
        finally:
            if proc.returncode is None:
                killed_running += 1
                proc.kill()
            await proc.wait()
        segments = list(verify_all(directory, bus.subjects.stream))  # the local archive verifies
        notes = read_notes(directory)
        for name, note in notes.items():  # every noted copy is its file's bytes
            _, data = await store.read(name)
            assert hashlib.sha256(data).hexdigest() == note.sha256 == hashlib.sha256((directory / name).read_bytes()).hexdigest()
        pending_seen += sum(s.state == "pending" for s in await copy_states(bus, settings, segments, whole=False))
        trim = await run_trim(bus, settings, NOW)
        first, _ = await bus.log_bounds()
        copied_to = 0
        for segment in segments:
            if segment.meta.name not in notes:
                break
            copied_to = segment.meta.last_seq
        assert trim.plan.archive.last_seq <= copied_to and first <= copied_to + 1, (round_, first, copied_to)
    print(f"{rounds} rounds: {killed_running} killed while running, {pending_seen} copies left stored but "
          "not recorded")
    assert killed_running >= rounds // 2  # the kills landed inside runs, not after them
    done = await run_bus("archive", "run", "--segment-records", "250", env=env, cwd=tmp_path)
    assert done.code == 0, done.stderr
    names = await assert_copies_are_the_files(bus, directory)
    events = await copied_events(bus, directory)
    # One event per segment, naming the object still in the bucket: none was copied twice.
    assert len(events) == len({e["chain_sha256"] for e in events}) == len(names)
    orphans = await store.sweep(older_than_s=0)  # chunks of puts killed before their metadata
    chunks = (await bus.js.stream_info(obj_stream, subjects_filter=f"$O.{bus.subjects.archive_bucket}.C.>")).state
    assert len(chunks.subjects or {}) == len(names), "each segment's chunks under its object's nuid, nothing else"
    print(f"{len(orphans)} killed puts' chunks swept")
    await assert_nothing_lost(bus, directory)
