"""The supervisor's state file and log files under `--home`, read by `bus agent ps/stop/logs`.

    <home>/agents/<namespace>/<agent>/state.json      SupervisorStatus, replaced atomically
    <home>/agents/<namespace>/<agent>/supervisor.log  the supervisor's own log
    <home>/agents/<namespace>/<agent>/replica-<i>.log stdout and stderr of replica i, all restarts
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from schemas.payloads.agents import ReplicaState


class ReplicaStatus(msgspec.Struct, kw_only=True):
    """One replica as the supervisor sees it. Times are Unix seconds (0: never)."""

    replica: int
    state: ReplicaState = "starting"
    pid: int | None = None
    restarts: int = 0
    launched_at: float = 0.0
    ready_at: float = 0.0
    last_heartbeat: float = 0.0
    in_flight: int = 0
    handled: int = 0
    failed: int = 0
    # Launch to ready, as the supervisor measured it, for the latest launch.
    start_ms: float = 0.0
    last_exit: str = ""
    # host:port where the running process serves its Prometheus metrics ("" when unknown).
    metrics: str = ""


class SupervisorStatus(msgspec.Struct, kw_only=True):
    """Everything `bus agent ps` shows for one agent name."""

    agent: str
    namespace: str
    target: str
    tags: list[str]
    url: str
    supervisor_pid: int
    started_at: float
    # The supervisor process's start time (state.process_start), to tell a recycled pid.
    supervisor_start: int | None = None
    state: str = "running"  # running | stopping | stopped
    replicas: list[ReplicaStatus] = []


class AgentPaths:
    """Where one agent name's files live."""

    def __init__(self, home: Path, namespace: str, agent: str) -> None:
        self.dir = home / "agents" / namespace / agent
        self.state = self.dir / "state.json"
        self.supervisor_log = self.dir / "supervisor.log"

    def replica_log(self, replica: int) -> Path:
        return self.dir / f"replica-{replica}.log"

    def replica_logs(self) -> list[Path]:
        return sorted(self.dir.glob("replica-*.log"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))


def agents_root(home: Path, namespace: str) -> Path:
    return home / "agents" / namespace


def write_status(path: Path, status: SupervisorStatus) -> None:
    """Replace the state file atomically (blocking; call it in a thread)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(msgspec.json.encode(status))
    tmp.replace(path)


def read_status(path: Path) -> SupervisorStatus | None:
    """The recorded status, or None if missing or unreadable."""
    try:
        return msgspec.json.decode(path.read_bytes(), type=SupervisorStatus)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def process_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (Linux /proc), or None when unknown.
    Together with the pid it names one process: a recycled pid has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    # Field 3 (state) is fields[0]; field 22 (starttime) is fields[19].
    return int(fields[19]) if len(fields) > 19 else None


def pid_alive(pid: int | None, *, started: int | None = None) -> bool:
    """True if process `pid` exists and is not a zombie (and, with `started`, is the process
    that started then: a recycled pid does not count)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (not Linux): trust the pid
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return started is None or process_start(pid) == started
