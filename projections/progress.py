"""How far the views are: the applied sequence, and waiting for it (read-your-writes)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Iterable, Iterator


class Watermark:
    """The last stream sequence the active views have committed. Lives on the event loop.

    `seq` is where every view is: `advance(seq)` after a whole batch is committed. A fold lane
    commits before the others; `advance(seq, views)` records that for its views alone, so a
    query reading only those views need not wait for the rest (`wait_for(seq, views=...)`).
    Per-view marks only ever release a waiter sooner: a view is always at least at `seq`.

    It also tells the fold lanes who is waiting: a lane may let batches gather while no query
    waits for its views (`awaited`), and `demand` wakes it the moment one does.
    """

    def __init__(self, seq: int = 0) -> None:
        self._seq = seq
        self._views: dict[str, int] = {}
        self._waiters: list[tuple[int, frozenset[str], asyncio.Future[None]]] = []
        self._demand: list[tuple[frozenset[str], Callable[[], None]]] = []

    @property
    def seq(self) -> int:
        return self._seq

    def seq_of(self, views: Collection[str] = ()) -> int:
        """The sequence every one of `views` has reached (no views: all of them, `seq`)."""
        if not views:
            return self._seq
        return max(self._seq, min(self._views.get(view, 0) for view in views))

    def advance(self, seq: int, views: Iterable[str] | None = None) -> None:
        """Record that everything up to `seq` is applied, in `views` or (None) in every view.
        Never moves backwards."""
        if views is None:
            if seq <= self._seq:
                return
            self._seq = seq
        else:
            moved = False
            for view in views:
                if seq > self._views.get(view, 0):
                    self._views[view] = seq
                    moved = True
            if not moved:
                return
        if self._waiters:
            self._release()

    def _release(self) -> None:
        waiting = []
        for waiter in self._waiters:
            seq, views, future = waiter
            if future.done():
                continue
            if seq <= self.seq_of(views):
                future.set_result(None)
            else:
                waiting.append(waiter)
        self._waiters = waiting

    def awaited(self, views: Collection[str]) -> bool:
        """True while a waiter waits for one of `views` (a waiter naming no view waits for all)."""
        return any(not future.done() and _reads(wanted, views) for _, wanted, future in self._waiters)

    @contextlib.contextmanager
    def demand(self, views: Collection[str], wake: Callable[[], None]) -> Iterator[None]:
        """While the block runs, call `wake` whenever a waiter starts waiting for one of `views`."""
        entry = (frozenset(views), wake)
        self._demand.append(entry)
        try:
            yield
        finally:
            self._demand.remove(entry)

    async def wait_for(self, seq: int, timeout_s: float, views: Collection[str] = ()) -> bool:
        """True once `seq` is applied in `views` (none given: in every view); False if it is
        not within `timeout_s`."""
        wanted = frozenset(views)
        if seq <= self.seq_of(wanted):
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((seq, wanted, future))
        for views_of_lane, wake in self._demand:
            if _reads(wanted, views_of_lane):
                wake()
        try:
            async with asyncio.timeout(timeout_s):
                await future
        except TimeoutError:
            return seq <= self.seq_of(wanted)
        finally:
            # A waiter that gave up (or was cancelled) leaves its entry behind until the next
            # release; drop such entries now and then so they cannot pile up.
            if not future.done():
                future.cancel()
            if len(self._waiters) > 64:
                self._waiters = [w for w in self._waiters if not w[2].done()]
        return True


def _reads(wanted: frozenset[str], views: Collection[str]) -> bool:
    """Whether a waiter for `wanted` (empty: every view) waits for one of `views`."""
    return not wanted or not wanted.isdisjoint(views)
