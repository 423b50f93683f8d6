"""The consumer engine's local window: held deliveries, and the priority queue workers take from.

A delivery is `Held` from its arrival until its settlement is sent. While it waits for a worker
it sits in the `PriorityWindow`, ordered by (rank, stream sequence): rank is minus the envelope's
priority, so higher priority comes first and equal priority keeps stream order.

Wake-ups chain: one waiting worker is woken at a time, and a worker that takes a delivery while
more are queued wakes the next. A handler that never suspends thus drains a burst alone (waking
every idle worker per burst cost ~1-2 us per message), while handlers that do suspend fan the
burst out over as many workers as it needs.
"""

from __future__ import annotations

import asyncio
import heapq
from collections import deque
from typing import TYPE_CHECKING, Any

from bus.settle import Outgoing

if TYPE_CHECKING:
    from bus.meters import ConsumerMeters
    from bus.pull import RawPull
    from schemas import Delivery, Envelope


class Held(Outgoing, gc=False):
    """A delivery held by this process, from arrival until its settlement is sent. It is its own
    Outgoing: `payload` and `settlement` are filled in when it is decided. Untracked by the
    garbage collector like every Outgoing (it refers to its pull, and through it to the engine
    that holds it: the engine drops every Held explicitly, on settlement or at exit)."""

    key: int
    pull: "RawPull"
    meters: "ConsumerMeters"
    data: bytes
    delivery: "Delivery"
    envelope: "Envelope[Any] | None"
    problem: tuple[str, str] | None  # (dead-letter reason, error) when the bytes did not decode
    touched: float  # monotonic time of the delivery or the last +WPI


class PriorityWindow:
    """Held deliveries waiting for a worker, highest priority first, then stream order."""

    __slots__ = ("_heap", "_waiters", "_woken", "_closed")

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, int, Held]] = []
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._woken = 0  # workers woken that have not resumed yet
        self._closed = False

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, rank: int, stream_seq: int, held: Held) -> None:
        """Queue a delivery (`rank`: lower goes first) and wake a worker if none is awake."""
        heapq.heappush(self._heap, (rank, stream_seq, held.key, held))
        if not self._woken and self._waiters:
            self._wake_one()

    def take_nowait(self) -> Held | None:
        """The first delivery, or None when none waits."""
        heap = self._heap
        if not heap:
            return None
        held = heapq.heappop(heap)[-1]
        if heap and not self._woken and self._waiters:
            self._wake_one()
        return held

    async def take(self) -> Held | None:
        """The first delivery, waiting for one; None once closed and empty."""
        heap = self._heap
        while not heap:
            if self._closed:
                return None
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._woken -= 1
                    self._wake_one()  # woken and cancelled at once: pass the wake-up on
                raise
            self._woken -= 1
        return self.take_nowait()

    def close(self) -> list[Held]:
        """Take no more: return what is queued (nobody started it) and release every waiting
        worker (`take` then returns None)."""
        self._closed = True
        queued = [entry[-1] for entry in self._heap]
        self._heap.clear()
        while self._waiters:
            self._wake_one()
        return queued

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._woken += 1
                return
