"""Publishing into the log: durability receipt, dedup, optimistic concurrency, fsync check, the
server's message size limit."""

from __future__ import annotations

import pytest

from bus import Bus, BusConfig, ConcurrencyConflict, ConfigurationError
from schemas import decode_loose, new_id
from schemas.payloads import Note


async def test_send_is_stored_with_its_sequence(bus: Bus) -> None:
    """A sent envelope is in the stream at the sequence its ack reports, on the inbox subject."""
    sent = await bus.send("alice", Note(text="hello"))
    msg = await bus.js.get_msg(bus.subjects.stream, seq=sent.ack.seq)
    assert msg.subject == "default.inbox.alice.tester"
    assert decode_loose(msg.data).id == sent.envelope.id
    assert msg.headers["Nats-Msg-Id"] == sent.envelope.id


async def test_resent_envelope_is_stored_once(bus: Bus) -> None:
    """Publishing the same envelope twice stores it once; the second ack is a duplicate of the first."""
    envelope = bus.envelope(Note(text="once"), to="alice")
    first = await bus.publish(envelope)
    second = await bus.publish(envelope)
    assert second.ack.duplicate and second.ack.seq == first.ack.seq
    assert await bus.last_seq() == first.ack.seq


async def test_fenced_record_rejects_a_stale_writer(bus: Bus) -> None:
    """record(expected_seq=...) appends only on the expected last sequence; a stale one conflicts."""
    first = await bus.record("alice", Note(text="v1"), expected_seq=0)
    await bus.record("alice", Note(text="v2"), expected_seq=first.ack.seq)
    with pytest.raises(ConcurrencyConflict) as info:
        await bus.record("alice", Note(text="stale"), expected_seq=first.ack.seq, id=new_id())
    assert info.value.actual == first.ack.seq + 1


async def test_bus_refuses_a_server_that_does_not_fsync(tmp_path, nats_server) -> None:
    """With a monitor URL, the bus reads /varz and refuses a server without sync_interval: always."""
    from bus.server import ANY_PORT, EmbeddedServer, ServerSettings

    lazy_conf = tmp_path / "lazy.conf"
    lazy_conf.write_text("jetstream {}\n")
    settings = ServerSettings(
        store_dir=tmp_path / "lazy", port=ANY_PORT, monitor_port=ANY_PORT, config_file=lazy_conf
    )
    async with EmbeddedServer(settings) as lazy:
        config = BusConfig(url=lazy.url, monitor_url=lazy.settings.monitor_url)
        with pytest.raises(ConfigurationError, match="sync_interval: always"):
            async with Bus(config):
                pass
        async with Bus(BusConfig(url=lazy.url, monitor_url=lazy.settings.monitor_url, require_fsync=False)):
            pass


async def test_bus_without_a_server_fails_fast_with_a_hint(unused_tcp_port: int) -> None:
    """Entering a Bus with no server listening raises BusUnavailable naming `bus up`, not a hang."""
    from bus import BusUnavailable

    with pytest.raises(BusUnavailable, match="bus up"):
        async with Bus(BusConfig(url=f"nats://127.0.0.1:{unused_tcp_port}", connect_timeout_s=0.5)):
            pass


async def test_max_payload_is_the_servers_own_limit(tmp_path) -> None:
    """The bus takes the message size limit from what the server announces (here 64 KiB, not
    nats.conf's 8 MB nor the 1 MiB default): a publish over it is refused with ConfigurationError
    naming the limit, nothing is stored, and one under it is stored."""
    from bus.server import ANY_PORT, EmbeddedServer, ServerSettings

    small_conf = tmp_path / "small.conf"
    small_conf.write_text("max_payload: 65536\njetstream { sync_interval: always }\n")
    settings = ServerSettings(store_dir=tmp_path / "small", port=ANY_PORT, monitor_port=None, config_file=small_conf)
    async with EmbeddedServer(settings) as server:
        async with Bus(BusConfig(url=server.url, name="tester")) as bus:
            assert bus.max_payload == 65536
            with pytest.raises(ConfigurationError, match="max_payload of 65536"):
                await bus.send("alice", Note(text="x" * 65536))
            assert await bus.last_seq() == 0
            sent = await bus.send("alice", Note(text="x" * 60_000))
            assert sent.ack.seq == 1
