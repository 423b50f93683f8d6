"""HealthSampler: what the log's consumers and the projection service owe, every few seconds.

Per agent: its consumers' backlog (`pending`: stored, not yet delivered) and `ack_pending`
(delivered, not yet settled), and redeliveries; for the views: the log's last sequence against
the sequence the projection service has applied. Read through the bus (JetStream consumer info,
one query); a failed sample is reported as such on the page and tried again next time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import msgspec

from bus.errors import BusError
from bus.transport import translate

if TYPE_CHECKING:
    from bus.client import Bus
    from bus.console.feed import LiveFeed

log = logging.getLogger("continuum.console.health")


class AgentBacklog(msgspec.Struct, frozen=True, kw_only=True):
    """One agent's consumers summed: not yet delivered, delivered not yet settled, redelivered."""

    agent: str
    pending: int
    ack_pending: int
    redelivered: int


class Health(msgspec.Struct, frozen=True, kw_only=True):
    """One sample. `error` says why a part could not be read (the rest is still shown)."""

    at: float
    head_seq: int
    applied_seq: int | None
    projection_lag: int | None
    backlog: list[AgentBacklog]
    pages: int
    error: str | None = None


async def consumer_backlogs(bus: "Bus") -> list[AgentBacklog]:
    """Backlog per agent name, from the durable consumers of the log (`<agent>__<kind>`).
    Raises BusUnavailable, PermissionDenied."""
    sums: dict[str, list[int]] = {}
    offset = 0
    try:
        while True:
            page = await bus.js.consumers_info(bus.subjects.stream, offset=offset)
            for info in page:
                name = info.config.durable_name
                if not name or "__" not in name:
                    continue
                agent = name.split("__", 1)[0]
                total = sums.setdefault(agent, [0, 0, 0])
                total[0] += info.num_pending or 0
                total[1] += info.num_ack_pending or 0
                total[2] += info.num_redelivered or 0
            offset += len(page)
            if len(page) < 256:
                break
    except BusError:
        raise
    except Exception as exc:  # nats-py's errors, translated here
        raise translate(exc, "reading the log's consumers") from exc
    return [AgentBacklog(agent=a, pending=p, ack_pending=k, redelivered=r) for a, (p, k, r) in sorted(sums.items())]


class HealthSampler:
    """Samples `Health` every `interval_s` and hands it to the feed; owned by the app's lifespan."""

    def __init__(self, bus: "Bus", feed: "LiveFeed", interval_s: float) -> None:
        self._bus = bus
        self._feed = feed
        self._interval_s = interval_s
        self.latest: Health | None = None

    async def run(self) -> None:
        """Sample until cancelled."""
        while True:
            self.latest = await self.sample()
            self._feed.publish_health(self.latest)
            await asyncio.sleep(self._interval_s)

    async def sample(self) -> Health:
        """One sample; never raises a BusError (it is reported in `error`)."""
        errors: list[str] = []
        backlog: list[AgentBacklog] = []
        head = self._feed.head_seq
        applied: int | None = None
        try:
            head = max(head, await self._bus.last_seq())
            backlog = await consumer_backlogs(self._bus)
        except BusError as exc:
            errors.append(f"consumers: {exc}")
        try:
            result = await self._bus.query("SELECT 1 AS one", min_seq=0, timeout_s=5.0)
            applied = result.applied_seq
        except BusError as exc:
            errors.append(f"views: {exc}")
        return Health(
            at=time.time() * 1000, head_seq=head, applied_seq=applied,
            projection_lag=None if applied is None else max(0, head - applied),
            backlog=backlog, pages=self._feed.pages, error="; ".join(errors) or None,
        )


def backlog_by_agent(health: Health | None) -> dict[str, Any]:
    """The latest backlog as {agent: {pending, ack_pending, redelivered}} (empty before the
    first sample)."""
    if health is None:
        return {}
    return {b.agent: msgspec.structs.asdict(b) for b in health.backlog}
