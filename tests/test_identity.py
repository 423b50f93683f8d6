"""Who may do what: per-agent nkey credentials against a real nats-server with authorization on.

Each refusal is a typed PermissionDenied, comes long before any timeout, and leaves the log
unchanged; an envelope whose sender its subject does not carry is dead-lettered `forged_sender`;
a revoked credential is disconnected at once and cannot connect again.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from bus import Bus, BusConfig
from bus.agent_control import StopAnswer, StopRequest, listen_for_stop, request_stop
from bus.errors import BusUnavailable, PermissionDenied, RemoteError
from bus.identity import CredentialRegistry, Role
from bus.server import ANY_PORT, EmbeddedServer, ServerSettings, find_config, reload_config
from conftest import read_records, wait_for
from fixtures_agents.helpers import read_log
from schemas.payloads import AgentStopRequested, DeadLettered, Note

# Far below every timeout a refused call would otherwise wait out (publish acks 10 s, JetStream
# API calls 2 s per attempt); measured refusals take about a millisecond on one machine.
REFUSED_WITHIN_S = 1.0


class Secured:
    """A server with authorization on, the registry that configured it, and configs for its
    identities."""

    def __init__(self, server: EmbeddedServer, registry: CredentialRegistry) -> None:
        self.server = server
        self.registry = registry

    def config(self, name: str, credentials: Path | None) -> BusConfig:
        return BusConfig(
            url=self.server.url, monitor_url=self.server.settings.monitor_url, name=name,
            credentials=None if credentials is None else str(credentials),
        )

    def admin(self) -> BusConfig:
        return self.config("admin", self.registry.admin_credential)

    def agent(self, name: str, tags: tuple[str, ...] = ()) -> BusConfig:
        issued = self.registry.issue(name, Role.AGENT, namespace="default", tags=tags)
        return self.config(name, issued.path)

    async def reload(self) -> None:
        assert self.server.pid is not None
        await reload_config(self.server.pid, self.server.settings.monitor_url)


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Secured]:
    registry = CredentialRegistry(tmp_path / "home")
    registry.initialize(find_config(None), ("default",))
    server = EmbeddedServer(ServerSettings(
        store_dir=tmp_path / "nats", port=ANY_PORT, monitor_port=ANY_PORT, config_file=registry.server_config,
    ))
    await server.start()
    try:
        yield Secured(server, registry)
    finally:
        await server.stop()


async def _agent_bus(secured: Secured, name: str, tags: tuple[str, ...] = ()) -> Bus:
    """A connected Bus for agent `name` with its own credential (issued, loaded by the server,
    its consumers prepared by the admin). The caller closes it."""
    config = secured.agent(name, tags)
    await secured.reload()
    async with Bus(secured.admin()) as admin:
        await admin.prepare_agent(name, tags)
    bus = Bus(config)
    await bus.__aenter__()
    return bus


async def _refused(call: Any) -> tuple[PermissionDenied, float]:
    started = time.perf_counter()
    with pytest.raises(PermissionDenied) as caught:
        await call
    return caught.value, time.perf_counter() - started


async def test_without_a_credential_nobody_connects(secured: Secured) -> None:
    with pytest.raises(PermissionDenied):
        async with Bus(secured.config("anyone", None)):
            pass


async def test_credential_files_are_private_and_hold_no_secret_elsewhere(secured: Secured) -> None:
    issued = secured.registry.issue("bob", Role.AGENT, namespace="default")
    assert stat.S_IMODE(os.stat(issued.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(secured.registry.admin_credential).st_mode) == 0o600
    seed = secured.registry.load("bob", namespace="default").seed
    for public in (secured.registry.dir / "identities.json", secured.registry.auth_config):
        assert seed not in public.read_text()
    assert seed not in repr(secured.registry.load("bob", namespace="default"))


async def test_an_agent_with_its_own_credential_sends_and_handles_as_itself(secured: Secured) -> None:
    handled: list[str] = []
    alice = await _agent_bus(secured, "alice")
    bob = await _agent_bus(secured, "bob")
    try:
        async def on_message(envelope: Any, delivery: Any) -> None:
            handled.append(envelope.payload.text)

        async with alice.consumer("alice", on_message):
            await bob.send("alice", Note(text="hello from bob"))
            await wait_for(lambda: handled == ["hello from bob"], what="alice handling bob's note")
    finally:
        await bob.__aexit__(None, None, None)
        await alice.__aexit__(None, None, None)


async def test_a_forged_sender_on_another_agents_subject_is_refused_at_once(secured: Secured) -> None:
    bob = await _agent_bus(secured, "bob")
    try:
        before = await bob.last_seq()
        forged = bob.envelope(Note(text="I am carol"), to="alice", sender="carol")
        error, took = await _refused(bob.publish(forged))
        assert "default.inbox.alice.carol" in str(error) and "publish" in str(error)
        assert took < REFUSED_WITHIN_S
        # Refused again without waiting on the server, and the rest of the bus still works.
        _, again = await _refused(bob.send("alice", Note(text="again"), sender="carol"))
        assert again < REFUSED_WITHIN_S
        await bob.send("alice", Note(text="as myself"))
        assert await bob.last_seq() == before + 1
    finally:
        await bob.__aexit__(None, None, None)


async def test_recording_on_another_agents_event_subject_is_refused(secured: Secured) -> None:
    bob = await _agent_bus(secured, "bob")
    try:
        before = await bob.last_seq()
        error, took = await _refused(bob.record("researcher", Note(text="a fact the researcher never recorded")))
        assert "default.event.researcher." in str(error)
        assert took < REFUSED_WITHIN_S
        assert await bob.last_seq() == before
    finally:
        await bob.__aexit__(None, None, None)


async def test_stream_purge_delete_and_update_are_refused_to_an_agent(secured: Secured) -> None:
    bob = await _agent_bus(secured, "bob")
    try:
        await bob.send("bob", Note(text="keep me"))
        before = await bob.log_bounds()
        stream = bob.subjects.stream
        for api in (f"$JS.API.STREAM.PURGE.{stream}", f"$JS.API.STREAM.DELETE.{stream}",
                    f"$JS.API.STREAM.UPDATE.{stream}", f"$JS.API.STREAM.MSG.DELETE.{stream}"):
            error, took = await _refused(bob.transport.request(api, b"{}", timeout_s=5))
            assert api in str(error)
            assert took < REFUSED_WITHIN_S
    finally:
        await bob.__aexit__(None, None, None)
    async with Bus(secured.admin()) as admin:
        assert await admin.log_bounds() == before


async def test_another_agents_consumer_can_be_neither_pulled_nor_created(secured: Secured) -> None:
    alice = await _agent_bus(secured, "alice")
    await alice.__aexit__(None, None, None)
    bob = await _agent_bus(secured, "bob")
    try:
        stream = bob.subjects.stream
        pull = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.alice__inbox"
        error, took = await _refused(bob.transport.request(pull, b'{"batch":1,"expires":1000000000}', timeout_s=5))
        assert pull in str(error) and took < REFUSED_WITHIN_S
        _, took = await _refused(bob.prepare_agent("alice"))
        assert took < REFUSED_WITHIN_S
        # Its own inbox, with another filter (reading alice's inbox under its own name): refused.
        create = f"$JS.API.CONSUMER.CREATE.{stream}.bob__inbox.default.inbox.alice.*"
        body = msgspec.json.encode({"stream_name": stream, "config": {
            "name": "bob__inbox", "durable_name": "bob__inbox", "filter_subject": "default.inbox.alice.*",
            "ack_policy": "explicit",
        }})
        _, took = await _refused(bob.transport.request(create, body, timeout_s=5))
        assert took < REFUSED_WITHIN_S
        with pytest.raises(PermissionDenied):
            await bob.transport.subscribe("default.inbox.>", _ignore)
    finally:
        await bob.__aexit__(None, None, None)


async def _ignore(message: Any) -> None:
    return None


async def test_an_envelope_whose_sender_differs_from_its_subject_is_dead_lettered(secured: Secured) -> None:
    handled: list[Any] = []

    async def on_message(envelope: Any, delivery: Any) -> None:
        handled.append(envelope)

    alice = await _agent_bus(secured, "alice")
    try:
        async with Bus(secured.admin()) as admin, alice.consumer("alice", on_message):
            # The admin may publish anywhere: an envelope claiming "mallory" on bob's subject.
            lying = admin.envelope(Note(text="from mallory, honest"), to="alice", sender="mallory")
            sent = await admin.publish(lying, admin.subjects.inbox("alice", "bob"))
            honest = await admin.send("alice", Note(text="truly from bob"), sender="bob")
            await wait_for(lambda: len(handled) == 1, what="the honest envelope handled")

            async def dead_letter() -> DeadLettered | None:
                for record in await read_records(admin, await admin.last_seq()):
                    if not record.subject.startswith(b"default.dead."):
                        continue
                    payload = admin.codec.decode(record.data).payload
                    if isinstance(payload, DeadLettered) and payload.original_seq == sent.ack.seq:
                        return payload
                return None

            await wait_for(dead_letter, what="the forged envelope's dead letter")
            letter = await dead_letter()
            assert letter is not None and letter.reason == "forged_sender"
            assert "mallory" in (letter.error or "") and "bob" in (letter.error or "")
            assert [e.id for e in handled] == [honest.envelope.id]
    finally:
        await alice.__aexit__(None, None, None)


async def test_no_agent_can_answer_a_request_in_another_agents_place(secured: Secured) -> None:
    """alice asks bob. mallory, holding the request, cannot publish a reply as bob (refused at
    once); its reply in its own name reaches nobody; a reply on bob's subject whose envelope
    claims another sender (only the admin can publish one) fails the request as forged; bob's
    own reply is the answer."""
    alice = await _agent_bus(secured, "alice")
    mallory = await _agent_bus(secured, "mallory")
    bob = await _agent_bus(secured, "bob")
    try:
        async with Bus(secured.admin()) as admin:
            async def request_in_log(text: str) -> Any:
                for record in await read_records(admin, await admin.last_seq()):
                    if record.subject == b"default.inbox.bob.alice":
                        envelope = admin.codec.decode(record.data)
                        if envelope.payload.text == text:
                            return envelope
                return None

            asking = asyncio.create_task(alice.request("bob", Note(text="what is 2+2?"), timeout_s=15))
            await wait_for(lambda: request_in_log("what is 2+2?"), what="alice's request in the log")
            request = await request_in_log("what is 2+2?")
            error, took = await _refused(mallory.reply(request, Note(text="5"), sender="bob"))
            assert f"default.reply.alice.{request.id}.bob" in str(error) and took < REFUSED_WITHIN_S
            await mallory.reply(request, Note(text="5"), sender="mallory")  # allowed, and unheard
            await bob.reply(request, Note(text="4"))
            answer = await asking
            assert answer.sender == "bob" and answer.payload.text == "4"

            asking = asyncio.create_task(alice.request("bob", Note(text="and 3+3?"), timeout_s=15))
            await wait_for(lambda: request_in_log("and 3+3?"), what="alice's second request in the log")
            second = await request_in_log("and 3+3?")
            lying = admin.envelope(Note(text="6, says bob"), to="alice", sender="mallory",
                                   causation_id=second.id, correlation_id=second.correlation_id)
            await admin.publish(lying, admin.subjects.reply("alice", second.id, "bob"))
            with pytest.raises(RemoteError) as caught:
                await asking
            assert caught.value.error_type == "forged_sender" and "mallory" in str(caught.value)
    finally:
        for agent in (bob, mallory, alice):
            await agent.__aexit__(None, None, None)


async def test_a_revoked_credential_is_disconnected_and_cannot_connect_again(secured: Secured) -> None:
    bob = await _agent_bus(secured, "bob")
    kept = secured.registry.dir.parent / "kept-copy.nk"
    kept.write_text(secured.registry.credential_path(Role.AGENT, "bob", "default").read_text())
    try:
        await bob.send("bob", Note(text="before"))
        secured.registry.revoke("bob", namespace="default")
        await secured.reload()
        with pytest.raises((BusUnavailable, PermissionDenied)):
            async with asyncio.timeout(15):
                while True:  # the server closed it; reconnects are refused
                    await bob.send("bob", Note(text="after"))
                    await asyncio.sleep(0.05)
    finally:
        await bob.__aexit__(None, None, None)
    assert not secured.registry.credential_path(Role.AGENT, "bob", "default").exists()
    # A copy of the seed kept elsewhere no longer works.
    with pytest.raises(PermissionDenied):
        async with Bus(secured.config("bob", kept)):
            pass


async def test_refusals_one_after_another_neither_wait_nor_break_the_connection(secured: Secured) -> None:
    """Ten refused publishes to ten subjects, then ten refused subscriptions, take well under the
    one second a single refused publish used to hold the publisher for (its ack never comes);
    afterwards the same connections publish and subscribe as before."""
    bob = await _agent_bus(secured, "bob")
    try:
        started = time.perf_counter()
        for i in range(10):
            with pytest.raises(PermissionDenied):
                await bob.send("alice", Note(text="forged"), sender=f"carol{i}")
        for i in range(10):
            with pytest.raises(PermissionDenied):
                await bob.transport.subscribe(f"default.inbox.someone{i}.*", _ignore)
        assert time.perf_counter() - started < REFUSED_WITHIN_S
        sent = await bob.send("alice", Note(text="as myself"))
        assert sent.ack.seq > 0
        sub = await bob.transport.subscribe("default.reply.bob.>", _ignore)
        await sub.close()
    finally:
        await bob.__aexit__(None, None, None)


async def test_only_an_operator_stops_an_agent_through_the_bus_and_only_its_own_supervisor_hears_it(
    secured: Secured,
) -> None:
    """An agent's credential may listen on its own control subject and answer there (its
    supervisor does), not on another's; the admin's stop request is recorded and answered; an
    agent asking to stop another is refused, typed and fast, and nothing is recorded."""
    writer = await _agent_bus(secured, "writer")
    reviewer = await _agent_bus(secured, "reviewer")
    heard: list[StopRequest] = []

    async def on_stop(request: StopRequest) -> StopAnswer:
        heard.append(request)
        return StopAnswer(agent="writer", stopping=True, pid=os.getpid(), replicas=1, event_id=request.event_id)

    try:
        async with Bus(secured.admin()) as admin, listen_for_stop(writer, "writer", on_stop):
            with pytest.raises(PermissionDenied):
                async with listen_for_stop(reviewer, "writer", on_stop):
                    pass
            answer = await request_stop(admin, "writer", by="ops", reason="maintenance")
            assert answer.stopping and answer.pid == os.getpid() and [r.by for r in heard] == ["ops"]
            [(_, recorded)] = await read_log(admin, "default.event.writer.agent.stop.requested")
            assert recorded.payload == AgentStopRequested(agent="writer", by="ops", reason="maintenance")
            assert recorded.id == answer.event_id == heard[0].event_id and recorded.sender == "ops"

            before = await admin.last_seq()
            started = time.monotonic()
            with pytest.raises(PermissionDenied):
                await request_stop(reviewer, "writer", by="reviewer")
            assert time.monotonic() - started < REFUSED_WITHIN_S
            assert await admin.last_seq() == before and len(heard) == 1
    finally:
        await writer.__aexit__(None, None, None)
        await reviewer.__aexit__(None, None, None)


async def test_connections_made_while_the_server_reloads_its_authorization_are_not_refused(secured: Secured) -> None:
    """nats-server refuses or drops a few percent of the connections that arrive while it
    reloads its authorization (as it does after every credential issued or revoked): the bus's
    connections (the control one and a raw one) try such a handshake again, so none of 60 made
    during back-to-back reloads fails."""
    stop = asyncio.Event()

    async def reload_again_and_again() -> None:
        issued = 0
        while not stop.is_set():
            secured.registry.issue(f"churn{issued}", Role.AGENT, namespace="default")
            issued += 1
            await secured.reload()

    failures: list[str] = []
    async with asyncio.TaskGroup() as tasks:
        reloading = tasks.create_task(reload_again_and_again())
        try:
            for attempt in range(60):
                try:
                    async with Bus(secured.admin()) as admin:
                        conn = admin.transport.wire(f"probe{attempt}")
                        try:
                            await conn.connect()
                        finally:
                            await conn.close(timeout_s=0.5)
                except (PermissionDenied, BusUnavailable) as exc:
                    failures.append(repr(exc))
        finally:
            stop.set()
        await reloading
    assert failures == []
