"""`bus ui` and the console `bus up` starts, as a user runs them: `bus up --detach` prints the
console's address and it serves; `bus down` stops it first; `bus ui` refuses to listen beyond
loopback and to be an operator console with an agent's credential, saying why."""

from __future__ import annotations

from pathlib import Path

import httpx2

from bus.cli.state import read_state
from bus.identity import CredentialRegistry, Role
from bus.server import free_port_outside_ephemeral_range
from test_cli import cli_env, detached_home, pid_gone, run_bus, server_env  # noqa: F401  (fixtures)


async def test_bus_up_starts_the_console_and_bus_down_stops_it(tmp_path: Path, cli_env, detached_home) -> None:
    """The summary names the console's address; it answers there, read-only, connected with the
    home's console credential; `bus down` says it stopped the console, and its process is gone."""
    env = {**cli_env, "BUS_URL": f"nats://127.0.0.1:{free_port_outside_ephemeral_range()}"}
    ui_port = free_port_outside_ephemeral_range()
    up = await run_bus("up", "--detach", "--monitor-port", str(free_port_outside_ephemeral_range()), "--ui-port", str(ui_port), env=env, cwd=tmp_path)
    assert up.code == 0, up.stderr
    assert f"console      http://127.0.0.1:{ui_port}/ (pid " in up.stdout and "read-only" in up.stdout
    state = read_state(detached_home)
    assert state is not None and state.console_pid is not None
    command = Path(f"/proc/{state.console_pid}/cmdline").read_bytes().split(b"\0")
    console_creds = CredentialRegistry(detached_home).console_credential
    assert command[command.index(b"--creds") + 1] == str(console_creds).encode() and b"--operator" not in command
    async with httpx2.AsyncClient(timeout=5) as client:
        info = (await client.get(f"http://127.0.0.1:{ui_port}/api/info")).json()
    assert info["operator"] is False and info["namespace"] == "default"
    down = await run_bus("down", env=env, cwd=tmp_path)
    assert down.code == 0 and f"stopped: console (pid {state.console_pid})" in down.stdout
    assert down.stdout.index("console") < down.stdout.index("projection service")
    assert pid_gone(state.console_pid)


async def test_bus_ui_refuses_what_it_must_not_do(tmp_path: Path, server_env, identity: CredentialRegistry) -> None:
    """Beyond loopback: refused (no login of its own). --operator with an agent's credential:
    refused, naming the admin credential; with the console's: refused too. No server: refused, saying how to start one."""
    remote = await run_bus("ui", "--host", "0.0.0.0", env=server_env, cwd=tmp_path)
    assert remote.code == 2 and "loopback only" in remote.stderr and "SSH tunnel" in remote.stderr
    agent = identity.issue("clerk", Role.AGENT, namespace="default").path
    operator = await run_bus("ui", "--operator", "--creds", str(agent), env=server_env, cwd=tmp_path)
    assert operator.code == 2 and "--operator needs the admin credential" in operator.stderr and "an agent's" in operator.stderr
    console = await run_bus("ui", "--operator", "--creds", str(identity.console_credential), env=server_env, cwd=tmp_path)
    assert console.code == 2 and "a console's" in console.stderr
    nowhere = await run_bus("ui", "--port", "0", env={**server_env, "BUS_URL": f"nats://127.0.0.1:{free_port_outside_ephemeral_range()}"}, cwd=tmp_path)
    assert nowhere.code == 2 and "no NATS server is running" in nowhere.stderr
