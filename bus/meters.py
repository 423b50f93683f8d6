"""The consumer engine's metrics of one consumer, counted cheaply and pushed in bulk.

A labelled Prometheus update costs ~1 us and a histogram `observe()` ~2 us: as much as the
rest of a delivery's bookkeeping. So the engine counts plain ints on the hot path, and
`ConsumerMeters.push()` moves them into the `BusMetrics` after every settlement flush and on
every tick.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bus.metrics import BusMetrics


class ConsumerMeters:
    """The metrics of one consumer (`consumer` is its durable name, a bounded label)."""

    __slots__ = ("consumer", "delivered", "redelivered", "acked", "nacked", "running", "durations",
                 "_delivered", "_redelivered", "_acked", "_nacked", "_in_flight", "_reported",
                 "_handler_seconds", "_dead", "_expired")

    def __init__(self, metrics: "BusMetrics", consumer: str) -> None:
        self.consumer = consumer
        self.delivered = self.redelivered = self.acked = self.nacked = 0
        self.running = self._reported = 0
        self.durations: list[float] = []
        self._delivered = metrics.delivered.labels(consumer)
        self._redelivered = metrics.redelivered.labels(consumer)
        self._acked = metrics.acked.labels(consumer)
        self._nacked = metrics.nacked.labels(consumer)
        self._in_flight = metrics.in_flight.labels(consumer)
        self._handler_seconds = metrics.handler_seconds.labels(consumer)
        self._expired = metrics.expired.labels(consumer)
        self._dead = metrics.dead_lettered

    def dead(self, reason: str) -> None:
        self._dead.labels(self.consumer, reason).inc()

    def expired(self) -> None:
        self._expired.inc()

    def push(self) -> None:
        """Move the counts gathered since the last push into Prometheus."""
        if self.delivered:
            self._delivered.inc(self.delivered)
            self.delivered = 0
        if self.redelivered:
            self._redelivered.inc(self.redelivered)
            self.redelivered = 0
        if self.acked:
            self._acked.inc(self.acked)
            self.acked = 0
        if self.nacked:
            self._nacked.inc(self.nacked)
            self.nacked = 0
        if self.running != self._reported:
            # inc/dec rather than set: replicas in one process share the gauge.
            self._in_flight.inc(self.running - self._reported)
            self._reported = self.running
        if self.durations:
            durations, self.durations = self.durations, []
            observe_many(self._handler_seconds, durations)


def observe_many(histogram: Any, values: list[float]) -> None:
    """`histogram.observe(v)` for each value, bucketed in one pass (observe() costs ~2 us each,
    which at 40k msg/s is 8% of a core). Uses prometheus-client's bucket fields when present
    (pinned <0.27), else falls back to observe()."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values:
            histogram.observe(value)
        return
    counts = [0] * len(bounds)
    last = len(bounds) - 1  # the +Inf bucket
    for value in values:
        index = bisect.bisect_left(bounds, value)
        counts[index if index <= last else last] += 1
    for index, count in enumerate(counts):
        if count:
            buckets[index].inc(count)
    total.inc(sum(values))
