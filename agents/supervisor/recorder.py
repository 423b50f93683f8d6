"""Lifecycle events from the supervisor, recorded in order, surviving a bus outage.

`record()` never blocks the supervisor: it queues the event (with its id fixed at that moment,
so a publish retried after an ambiguous failure is stored once). `run()` publishes the queue in
order and retries with backoff while the bus is unavailable. The queue is bounded: past
`max_pending`, the oldest event is dropped with a warning (supervising matters more than its
record).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from bus.client import Bus
from bus.errors import BusError
from schemas import new_id

log = logging.getLogger("continuum.agents.recorder")


class EventRecorder:
    """An ordered, bounded, retrying queue of `bus.record(agent, payload)` calls."""

    def __init__(self, bus: Bus, *, max_pending: int = 1000, retry_max_s: float = 5.0) -> None:
        self._bus = bus
        self._pending: deque[tuple[str, Any, str]] = deque()
        self._max_pending = max_pending
        self._retry_max_s = retry_max_s
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.dropped = 0

    def record(self, agent: str, payload: Any) -> None:
        """Queue an event about `agent`."""
        if len(self._pending) >= self._max_pending:
            agent_dropped, dropped, _ = self._pending.popleft()
            self.dropped += 1
            log.warning("event queue full: dropped %s of %s", type(dropped).__name__, agent_dropped)
        self._pending.append((agent, payload, new_id()))
        self._idle.clear()
        self._wakeup.set()

    async def run(self) -> None:
        """Publish queued events until cancelled."""
        delay = 0.1
        while True:
            if not self._pending:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            agent, payload, event_id = self._pending[0]
            try:
                await self._bus.record(agent, payload, id=event_id)
            except BusError as exc:
                log.warning("cannot record %s of %s yet (%s); retrying in %.1fs", type(payload).__name__, agent, exc, delay)
                await asyncio.sleep(delay)
                delay = min(self._retry_max_s, delay * 2)
                continue
            delay = 0.1
            if self._pending and self._pending[0][2] == event_id:
                self._pending.popleft()

    async def flush(self, timeout_s: float) -> bool:
        """Wait until every queued event is recorded; False if `timeout_s` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True
