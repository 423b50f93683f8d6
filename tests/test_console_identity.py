"""The console's own identity, against a real nats-server with authorization on: the console
credential `initialize` writes may query (everything, unscoped), follow the log, read dead
letters and consumer backlogs, and nothing else: a publish, a record, a dead-letter retry, a
stream change or an agent's consumer attempted with it is refused by the server
(PermissionDenied) and leaves the log as it was. The page's retry is refused on a read-only
console, refused by the server on a console that only claims to be an operator, and works with
the admin credential. `bus ui` picks the console credential unless told otherwise."""

from __future__ import annotations

import argparse
import asyncio
import os
import stat
from pathlib import Path

import httpx2
import pytest
import msgspec

from bus import Bus
from bus.cli.console_commands import console_credentials
from bus.cli.console_up import console_command
from bus.console.config import ConsoleConfig
from bus.console.feed import LiveFeed, TrafficFilter
from bus.console.health import consumer_backlogs
from bus.errors import PermissionDenied
from bus.identity import CredentialRegistry, Role
from bus.log_reader import LogReader
from bus.redrive import read_dead_letter, retry_dead_letter
from conftest import wait_for
from console_fixtures import console_served, projection_service
from schemas.payloads import Note
from test_console_api import ACTION, _dead_letter_in_view, refuse
from test_deadletter import fast
from test_identity import REFUSED_WITHIN_S, Secured, _refused, secured  # noqa: F401  (fixture)


def _service(secured: Secured) -> Bus:
    return Bus(secured.config("projections", secured.registry.credential_path(Role.SERVICE, "projections")))


def _console(secured: Secured) -> Bus:
    return Bus(secured.config("console", secured.registry.console_credential))


async def _dead_letter(secured: Secured, admin: Bus) -> int:
    """A dead letter of agent `clerk` (an identity the registry knows), in the views."""
    secured.registry.issue("clerk", Role.AGENT, namespace="default")
    await secured.reload()
    async with admin.consumer("clerk", refuse, settings=fast()):
        await admin.send("clerk", Note(text="form 7"))
        await wait_for(lambda: _dead_letter_in_view(admin), timeout_s=20, what="the dead letter in the view")
    return await _dead_letter_in_view(admin)


async def test_the_console_credential_is_private_and_rendered_read_only(secured: Secured) -> None:
    """`initialize` writes <home>/auth/creds/console.nk (0600) beside the service's; its auth.conf
    entry allows the unscoped query subject and no envelope subject."""
    path = secured.registry.console_credential
    assert path == secured.registry.dir / "creds" / "console.nk"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    identity = secured.registry.active("console", Role.CONSOLE)
    assert identity is not None
    conf = secured.registry.auth_config.read_text()
    entry = next(line for line in conf.splitlines() if identity.public_key in line)
    assert '"_continuum.default.query"' in entry and '"default.inbox.' not in entry and "$JS.ACK" not in entry


async def test_the_console_credential_reads_and_queries_but_every_write_is_refused(
    secured: Secured, tmp_path: Path
) -> None:
    """With the console credential: queries answer across agents, a LogReader follows new traffic,
    the dead letter and the consumers' backlogs are read. A send, a record, a dead-letter retry,
    a stream delete or purge, creating (so replacing) or deleting an agent's consumer: each
    refused at once by the server, and the log is unchanged."""
    async with Bus(secured.admin()) as admin, _service(secured) as service, projection_service(service, tmp_path):
        seq = await _dead_letter(secured, admin)
        async with _console(secured) as console:
            rows = (await console.query("SELECT count(*) AS n FROM dead_letters")).records()
            assert rows == [{"n": 1}]
            letter = await read_dead_letter(console, seq)
            assert letter.payload.agent == "clerk"
            assert any(b.agent == "clerk" for b in await consumer_backlogs(console))
            # Its live feed reads the newest envelopes by direct gets; it may make no consumer.
            await admin.send("alice", Note(text="followed"))
            feed = LiveFeed(ConsoleConfig())
            await feed.read_newest(console, most=10)
            assert any(i.to == "alice" for i in feed.recent(TrafficFilter(), 10))
            with pytest.raises(PermissionDenied):
                async with LogReader(console, name="console"):
                    pass
            before = await admin.log_bounds()
            stream = console.subjects.stream
            refusals = [
                console.send("alice", Note(text="from the console")),
                console.record("console", Note(text="a fact")),
                retry_dead_letter(console, letter, by="console"),
                console.transport.request(f"$JS.API.STREAM.DELETE.{stream}", b"{}", timeout_s=5),
                console.transport.request(f"$JS.API.STREAM.PURGE.{stream}", b"{}", timeout_s=5),
                console.transport.request(f"$JS.API.CONSUMER.DELETE.{stream}.clerk__inbox", b"", timeout_s=5),
                console.transport.request(
                    f"$JS.API.CONSUMER.CREATE.{stream}.clerk__inbox",
                    msgspec.json.encode({"stream_name": stream, "config": {
                        "name": "clerk__inbox", "durable_name": "clerk__inbox", "ack_policy": "explicit"}}),
                    timeout_s=5,
                ),
            ]
            for call in refusals:
                error, took = await _refused(call)
                assert "refused" in str(error) or "permission" in str(error).lower(), error
                assert took < REFUSED_WITHIN_S
            assert await admin.log_bounds() == before


async def test_the_pages_retry_needs_an_operator_console_with_the_admin_credential(
    secured: Secured, tmp_path: Path
) -> None:
    """A read-only console (its own credential) shows the dead letter and refuses the retry (403,
    as before); one started as an operator with the console credential is refused by the server
    (403 naming the refusal, nothing stored); with the admin credential the retry is sent."""
    async with Bus(secured.admin()) as admin, _service(secured) as service, projection_service(service, tmp_path):
        seq = await _dead_letter(secured, admin)
        config = secured.config("console", secured.registry.console_credential)
        async with console_served(config) as base, httpx2.AsyncClient(base_url=base, timeout=10) as client:
            assert (await client.get(f"/api/dead_letters/{seq}")).status_code == 200
            assert (await client.get("/api/agents")).status_code == 200
            readonly = await client.post(f"/api/dead_letters/{seq}/retry", headers=ACTION)
            assert readonly.status_code == 403 and "read-only" in readonly.json()["error"]
        before = await admin.log_bounds()
        async with console_served(config, operator=True) as base, httpx2.AsyncClient(base_url=base, timeout=10) as client:
            claimed = await client.post(f"/api/dead_letters/{seq}/retry", headers=ACTION)
            assert claimed.status_code == 403, claimed.text
            assert await admin.log_bounds() == before
        async with console_served(secured.admin(), operator=True) as base, httpx2.AsyncClient(base_url=base, timeout=10) as client:
            sent = await client.post(f"/api/dead_letters/{seq}/retry", headers=ACTION)
            assert sent.status_code == 200, sent.text
            assert sent.json()["retry"]["to"] == "clerk"


def _ui_args(home: Path, **fields: object) -> argparse.Namespace:
    return argparse.Namespace(**{"home": home, "creds": None, "operator": False, **fields})


def test_bus_ui_and_bus_up_pick_the_console_credential_unless_told_otherwise(tmp_path: Path) -> None:
    """`bus ui`: the console credential; --operator: the admin's; --creds: that file; a home
    without authorization: none. `bus up`'s console: --creds console.nk, or with --ui-operator
    the admin's and --operator."""
    from bus.server import find_config

    home = tmp_path / "home"
    assert console_credentials(_ui_args(home)) is None
    registry = CredentialRegistry(home)
    registry.initialize(find_config(None), ("default",))
    assert console_credentials(_ui_args(home)) == registry.console_credential
    assert console_credentials(_ui_args(home, operator=True)) == registry.admin_credential
    other = registry.issue("clerk", Role.AGENT, namespace="default").path
    assert console_credentials(_ui_args(home, creds=other)) == other
    up = argparse.Namespace(no_ui=False, ui_port=None, namespace="default", no_auth=False)
    command, _ = console_command(up, "nats://127.0.0.1:4222", home)
    assert command[command.index("--creds") + 1] == str(registry.console_credential) and "--operator" not in command
    command, _ = console_command(argparse.Namespace(**{**vars(up), "ui_operator": True}), "nats://127.0.0.1:4222", home)
    assert command[command.index("--creds") + 1] == str(registry.admin_credential) and command[-1] == "--operator"
