"""Writing the views file without an fsync per commit, and what makes that safe.

The views are derived from the log, which the server fsyncs on every write. DuckDB's own fsync
at each commit costs 1-4 ms per lane commit here, and a third of a large batch's commit; it
protects only against an OS crash or power cut, since after a process crash the kernel still
writes out what the process wrote. So the file is written unsynced, and a marker next to it,
`<file>.unsynced`, names the boot (Linux `boot_id`) it is being written in. A clean close syncs
the file and removes the marker. At the next open, a marker from another boot means the machine
went down while the file was unsynced: the file may be torn, so it is moved aside and the views
are folded again from the log. A marker from this boot is a process crash: the file is intact.

Where the boot cannot be told (no /proc), the views file is fsynced as DuckDB does by default.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger("continuum.projections.unsynced")

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def wal_of(path: Path) -> Path:
    """Where DuckDB keeps the write-ahead log of the database file at `path`."""
    return path.with_name(path.name + ".wal")


def current_boot_id() -> str | None:
    """This boot's id, or None where the OS does not say."""
    try:
        return _BOOT_ID.read_text().strip() or None
    except OSError:
        return None


class UnsyncedFile:
    """The marker of one views file written without fsync (see the module docstring)."""

    def __init__(self, path: Path, boot_id: str) -> None:
        self.path = path
        self.marker = path.with_name(path.name + ".unsynced")
        self._boot_id = boot_id

    def set_aside_if_torn(self) -> Path | None:
        """Before opening: if the file was left unsynced in another boot, move it (and its WAL)
        aside and return where to; else None."""
        try:
            marked = self.marker.read_text().strip()
        except FileNotFoundError:
            return None
        if marked == self._boot_id or not self.path.exists():
            return None
        aside = self.path.with_name(f"{self.path.name}.unclean-{time.strftime('%Y%m%dT%H%M%S')}")
        self.path.rename(aside)
        wal = wal_of(self.path)
        if wal.exists():
            wal.rename(wal_of(aside))
        log.warning(
            "%s was being written without fsync when the machine went down (boot %s, now %s): moved it to %s; "
            "the views are folded again from the log", self.path, marked, self._boot_id, aside,
        )
        return aside

    def mark(self) -> None:
        """Record, durably, that the file is about to be written unsynced in this boot."""
        _write_synced(self.marker, self._boot_id)

    def release(self) -> None:
        """After a clean close: sync the file and its WAL, then remove the marker."""
        for path in (self.path, wal_of(self.path)):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.marker.unlink(missing_ok=True)
        _sync_dir(self.path.parent)


def _write_synced(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as out:
        out.write(text + "\n")
        out.flush()
        os.fsync(out.fileno())
    temporary.replace(path)
    _sync_dir(path.parent)


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
