"""Writing the unsynced views file back to disk a little at a time, so the log's server never waits.

The views file and its WAL are written without an fsync per commit (projections.unsynced). Left
alone, the kernel writes such data back only once it is 30 s old (`vm.dirty_expire_centisecs`) or
a tenth of memory is dirty: after a bulk fold, hundreds of MB at once. On ext4 (and most journaled
file systems) an fsync of another file on the same disk waits behind that burst, and nats-server
fsyncs every write of the log before it acks it (`sync_interval: always`). Measured on this
machine: a fold of 1M events left ~700 MB dirty; 30 s later, every publish and every read of the
log (the console's, the consumers') stalled for 235-430 ms at once.

So while the file is open, a thread of the store syncs the file and its WAL every `interval_s`
when they changed: each sync writes what was written since the last one (at the bulk fold's rate,
tens of MB), off the commit path, and the server's fsyncs never queue behind more than that.

    pacer = WritebackPacer(path, others=(wal_path,), interval_s=0.5)
    pacer.start()     # after the file's owner opened (and locked) it
    ...
    pacer.stop()      # joins the thread; before the owner closes the file
    pacer.close()     # after the owner closed it

The file itself is opened once and held open until `close()`: DuckDB locks it with a POSIX
record lock, and closing *any* descriptor of a file drops every such lock the process holds on
it, so opening and closing it at each sync would let a second process open the views file
beside this one. The WAL (not locked) is opened for each sync, as it is replaced at checkpoints.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("continuum.projections.writeback")

DEFAULT_INTERVAL_S = 0.5
# A file's modification time comes from the kernel's coarse clock (a tick: 1-10 ms), so a write
# in the same tick as the last look, not changing the size, leaves (size, time) as they were. A
# file modified this recently is therefore synced again at the next look, whatever it shows.
SETTLED_AFTER_NS = 100_000_000


class WritebackPacer:
    """A thread that fdatasyncs `path` and `others` every `interval_s` while any of them changed
    (size or modification time, or modified within SETTLED_AFTER_NS of the last look). One of
    `others` that does not exist (a WAL after a checkpoint) is skipped. See the module docstring
    for the order of `start`, `stop` and `close`."""

    def __init__(self, path: Path, *, others: Sequence[Path] = (), interval_s: float = DEFAULT_INTERVAL_S) -> None:
        if interval_s <= 0:
            raise ValueError("the writeback interval must be positive")
        self._path = path
        self._others = tuple(others)
        self._interval_s = interval_s
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._held: int | None = None  # the file's descriptor, open from start() to close()
        self._seen: dict[Path, tuple[int, int]] = {}
        self.syncs = 0  # files synced so far (read by tests)

    def start(self) -> None:
        """Open the file and start the thread (once). Raises OSError (the file cannot be opened)."""
        if self._thread is not None or self._held is not None:
            raise RuntimeError("the writeback pacer is already started")
        self._held = os.open(self._path, os.O_RDONLY)
        self._thread = threading.Thread(target=self._run, name="continuum-writeback", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it (a sync in progress finishes first)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Stop, and close the file: only once its owner has closed it (module docstring)."""
        self.stop()
        held, self._held = self._held, None
        if held is not None:
            os.close(held)

    def sync_changed(self) -> int:
        """Sync each file that changed since it was last synced; how many were."""
        synced = 0
        if self._held is not None and self._sync_if_changed(self._path, self._held):
            synced += 1
        for path in self._others:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                self._seen.pop(path, None)
                continue
            try:
                if self._sync_if_changed(path, fd):
                    synced += 1
            finally:
                os.close(fd)
        self.syncs += synced
        return synced

    def _sync_if_changed(self, path: Path, fd: int) -> bool:
        stat = os.fstat(fd)
        mark = (stat.st_size, stat.st_mtime_ns)
        if self._seen.get(path) == mark:
            return False
        looked_ns = time.time_ns()
        os.fdatasync(fd)
        if looked_ns - stat.st_mtime_ns >= SETTLED_AFTER_NS:
            self._seen[path] = mark
        else:  # written just now: a write in the same tick would look the same (SETTLED_AFTER_NS)
            self._seen.pop(path, None)
        return True

    def _run(self) -> None:
        while not self._stopping.wait(self._interval_s):
            try:
                self.sync_changed()
            except OSError as exc:
                # The file is still written; the kernel's own writeback goes on. Say so once a
                # while rather than at every interval.
                log.warning("could not write the views file back (%s); the kernel will, later and in bulk", exc)
                if self._stopping.wait(30):
                    return
