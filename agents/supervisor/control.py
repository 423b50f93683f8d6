"""Control of detached supervisors, for `bus agent start/ps/stop/logs`.

One supervisor process per agent name (and namespace), started detached in its own session by
`start_detached`. It is found again through its state file under `--home` (see state.py), which
holds its pid. Control is by signal: SIGTERM asks it to stop its replicas gracefully and exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import msgspec

from agents.errors import AlreadyRunning, NotRunning, SupervisorError
from agents.supervisor.state import AgentPaths, SupervisorStatus, agents_root, pid_alive, read_status
from agents.supervisor.supervisor import AgentSpec, SupervisorSettings

SUPERVISOR_MODULE = "agents.supervisor.main"
_POLL_S = 0.05


class SupervisorLaunch(msgspec.Struct, frozen=True, kw_only=True):
    """What a detached supervisor process is started with (JSON, first argument)."""

    spec: AgentSpec
    settings: SupervisorSettings


def paths_for(home: Path, namespace: str, agent: str) -> AgentPaths:
    return AgentPaths(home.resolve(), namespace, agent)


def is_running(status: SupervisorStatus | None) -> bool:
    """True if the supervisor that wrote `status` is alive."""
    return status is not None and pid_alive(status.supervisor_pid, started=status.supervisor_start)


async def start_detached(launch: SupervisorLaunch, *, wait_s: float = 30.0) -> SupervisorStatus:
    """Start a supervisor in its own session and wait until every replica is ready.

    Raises AlreadyRunning, or SupervisorError when the supervisor exits, a replica keeps
    crashing, or `wait_s` passes (the message quotes the end of the relevant log).
    """
    if launch.settings.home is None:
        raise SupervisorError("a detached supervisor needs settings.home for its state file")
    paths = paths_for(Path(launch.settings.home), launch.spec.bus.namespace, launch.spec.name)
    if is_running(existing := read_status(paths.state)):
        assert existing is not None
        raise AlreadyRunning(
            f"agent {launch.spec.name!r} is already running (supervisor pid {existing.supervisor_pid}); "
            f"stop it first with `bus agent stop {launch.spec.name}`"
        )
    paths.dir.mkdir(parents=True, exist_ok=True)
    paths.state.unlink(missing_ok=True)
    with open(paths.supervisor_log, "ab") as log:
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", SUPERVISOR_MODULE, msgspec.json.encode(launch).decode()],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True, cwd=launch.spec.workdir,
        )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        status = read_status(paths.state)
        if status is not None and status.supervisor_pid == proc.pid:
            if status.replicas and all(r.state == "running" for r in status.replicas):
                return status
            broken = [r for r in status.replicas if r.state == "circuit_open"]
            if broken:
                # Nothing useful is left running: stop the supervisor, so a fixed agent can be
                # started again at once.
                await stop_supervisor(paths, wait_s=launch.settings.stop_grace_s + 5.0)
                raise SupervisorError(
                    f"agent {launch.spec.name!r} replica {broken[0].replica} keeps crashing "
                    f"({broken[0].last_exit}), so it was stopped; its log ends with:\n"
                    f"{tail(paths.replica_log(broken[0].replica), 15)}"
                )
        code = proc.poll()
        if code is not None:
            raise SupervisorError(
                f"the supervisor of {launch.spec.name!r} exited with code {code}; its log ends with:\n"
                f"{tail(paths.supervisor_log, 15)}"
            )
        if loop.time() > deadline:
            raise SupervisorError(
                f"agent {launch.spec.name!r} is not ready after {wait_s}s (the supervisor keeps trying); "
                f"see `bus agent ps` and `bus agent logs {launch.spec.name}`"
            )
        await asyncio.sleep(_POLL_S)


async def stop_supervisor(paths: AgentPaths, *, wait_s: float = 30.0) -> SupervisorStatus:
    """Ask the supervisor to stop its replicas gracefully (SIGTERM) and wait until it exits;
    after `wait_s`, SIGKILL its whole process group. Returns its last status.

    Raises NotRunning when no supervisor is running for that agent.
    """
    status = read_status(paths.state)
    if status is None or not is_running(status):
        raise NotRunning(f"agent {paths.dir.name!r} is not running (no live supervisor in {paths.dir})")
    pid = status.supervisor_pid
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while pid_alive(pid, started=status.supervisor_start):
        if loop.time() > deadline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            break
        await asyncio.sleep(_POLL_S)
    return read_status(paths.state) or status


def list_statuses(home: Path, namespace: str) -> list[tuple[SupervisorStatus, bool]]:
    """Every agent with a state file under `home`, with whether its supervisor is alive."""
    root = agents_root(home.resolve(), namespace)
    out = []
    for state_file in sorted(root.glob("*/state.json")):
        status = read_status(state_file)
        if status is not None:
            out.append((status, is_running(status)))
    return out


def tail(path: Path, lines: int) -> str:
    """The last `lines` lines of a text file ("" if it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])
