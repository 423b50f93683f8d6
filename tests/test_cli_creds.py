"""`bus up` with authorization on (the default) and `bus creds issue|list|revoke`, run for real:
the installed entry point against the server it starts, in a private BUS_HOME."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from bus import Bus, BusConfig
from bus.errors import PermissionDenied
from bus.server import free_port
from schemas.payloads import Note
from test_cli import cli_env, detached_home, run_bus  # noqa: F401 - fixtures

import pytest


async def test_up_turns_authorization_on_and_creds_issue_list_revoke(tmp_path, cli_env, detached_home) -> None:
    port = free_port()
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
    port = free_port()
    env = {**cli_env, "BUS_URL": f"nats://127.0.0.1:{port}"}
    up = await run_bus("up", "--detach", "--no-projections", "--no-auth", env=env, cwd=tmp_path)
    assert up.code == 0, up.stderr
    async with Bus(BusConfig(url=env["BUS_URL"], name="anyone", require_fsync=False)) as bus:
        await bus.send("someone", Note(text="open door"))
    listed = await run_bus("creds", "list", env=env, cwd=tmp_path)
    assert listed.code == 2 and "bus up" in listed.stderr and "--no-auth" in listed.stderr
