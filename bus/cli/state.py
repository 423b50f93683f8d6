"""The embedded server's state file (`<home>/server.json`), written by `bus up`, read by others."""

from __future__ import annotations

from pathlib import Path

import msgspec


class ServerState(msgspec.Struct, frozen=True, kw_only=True):
    pid: int
    url: str
    monitor_url: str | None
    store_dir: str
    # Pid of the projection service started alongside the server, if any.
    projections_pid: int | None = None
    # Pid of a foreground `bus up` that owns both children: `bus down` asks it to stop them.
    supervisor_pid: int | None = None


def state_path(home: Path) -> Path:
    return home / "server.json"


def read_state(home: Path) -> ServerState | None:
    """The recorded state, or None if there is none or it is unreadable."""
    path = state_path(home)
    try:
        return msgspec.json.decode(path.read_bytes(), type=ServerState)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def write_state(home: Path, state: ServerState) -> None:
    home.mkdir(parents=True, exist_ok=True)
    tmp = state_path(home).with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.encode(state))
    tmp.replace(state_path(home))


def clear_state(home: Path) -> None:
    state_path(home).unlink(missing_ok=True)
