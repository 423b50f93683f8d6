"""`bus forget agent`: crypto-shredding an agent's private records, on a real nats-server, real
DuckDB and Parquet files. After the forget the agent's private strings are nowhere in the stream
store, the key store, the archive, the archive's Object Store copy or the views file (bytes
searched), the log and archive still verify, and another agent's views are unchanged.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bus import Bus
from bus.errors import ConfigurationError
from bus.object_store import ObjectStore
from bus.privacy.forget import forget_agent
from bus.privacy.sealing import key_id
from bus.server import EmbeddedServer
from projections.archive.archiver import run_archive
from projections.archive.config import ArchiveSettings
from projections.archive.verify import verify_all
from projections.config import ProjectionSettings
from projections.service import ProjectionService
from schemas.payloads import Note, Sealed, TurnRecorded

from conftest import wait_for
from test_cli import cli_env, run_bus, server_env  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(180)


def _files_holding(directory: Path, needle: bytes) -> list[str]:
    return [str(p) for p in directory.rglob("*") if p.is_file() and needle in p.read_bytes()]


def _parquet_holding(directory: Path, needle: str) -> list[str]:
    """Archive files any of whose decoded values (every column, as text) contain `needle`."""
    found = []
    for path in directory.rglob("*.parquet"):
        table = pq.read_table(path)
        for column in table.columns:
            for value in column.to_pylist():
                if value is not None and needle in (value.decode(errors="replace") if isinstance(value, bytes) else str(value)):
                    found.append(f"{path.name}:{column}")
                    break
    return found


async def _rows(bus: Bus, sql: str, min_seq: int) -> list[tuple]:
    result = await bus.query(sql, min_seq=min_seq)
    return [tuple(row) for row in result.rows]


async def test_forget_erases_an_agents_private_records_everywhere_and_keeps_the_rest(
    bus: Bus, nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    """alice's recall turns (random, incompressible text) are sealed at write, opened into the
    views, archived; after `forget_agent` the key's bytes are gone from the key store, the turns
    from the views (and the views file, rewritten), no file holds the text, the archive verifies,
    bob's rows are unchanged and the forget is an event saying who, what and why."""
    secret_a = [f"alice-{secrets.token_hex(40)}" for _ in range(3)]
    secret_b = f"bob-{secrets.token_hex(40)}"
    plain_note = f"note-{secrets.token_hex(40)}"
    views = tmp_path / "views.duckdb"
    archive = tmp_path / "archive"
    settings = ProjectionSettings(db_path=str(views), archive_dir=str(archive))
    store_dir = Path(nats_server.settings.store_dir)

    async with ProjectionService(bus, settings) as service:
        for turn, text in enumerate(secret_a, start=1):
            await bus.record("alice", TurnRecorded(agent="alice", turn=turn, role="user", at=datetime.now(UTC), text=text))
        await bus.record("bob", TurnRecorded(agent="bob", turn=1, role="user", at=datetime.now(UTC), text=secret_b))
        last = (await bus.send("bob", Note(text=plain_note), sender="alice")).ack.seq
        alice_rows = await _rows(bus, "SELECT text FROM recall WHERE agent = 'alice' ORDER BY turn", last)
        assert [r[0] for r in alice_rows] == secret_a  # the service opened them
        bob_before = await _rows(bus, "SELECT agent, conversation, turn, role, text, seq FROM recall WHERE agent = 'bob'", last)
        assert [r for r in bob_before if secret_b in r]
        await run_archive(bus, ArchiveSettings(directory=archive, seal_partial=True, object_store=True))

        key = await bus.keys.load(key_id("alice"))
        assert key is not None
        key_b64 = __import__("base64").b64encode(key.key)
        assert _files_holding(store_dir, key_b64), "positive control: the key store holds the key"
        assert _files_holding(store_dir, plain_note.encode()), "positive control: a plain record is found"
        assert _files_holding(tmp_path, secret_a[0].encode()), "positive control: the views' files hold the opened text"

        with pytest.raises(ConfigurationError):
            await forget_agent(bus, "alice", why=" ", actor="tester")
        result = await forget_agent(bus, "alice", why="erasure request #7", actor="tester")
        assert result.kids == [key.kid] and result.key == key_id("alice")

        after = await _rows(bus, "SELECT count(*) FROM recall WHERE agent = 'alice'", result.seq)
        assert after == [(0,)]
        assert await _rows(bus, "SELECT agent, conversation, turn, role, text, seq FROM recall WHERE agent = 'bob'", result.seq) == bob_before
        stubs = await _rows(bus, "SELECT kind, payload->>'of' FROM events WHERE subject LIKE 'default.event.alice.memory%' "
                                 "ORDER BY seq", result.seq)
        assert stubs == [("sealed", "memory.turn.recorded")] * 3
        forgotten = await _rows(bus, "SELECT sender, payload->>'why', payload->>'subject' FROM events "
                                     "WHERE kind = 'privacy.forgotten'", result.seq)
        assert forgotten == [("tester", "erasure request #7", "alice")]
        # The key is gone for everyone, the records stay ciphertext (also to the admin).
        assert await bus.keys.load(key_id("alice")) is None
        stored = await bus.transport.direct_get(bus.subjects.stream, {"seq": result.seq - 5})
        assert stored is not None
        assert isinstance((await bus.open_record(stored.data)).payload, Sealed)
        await run_archive(bus, ArchiveSettings(directory=archive, seal_partial=True, object_store=True))
        # The service rewrites its file once every view folded the forget (no freed block keeps
        # the deleted rows): checked while it runs.
        await wait_for(lambda: service.runner is not None and service.runner.erased_seq >= result.seq,
                       timeout_s=60, what="the views file rewritten after the forget")
        for text in secret_a:
            assert not _files_holding(tmp_path, text.encode()), f"{text[:12]}... left in {_files_holding(tmp_path, text.encode())}"
        assert await _rows(bus, "SELECT agent, conversation, turn, role, text, seq FROM recall WHERE agent = 'bob'",
                           result.seq) == bob_before

    for text in secret_a:
        assert not _files_holding(store_dir, text.encode()), "the stream store never held the plaintext"
        assert not _parquet_holding(archive, text) and not _files_holding(archive, text.encode())
        assert not _files_holding(tmp_path, text.encode()), f"{text[:12]}... left in {_files_holding(tmp_path, text.encode())}"
    assert not _files_holding(store_dir, key_b64) and not _files_holding(store_dir, key.key), "the key was erased"
    assert list(verify_all(archive, bus.subjects.stream)), "the archive still verifies"
    # The Object Store copy: its stream's store files were searched above with the rest of the
    # store (a positive control shows they hold the segments' bytes), and every copy, read back
    # as Parquet, holds no forgotten text in any decoded column either.
    copies_dir = tmp_path / "copies"
    copies_dir.mkdir()
    store = await ObjectStore.open(bus.transport, bus.subjects.archive_bucket, like=bus.subjects.stream)
    segments = list(verify_all(archive, bus.subjects.stream))
    assert len(segments) == 2
    obj_files = [p for p in store_dir.rglob("*") if f"OBJ_{bus.subjects.archive_bucket}" in str(p) and p.is_file()]
    for segment in segments:
        _, data = await store.read(segment.meta.name)
        assert data == segment.path.read_bytes()
        (copies_dir / segment.meta.name).write_bytes(data)
        assert any(data[:4096] in p.read_bytes() for p in obj_files), "positive control: the bucket's files hold the copy"
    for text in secret_a:
        assert not _parquet_holding(copies_dir, text) and not _files_holding(store_dir, text.encode())
    # bob's text is still in the (rewritten) views, readable by a service opened on it again.
    async with ProjectionService(bus, settings):
        assert await _rows(bus, "SELECT agent, conversation, turn, role, text, seq FROM recall WHERE agent = 'bob'", result.seq) == bob_before
        assert await _rows(bus, "SELECT count(*) FROM recall WHERE agent = 'alice'", result.seq) == [(0,)]


async def test_views_rebuilt_after_a_forget_equal_the_live_ones(bus: Bus, tmp_path: Path) -> None:
    """Live views that folded alice's opened records and then her forget equal every view rebuilt
    from seq 1 afterwards (when her records can no longer be opened): the forget's fold leaves
    what a rebuild gives (content hash of every table of every view)."""
    settings = ProjectionSettings(db_path=str(tmp_path / "views.duckdb"))
    async with ProjectionService(bus, settings) as service:
        for turn in range(1, 4):
            await bus.record("alice", TurnRecorded(agent="alice", turn=turn, role="user", at=datetime.now(UTC),
                                                   text=f"alice {turn} {secrets.token_hex(8)}"))
            await bus.record("bob", TurnRecorded(agent="bob", turn=turn, role="assistant", at=datetime.now(UTC),
                                                 text=f"bob {turn}"))
        await bus.send("bob", Note(text="hello"), sender="alice")
        result = await forget_agent(bus, "alice", why="test", actor="tester")
        await bus.record("alice", TurnRecorded(agent="alice", turn=1, role="user", at=datetime.now(UTC), text="after"))
        last = (await bus.send("alice", Note(text="later"), sender="bob")).ack.seq
        await bus.query("SELECT 1", min_seq=last)
        await wait_for(lambda: service.runner is not None and service.runner.erased_seq >= result.seq,
                       timeout_s=60, what="the views file rewritten after the forget")
        assert await _rows(bus, "SELECT text FROM recall WHERE agent = 'alice'", last) == [("after",)]
        live = await service.content_hashes()
        await service.rebuild([], wait=True)
        rebuilt = await service.content_hashes()
    assert rebuilt == live


async def test_bus_forget_prints_one_line_and_refuses_without_a_reason(
    bus: Bus, server_env: dict[str, str], tmp_path: Path
) -> None:
    """`bus forget agent <name> --why ...` (admin) says what it erased and where it recorded it;
    without --why it exits 2 and erases nothing; run again it says the key was forgotten before."""
    await bus.record("alice", TurnRecorded(agent="alice", turn=1, role="user", at=datetime.now(UTC), text="x"))
    missing = await run_bus("forget", "agent", "alice", env=server_env, cwd=tmp_path)
    assert missing.code == 2 and "--why" in missing.stderr
    assert await bus.keys.load(key_id("alice")) is not None
    done = await run_bus("forget", "agent", "alice", "--why", "request 7", env=server_env, cwd=tmp_path)
    assert done.code == 0, done.stderr
    assert done.stdout.startswith("forgot agent alice: key agent.alice erased") and "recorded at seq" in done.stdout
    bus.keys.drop(key_id("alice"))
    assert await bus.keys.load(key_id("alice")) is None
    again = await run_bus("forget", "agent", "alice", "--why", "request 7", env=server_env, cwd=tmp_path)
    assert again.code == 0 and "none left (forgotten before)" in again.stdout
