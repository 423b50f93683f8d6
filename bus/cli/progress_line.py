"""One line of progress for long work (a rebuild, a bench section, a team starting), shown on a
terminal and nowhere else.

    line = ProgressLine("rebuild", unit="events")     # standard error, if it is a terminal
    line.update(412_000, total=1_000_000)             # cheap: redraws at most 10 times a second
    line.close()                                      # erases the line

On a terminal it redraws one line in place (`\\r`, then erase to the end of the line):

    rebuild: 412,000/1,000,000 events (41%) 38,000/s

In a pipe or a file it writes nothing at all, so scripts and logs see only the command's own
output. Whether the stream is a terminal is asked once, when the line is made; tests pass
`is_tty` and a stream of their own.

`polling(line, poll)` calls `poll` on an interval while a block awaits the work itself (a
rebuild's reply, agents starting): only when the line is shown, so a pipe costs nothing, and a
poll that fails leaves the work alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TextIO

log = logging.getLogger("continuum.cli")

# At most this many redraws a second: a terminal write per event would cost more than the work.
MAX_REDRAWS_PER_S = 10
_ERASE_TO_END = "\x1b[K"


class ProgressLine:
    """A progress line on `stream` (default: standard error), drawn only when it is a terminal."""

    def __init__(
        self,
        label: str,
        *,
        unit: str = "",
        rate: bool = True,
        stream: TextIO | None = None,
        is_tty: bool | None = None,
        min_interval_s: float = 1 / MAX_REDRAWS_PER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.unit = unit
        self.rate = rate  # whether to show units per second
        self._stream = stream if stream is not None else sys.stderr
        self.shown = _isatty(self._stream) if is_tty is None else is_tty
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._drawn_at: float | None = None
        self._first: tuple[float, int] | None = None  # (time, done) of the first count seen

    def update(self, done: int | None = None, *, total: int | None = None, note: str = "", force: bool = False) -> None:
        """Redraw the line with `done` of `total` (either may be unknown) and a `note`; at most
        `MAX_REDRAWS_PER_S` times a second unless `force`. Does nothing when not shown."""
        if not self.shown:
            return
        now = self._clock()
        if done is not None and self._first is None:
            self._first = (now, done)
        if not force and self._drawn_at is not None and now - self._drawn_at < self._min_interval_s:
            return
        self._drawn_at = now
        self._write("\r" + self.render(done, total=total, note=note, now=now) + _ERASE_TO_END)

    def render(self, done: int | None, *, total: int | None = None, note: str = "", now: float | None = None) -> str:
        """The line's text, e.g. 'rebuild: 412,000/1,000,000 events (41%) 38,000/s'."""
        parts = [f"{self.label}:"]
        if done is not None:
            count = f"{done:,}" if total is None else f"{done:,}/{total:,}"
            parts.append(f"{count} {self.unit}".rstrip())
            if total:
                parts.append(f"({min(100, done * 100 // total)}%)")
            rate = self._rate(done, self._clock() if now is None else now) if self.rate else None
            if rate is not None:
                parts.append(f"{rate:,.0f}/s")
        if note:
            parts.append(note)
        return " ".join(parts)

    def _rate(self, done: int, now: float) -> float | None:
        if self._first is None:
            return None
        since, first = self._first
        elapsed = now - since
        return (done - first) / elapsed if elapsed >= 0.2 and done > first else None

    def close(self) -> None:
        """Erase the line, so what is printed next starts on a clean line."""
        if self.shown and self._drawn_at is not None:
            self._write("\r" + _ERASE_TO_END)
            self._drawn_at = None

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):  # the terminal went away: progress is not worth failing for
            self.shown = False


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no such method, or a closed stream
        return False


@contextlib.asynccontextmanager
async def polling(line: ProgressLine, poll: Callable[[], Awaitable[None]], *, interval_s: float = 0.25) -> AsyncIterator[None]:
    """While the block runs, call `poll` (which updates `line`) every `interval_s`; erase the line
    at the end. Nothing runs when the line is not shown. A poll that raises is logged and tried
    again at the next tick: the work goes on either way."""
    if not line.shown:
        yield
        return
    # Owned by this block and always awaited at its end; not a TaskGroup, which would wrap the
    # block's own exception (a RebuildError, a CliError) in an ExceptionGroup.
    ticking = asyncio.create_task(_tick(poll, interval_s), name=f"progress {line.label}")
    try:
        yield
    finally:
        ticking.cancel()
        # wait() does not raise the ticker's CancelledError, but does raise this task's own.
        await asyncio.wait([ticking])
        line.close()


async def _tick(poll: Callable[[], Awaitable[None]], interval_s: float) -> None:
    while True:
        try:
            await poll()
        except Exception as exc:  # noqa: BLE001 - progress must never stop the work it shows
            log.debug("progress poll failed: %s", exc)
        await asyncio.sleep(interval_s)
