"""How far the views are: the applied sequence, and waiting for it (read-your-writes)."""

from __future__ import annotations

import asyncio
import heapq
import itertools


class Watermark:
    """The last stream sequence the active views have committed. Lives on the event loop:
    `advance` after each commit; `wait_for(seq)` returns once it is reached.

    Waiters sit in a heap by sequence, so an advance wakes exactly those it satisfies.
    """

    def __init__(self, seq: int = 0) -> None:
        self._seq = seq
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @property
    def seq(self) -> int:
        return self._seq

    def advance(self, seq: int) -> None:
        """Record that everything up to `seq` is applied (never moves backwards)."""
        if seq <= self._seq:
            return
        self._seq = seq
        while self._waiters and self._waiters[0][0] <= seq:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)

    async def wait_for(self, seq: int, timeout_s: float) -> bool:
        """True once `seq` is applied; False if it is not within `timeout_s`."""
        if seq <= self._seq:
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (seq, next(self._order), future))
        try:
            async with asyncio.timeout(timeout_s):
                await future
        except TimeoutError:
            return seq <= self._seq
        finally:
            # A waiter that gave up (or was cancelled) leaves its future behind; drop them lazily.
            if not future.done():
                future.cancel()
            if len(self._waiters) > 64:
                self._waiters = [w for w in self._waiters if not w[2].done()]
                heapq.heapify(self._waiters)
        return True
