"""Private records sealed under their agent's key (bus.privacy), against a real nats-server with
authorization on: the owning agent's runtime and the admin open them, another agent reading the
same record by sequence gets ciphertext it cannot open, and cannot fetch the key.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agents.errors import UnreadableRecord
from agents.runtime.journal import StepJournal
from bus import Bus, BusConfig
from bus.errors import PermissionDenied
from bus.identity import CredentialRegistry, Role
from bus.privacy.forget import forget_agent
from bus.privacy.sealing import key_id
from bus.server import EmbeddedServer, reload_config
from schemas import Delivery
from schemas.payloads import Note, Sealed, TurnRecorded


def _agent_config(nats_server: EmbeddedServer, identity: CredentialRegistry, name: str) -> BusConfig:
    issued = identity.issue(name, Role.AGENT, namespace="default")
    return BusConfig(url=nats_server.url, monitor_url=nats_server.settings.monitor_url, name=name,
                     credentials=str(issued.path))


@pytest.fixture
async def agents(nats_server: EmbeddedServer, identity: CredentialRegistry, bus: Bus) -> AsyncIterator[tuple[Bus, Bus]]:
    """alice and bob, each connected with its own credential (loaded by the server)."""
    configs = [_agent_config(nats_server, identity, name) for name in ("alice", "bob")]
    assert nats_server.pid is not None
    await reload_config(nats_server.pid, nats_server.settings.monitor_url)
    async with Bus(configs[0]) as alice, Bus(configs[1]) as bob:
        yield alice, bob


def _turn(agent: str, text: str) -> TurnRecorded:
    return TurnRecorded(agent=agent, turn=1, role="user", at=datetime.now(UTC), text=text)


async def test_a_private_record_is_stored_sealed_and_its_owner_opens_it(agents: tuple[Bus, Bus], bus: Bus) -> None:
    """alice's recall turn is stored as ciphertext (the secret is not in the stored bytes), its
    envelope readable; alice's own Bus decodes it as the turn; the admin opens it too."""
    alice, _ = agents
    secret = f"alice private {secrets.token_hex(16)}"
    sent = await alice.record("alice", _turn("alice", secret))
    stored = await alice.transport.direct_get(alice.subjects.stream, {"seq": sent.ack.seq})
    assert stored is not None
    assert secret.encode() not in stored.data
    assert stored.subject == "default.event.alice.memory.turn.recorded"
    mine = alice.codec.decode(stored.data)
    assert isinstance(mine.payload, TurnRecorded) and mine.payload.text == secret
    assert mine.id == sent.envelope.id and mine.sender == "alice"
    admins = await bus.open_record(stored.data)
    assert isinstance(admins.payload, TurnRecorded) and admins.payload.text == secret


async def test_another_agent_reading_by_sequence_gets_ciphertext_and_no_key(agents: tuple[Bus, Bus]) -> None:
    """bob may read alice's record by sequence (the server cannot narrow that grant) but gets a
    `sealed` payload; the key is refused to him (PermissionDenied), by key and by sequence."""
    alice, bob = agents
    secret = f"alice private {secrets.token_hex(16)}"
    sent = await alice.record("alice", _turn("alice", secret))
    stored = await bob.transport.direct_get(bob.subjects.stream, {"seq": sent.ack.seq})
    assert stored is not None and secret.encode() not in stored.data
    seen = await bob.open_record(stored.data)
    assert isinstance(seen.payload, Sealed)
    assert seen.payload.of == "memory.turn.recorded" and seen.payload.key == key_id("alice")
    with pytest.raises(PermissionDenied):
        await bob.keys.load(key_id("alice"))
    with pytest.raises(PermissionDenied):
        await bob.transport.direct_get(bob.subjects.keys_stream, {"seq": 1})
    with pytest.raises(PermissionDenied):
        await bob.transport.direct_get(bob.subjects.keys_stream, {"last_by_subj": bob.subjects.key_subject("agent.alice")})
    # bob's own key is his to make and read.
    assert (await bob.keys.for_writing(key_id("bob"))).kid == (await bob.keys.load(key_id("bob"))).kid


async def test_messages_between_agents_are_not_sealed(agents: tuple[Bus, Bus]) -> None:
    """Only private kinds are sealed: a note to another agent is stored as sent."""
    alice, bob = agents
    sent = await alice.send("bob", Note(text="plain between us"))
    stored = await bob.transport.direct_get(bob.subjects.stream, {"seq": sent.ack.seq})
    assert stored is not None and b"plain between us" in stored.data


def _delivery(attempt: int) -> Delivery:
    return Delivery(stream="CONTINUUM_DEFAULT", consumer="alice__inbox", subject="default.inbox.alice.bob",
                    stream_seq=1, consumer_seq=1, attempt=attempt, pending=0, published_at=datetime.now(UTC))


async def test_an_agents_runtime_reads_its_own_steps_and_refuses_forgotten_ones(
    nats_server: EmbeddedServer, identity: CredentialRegistry, bus: Bus
) -> None:
    """A step recorded by alice with her own credential is stored sealed and read back on a
    redelivery by a new process of hers (her Bus loads her key at start); she may not erase her
    key; after the admin forgets her, the redelivery's journal raises UnreadableRecord instead of
    running the step again."""
    config = _agent_config(nats_server, identity, "alice")
    assert nats_server.pid is not None
    await reload_config(nats_server.pid, nats_server.settings.monitor_url)
    secret = f"tool output {secrets.token_hex(16)}"
    inbound = bus.envelope(Note(text="do it"), to="alice", sender="bob")
    async with Bus(config) as alice:
        recorded = await StepJournal(alice, "alice", inbound, _delivery(1)).record(0, "tool", f'"{secret}"'.encode(), 1.0)
        assert bytes(recorded.result) == f'"{secret}"'.encode()
        with pytest.raises(PermissionDenied):
            await alice.keys.erase(key_id("alice"))
    last = await bus.last_seq()
    stored = await bus.transport.direct_get(bus.subjects.stream, {"seq": last})
    assert stored is not None and stored.subject.startswith("default.event.alice.step.") and secret.encode() not in stored.data
    async with Bus(config) as alice_again:
        again = await StepJournal(alice_again, "alice", inbound, _delivery(2)).recorded(0)
        assert again is not None and bytes(again.result) == f'"{secret}"'.encode()
    await forget_agent(bus, "alice", why="test", actor="tester")
    async with Bus(config) as alice_after:
        with pytest.raises(UnreadableRecord, match="forgotten"):
            await StepJournal(alice_after, "alice", inbound, _delivery(2)).recorded(0)


async def test_the_console_reads_every_key_but_makes_and_erases_none(
    nats_server: EmbeddedServer, identity: CredentialRegistry, bus: Bus
) -> None:
    """The console (read-only, shows every agent as the admin does, replays their handlings)
    opens an agent's private record; it may not make a key, erase one, or read the key store by
    sequence."""
    secret = f"alice private {secrets.token_hex(16)}"
    sent = await bus.record("alice", _turn("alice", secret))
    config = BusConfig(url=nats_server.url, monitor_url=nats_server.settings.monitor_url, name="console",
                       credentials=str(identity.console_credential))
    async with Bus(config) as console:
        stored = await console.transport.direct_get(console.subjects.stream, {"seq": sent.ack.seq})
        assert stored is not None
        opened = await console.open_record(stored.data)
        assert isinstance(opened.payload, TurnRecorded) and opened.payload.text == secret
        with pytest.raises(PermissionDenied):
            await console.keys.for_writing(key_id("carol"))
        with pytest.raises(PermissionDenied):
            await console.keys.erase(key_id("alice"))
        with pytest.raises(PermissionDenied):
            await console.transport.direct_get(console.subjects.keys_stream, {"seq": 1})
