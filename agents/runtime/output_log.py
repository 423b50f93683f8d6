"""A replica's log file kept bounded: its stdout and stderr (Python logging included) go to one
file, which is rotated by size.

The supervisor opens the file and hands it to the replica as its stdout and stderr (so output
survives the replica crashing, and even the supervisor going away). The replica itself rotates
it, because only the process writing to a descriptor can point that descriptor at a new file:
when the file is over `max_bytes`, `<log>` becomes `<log>.1` (`.1` becomes `.2`, ... up to
`keep` old files, the oldest deleted) and descriptors 1 and 2 are pointed at a fresh `<log>`.
Everything written before and after lands in order, C-level writes included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("continuum.agents.output_log")

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_KEEP = 3
CHECK_EVERY_S = 2.0


def rotated_paths(path: Path, keep: int) -> list[Path]:
    """`<log>.1` .. `<log>.<keep>`, newest first."""
    return [path.with_name(f"{path.name}.{k}") for k in range(1, keep + 1)]


def rotate_if_large(path: Path, *, max_bytes: int, keep: int, fds: tuple[int, ...] = (1, 2)) -> bool:
    """Rotate `path` when the file behind `fds[0]` is over `max_bytes` (and is `path`); returns
    whether it did. Raises OSError when the directory cannot be written."""
    try:
        current = os.fstat(fds[0])
        on_disk = path.stat()
    except OSError:
        return False  # not a file we write to (a terminal, a pipe), or it was removed by hand
    if (current.st_dev, current.st_ino) != (on_disk.st_dev, on_disk.st_ino) or current.st_size <= max_bytes:
        return False
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    older = rotated_paths(path, keep)
    with contextlib.suppress(FileNotFoundError):
        older[-1].unlink()
    for newer, oldest in zip(reversed(older[:-1]), reversed(older[1:])):
        with contextlib.suppress(FileNotFoundError):
            newer.rename(oldest)
    path.rename(older[0])
    fresh = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for fd in fds:
            os.dup2(fresh, fd)
    finally:
        os.close(fresh)
    return True


async def keep_rotating(path: Path, *, max_bytes: int, keep: int, stop: asyncio.Event) -> None:
    """Check every CHECK_EVERY_S until `stop` is set; rotate when over `max_bytes`. A rotation
    that fails is logged and tried again later: the agent goes on either way."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), CHECK_EVERY_S)
        try:
            rotate_if_large(path, max_bytes=max_bytes, keep=keep)
        except OSError as exc:
            log.warning("cannot rotate %s: %s", path, exc)
