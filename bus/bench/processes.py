"""`bus ARGS` in a process of its own, for the benchmark sections that run a service (the
projection service, the console) as `bus up` would: apart from the measuring event loop."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path


@contextlib.asynccontextmanager
async def bus_process(log_path: Path, *args: str, grace_s: float) -> AsyncIterator[asyncio.subprocess.Process]:
    """`bus ARGS` with its output appended to `log_path` (its folder made if missing); at the
    end SIGTERM, then SIGKILL after `grace_s`. Raises OSError when it cannot be started."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:  # closed here once the child has its own copy
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bus.cli.main", *args, stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL,
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except TimeoutError:
                proc.kill()
                await proc.wait()
