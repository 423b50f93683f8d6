"""`bus up` with authorization on (the default) and `bus creds issue|list|revoke`, run for real:
the installed entry point against the server it starts, in a private BUS_HOME."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from bus import Bus, BusConfig
from bus.errors import PermissionDenied
from bus.server import free_port_outside_ephemeral_range
from schemas.payloads import Note
from test_cli import cli_env, detached_home, run_bus  # noqa: F401 - fixtures

import pytest


async def test_up_turns_authorization_on_and_creds_issue_list_revoke(tmp_path, cli_env, detached_home) -> None:
    port = free_port_outside_ephemeral_range()
    env = {**cli_env, "BUS_URL": f"nats://127.0.0.1:{port}"}
    up = await run_bus("up", "--detach", "--no-projections", env=env, cwd=tmp_path)
    assert up.code == 0, up.stderr
    admin = detached_home / "auth" / "creds" / "admin.nk"
    assert stat.S_IMODE(os.stat(admin).st_mode) == 0o600

    # The CLI uses the home's admin credential on its own; a client without one is refused.
    sent = await run_bus("send", "planner", '{"kind":"note","text":"hi"}', env=env, cwd=tmp_path)
    assert sent.code == 0, sent.stderr
    with pytest.raises(PermissionDenied):
        async with Bus(BusConfig(url=env["BUS_URL"], name="stranger", require_fsync=False)):
            pass

    issued = await run_bus("creds", "issue", "planner", "--tags", "research", env=env, cwd=tmp_path)
    assert issued.code == 0, issued.stderr
    path = detached_home / "auth" / "creds" / "agents" / "default" / "planner.nk"
    assert str(path) in issued.stdout and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    seed = path.read_text()
    assert "SU" in seed and seed.split()[-1] not in issued.stdout + issued.stderr  # never printed

    # With its own credential an agent sends as itself; as anyone else it gets one clear line.
    as_planner = {**env, "BUS_CREDS": str(path)}
    own = await run_bus("send", "writer", '{"kind":"note","text":"mine"}', "--from", "planner", env=as_planner, cwd=tmp_path)
    assert own.code == 0, own.stderr
    forged = await run_bus("send", "writer", '{"kind":"note","text":"forged"}', "--from", "reviewer",
                           env=as_planner, cwd=tmp_path, timeout_s=20)
    assert forged.code == 2
    lines = forged.stderr.strip().splitlines()
    assert len(lines) == 1 and "permission denied" in lines[0] and "default.inbox.writer.reviewer" in lines[0]
    assert str(path) in lines[0]

    listed = await run_bus("creds", "list", "--json", env=env, cwd=tmp_path)
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {(r["role"], r["name"]) for r in rows} >= {("admin", "admin"), ("service", "projections"), ("agent", "planner")}
    assert next(r for r in rows if r["name"] == "planner")["tags"] == ["research"]
    assert all(seed.split()[-1] not in line for line in listed.stdout.splitlines())

    revoked = await run_bus("creds", "revoke", "planner", env=env, cwd=tmp_path)
    assert revoked.code == 0, revoked.stderr
    assert not path.exists()
    kept = tmp_path / "kept.nk"
    kept.write_text(seed)
    with pytest.raises(PermissionDenied):
        async with Bus(BusConfig(url=env["BUS_URL"], name="planner", credentials=str(kept), require_fsync=False)):
            pass
    again = await run_bus("creds", "revoke", "planner", env=env, cwd=tmp_path)
    assert again.code == 2 and "no active credential" in again.stderr


async def test_up_no_auth_lets_anyone_connect_and_creds_says_where_they_live(tmp_path, cli_env, detached_home) -> None:
    port = free_port_outside_ephemeral_range()
    env = {**cli_env, "BUS_URL": f"nats://127.0.0.1:{port}"}
    up = await run_bus("up", "--detach", "--no-projections", "--no-auth", env=env, cwd=tmp_path)
    assert up.code == 0, up.stderr
    async with Bus(BusConfig(url=env["BUS_URL"], name="anyone", require_fsync=False)) as bus:
        await bus.send("someone", Note(text="open door"))
    listed = await run_bus("creds", "list", env=env, cwd=tmp_path)
    assert listed.code == 2 and "bus up" in listed.stderr and "--no-auth" in listed.stderr


async def test_up_tls_serves_a_certificate_only_its_ca_verifies(tmp_path, cli_env, detached_home) -> None:
    from bus.config import TlsSettings
    from bus.errors import ConfigurationError

    port = free_port_outside_ephemeral_range()
    env = {**cli_env, "BUS_URL": f"nats://127.0.0.1:{port}"}
    up = await run_bus("up", "--detach", "--no-projections", "--tls", env=env, cwd=tmp_path)
    assert up.code == 0, up.stderr
    ca = detached_home / "auth" / "tls" / "ca.pem"
    assert ca.is_file() and stat.S_IMODE(os.stat(detached_home / "auth" / "tls" / "server-key.pem").st_mode) == 0o600
    sent = await run_bus("send", "alice", '{"kind":"note","text":"over tls"}', env=env, cwd=tmp_path)
    assert sent.code == 0, sent.stderr  # the CLI verifies with the home's CA on its own

    admin = str(detached_home / "auth" / "creds" / "admin.nk")
    with pytest.raises(ConfigurationError, match="BUS_TLS_CA"):
        async with Bus(BusConfig(url=env["BUS_URL"], name="plain", credentials=admin, require_fsync=False)):
            pass
    verified = BusConfig(url=env["BUS_URL"], name="verified", credentials=admin, require_fsync=False,
                         tls=TlsSettings(ca_file=str(ca)))
    async with Bus(verified) as bus:
        assert await bus.last_seq() == 1
        await bus.send("alice", Note(text="verified"))


@pytest.mark.parametrize("extra", [(), ("--tls", "--no-auth"), ("--no-auth",)])
async def test_up_listening_beyond_loopback_needs_authorization_and_tls(tmp_path, cli_env, detached_home, extra) -> None:
    port = free_port_outside_ephemeral_range()
    result = await run_bus("up", "--detach", "--no-projections", "--port", str(port), "--listen", "0.0.0.0", *extra,
                           env=cli_env, cwd=tmp_path)
    assert result.code == 2
    assert "error:" in result.stderr and ("TLS" in result.stderr or "--tls" in result.stderr)
    assert not (detached_home / "server.json").exists()


async def test_a_cluster_loads_and_drops_credentials_on_every_node(tmp_path, cli_env, detached_home) -> None:
    """`bus up --cluster 3` with authorization: an issued credential works through every node
    (each reloaded its config), and once revoked, no node lets it in."""
    from bus.cli.state import read_state

    first_port = free_port_outside_ephemeral_range(3)  # the cluster takes it and the two after it
    up = await run_bus("up", "--detach", "--no-projections", "--cluster", "3", "--port", str(first_port),
                       env=cli_env, cwd=tmp_path, timeout_s=90)
    assert up.code == 0, up.stderr
    state = read_state(detached_home)
    assert state is not None and len(state.nodes) == 3
    env = {**cli_env, "BUS_URL": state.url}
    issued = await run_bus("creds", "issue", "planner", env=env, cwd=tmp_path)
    assert issued.code == 0, issued.stderr
    path = detached_home / "auth" / "creds" / "agents" / "default" / "planner.nk"
    kept = tmp_path / "kept.nk"
    kept.write_text(path.read_text())
    for node in state.nodes:  # each node on its own: the credential is known everywhere
        async with Bus(BusConfig(url=node.url, name="planner", credentials=str(kept), require_fsync=False)) as bus:
            await bus.send("writer", Note(text=f"via {node.name}"))
    revoked = await run_bus("creds", "revoke", "planner", env=env, cwd=tmp_path)
    assert revoked.code == 0 and "3 server(s) reloaded" in revoked.stdout, revoked.stdout + revoked.stderr
    for node in state.nodes:
        with pytest.raises(PermissionDenied):
            async with Bus(BusConfig(url=node.url, name="planner", credentials=str(kept), require_fsync=False)):
                pass
