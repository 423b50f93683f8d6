"""What outlives the process that folds: the fold each lane is in, and how the process died.

Two small files beside the views file, written by the service and read at its next start
(projections.crashes decides what they mean):

    <views>.folding   first line: the boot and the machine's count of OOM kills when the
                      process started; then one line per lane: the fold it is running (JSON), or
                      blank. A line is rewritten in place with one pwrite and never fsynced: it
                      must outlive the process, not the machine (the kernel keeps what a dead
                      process wrote, and cannot tear one write). About 1 us to write and clear.
    <views>.faults    what Python's faulthandler writes when the process dies of a fatal signal
                      (SIGSEGV, a stack overflow's included, SIGABRT, SIGBUS, SIGILL, SIGFPE), or
                      the service's own note when DuckDB gave up on the database.

How the last process died (`Death`), as far as can be told:

    fault     a fatal signal, or a fatal database error: the report says which
    oom       the kernel's OOM killer struck meanwhile (its count went up, same boot): probably
              this process, not surely, and possibly for another process's memory
    unknown   anything else: a SIGKILL from someone, an exit, the machine going down
"""

from __future__ import annotations

import faulthandler
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import msgspec

log = logging.getLogger("continuum.projections.inflight")

SLOT_BYTES = 256
_BLANK = b" " * (SLOT_BYTES - 1) + b"\n"
_VMSTAT = Path("/proc/vmstat")


class Header(msgspec.Struct, frozen=True, kw_only=True):
    """The folding file's first line: what tells the next start how this process died."""

    boot: str | None
    oom_kills: int | None


class InFlight(msgspec.Struct, frozen=True, kw_only=True):
    """One lane's fold in progress, as its line holds it."""

    lane: str
    target: str  # live | build
    level: str  # batch | chunk | record | crasher (see projections.crashes)
    first: int
    last: int
    count: int


_encode = msgspec.json.Encoder().encode
_decode_header = msgspec.json.Decoder(Header).decode
_decode_fold = msgspec.json.Decoder(InFlight).decode


def current_oom_kills() -> int | None:
    """How many processes the kernel's OOM killer has killed since boot, or None where unknown."""
    try:
        for line in _VMSTAT.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return None


class FoldingFile:
    """`<views>.folding`: a header line, then one line of `SLOT_BYTES` per lane."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def left_behind(self) -> tuple[Header | None, list[InFlight]]:
        """What the last process wrote: its header, and the folds it left in flight (none after
        a clean close). Raises OSError."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None, []
        lines = [data[at:at + SLOT_BYTES].strip() for at in range(0, len(data), SLOT_BYTES)]
        header = None
        folds = []
        for number, text in enumerate(lines):
            if not text:
                continue
            try:
                if number == 0:
                    header = _decode_header(text)
                else:
                    folds.append(_decode_fold(text))
            except msgspec.DecodeError:
                log.warning("ignoring an unreadable line of %s: %r", self.path, text[:80])
        return header, folds

    def start(self, slots: int, header: Header) -> None:
        """Begin afresh: `header` and `slots` blank lines, written out in full so that rewriting
        one never needs a new disk block. Raises OSError."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, _line(_encode(header)) + _BLANK * slots)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def write(self, slot: int, fold: InFlight) -> None:
        """Record `fold` in `slot`, replacing what it held. Raises OSError."""
        assert self._fd is not None
        os.pwrite(self._fd, _line(_encode(fold)), (slot + 1) * SLOT_BYTES)

    def clear(self, slot: int) -> None:
        """Blank `slot`: its fold returned. Raises OSError."""
        assert self._fd is not None
        os.pwrite(self._fd, _BLANK, (slot + 1) * SLOT_BYTES)

    def close(self, *, remove: bool) -> None:
        """Close the file; `remove` it when no fold is left in flight."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
            if remove:
                self.path.unlink(missing_ok=True)


def _line(text: bytes) -> bytes:
    return text[:SLOT_BYTES - 1].ljust(SLOT_BYTES - 1) + b"\n"


class FaultFile:
    """`<views>.faults`: this process's fatal faults, for the next start to read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._handler = False

    def report(self) -> str:
        """What the last process reported (empty if nothing). Raises OSError."""
        try:
            return self.path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def watch(self) -> None:
        """Forget the last report; have fatal signals reported here from now on (by Python's
        faulthandler, unless something else already enabled it: then that keeps it, and a crash
        here tells no more than a kill). Raises OSError."""
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        if not faulthandler.is_enabled():
            faulthandler.enable(file=self._fd, all_threads=True)
            self._handler = True

    def note(self, text: str) -> None:
        """Report a fault that ends the process without a signal (a database DuckDB gave up on)."""
        if self._fd is not None:
            try:
                os.write(self._fd, text.encode() + b"\n")
            except OSError as exc:
                log.warning("could not note %r in %s: %s", text, self.path, exc)

    def close(self) -> None:
        """Stop watching; remove the file if nothing was reported."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self._handler:
            faulthandler.disable()
            self._handler = False
        empty = os.fstat(fd).st_size == 0
        os.close(fd)
        if empty:
            self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Death:
    """How the last process died, as far as can be told (see the module docstring)."""

    kind: str  # fault | oom | unknown
    detail: str


def how_it_died(header: Header | None, report: str, *, boot: str | None, oom_kills: int | None) -> Death:
    """How the process that wrote `header` (and left `report` in the faults file) died, given
    this boot and the OOM kills counted now. Pure."""
    if report.strip():
        return Death("fault", report.strip().splitlines()[0])
    if (header is not None and header.boot is not None and header.boot == boot
            and header.oom_kills is not None and oom_kills is not None and oom_kills > header.oom_kills):
        return Death("oom", f"the OOM killer killed {oom_kills - header.oom_kills} process(es) meanwhile")
    return Death("unknown", "no fault reported and no OOM kill counted: killed, or it exited")
