"""Launch one replica process with a status pipe, and read what it reports.

The replica runs `python -m agents.runtime.process '<ProcessSpec JSON>'` with the write end of a
pipe in CONTINUUM_STATUS_FD; the supervisor keeps the read end. The replica's stdout and stderr
go to its log file (appended across restarts), or to the supervisor's stderr without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path

import msgspec

from agents.runtime.process import STATUS_FD_ENV, ProcessSpec


class StatusLine(msgspec.Struct, kw_only=True):
    """One line a replica writes on its status pipe."""

    type: str  # ready | beat
    pid: int = 0
    start_ms: float = 0.0
    state: str = "running"
    # Also on beats, so a dropped `ready` line is made up for by the next beat.
    ready: bool = False
    in_flight: int = 0
    handled: int = 0
    failed: int = 0
    # host:port of the replica's metrics endpoint ("" from a replica that serves none).
    metrics: str = ""


_status_decoder = msgspec.json.Decoder(StatusLine)


class LaunchedReplica:
    """A running replica process and the read end of its status pipe."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        transport: asyncio.BaseTransport,
        started: float,
    ) -> None:
        self.proc = proc
        self.reader = reader
        self._transport = transport
        # Monotonic time just before the launch: start times are measured from here.
        self.started = started

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def next_status(self, timeout_s: float) -> StatusLine | None:
        """The next status line; None at end of file (the process closed the pipe: it exited).

        Raises TimeoutError when nothing arrives within `timeout_s`. Unreadable lines are
        skipped: a replica never takes its supervisor down.
        """
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout_s)
            if not line:
                return None
            with contextlib.suppress(msgspec.DecodeError):
                return _status_decoder.decode(line)

    def close(self) -> None:
        self._transport.close()


async def launch(spec: ProcessSpec, *, log_path: Path | None) -> LaunchedReplica:
    """Start a replica process. Raises OSError when it cannot be started."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    read_fd, write_fd = os.pipe()
    env = dict(os.environ)
    env[STATUS_FD_ENV] = str(write_fd)
    log_file = None
    try:
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_file = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agents.runtime.process", msgspec.json.encode(spec).decode(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            pass_fds=(write_fd,),
            env=env,
            cwd=spec.workdir,
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        # The child holds its own copy; ours must go, or the pipe never reaches end of file.
        os.close(write_fd)
        if log_file is not None:
            log_file.close()
    reader = asyncio.StreamReader(limit=1 << 16)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
    )
    return LaunchedReplica(proc, reader, transport, started)
