"""The supervisor's own metrics, read from its status at scrape time.

Served by the supervisor process (agents.supervisor.main) next to its bus's metrics. The agent is
not a label here: the scrape target says which agent a supervisor runs (bus.scrape), and a label
of the same name on a metric would collide with it. Labels: `state` (the fixed replica states)
and `replica` (an index below --replicas).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import get_args

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agents.supervisor.state import SupervisorStatus
from schemas.payloads.agents import ReplicaState

REPLICA_STATES: tuple[str, ...] = get_args(ReplicaState)


class SupervisorCollector(Collector):
    """Replicas by state, restarts and readiness of one supervisor, from `status()` (called in
    prometheus-client's HTTP thread: it must return a snapshot, never a live object)."""

    def __init__(self, status: Callable[[], SupervisorStatus], dropped_events: Callable[[], int]) -> None:
        self._status = status
        self._dropped_events = dropped_events

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        by_state = GaugeMetricFamily(
            "continuum_supervisor_replicas", "Replicas of this agent in each state.", labels=["state"]
        )
        for state in REPLICA_STATES:
            by_state.add_metric([state], sum(1 for r in status.replicas if r.state == state))
        yield by_state
        restarts = CounterMetricFamily(
            "continuum_supervisor_restarts_total", "Times a replica was launched again after it ended unasked.",
            labels=["replica"],
        )
        running = GaugeMetricFamily(
            "continuum_supervisor_replica_up", "1 while a replica is running (ready, not stopping).",
            labels=["replica"],
        )
        for replica in status.replicas:
            restarts.add_metric([str(replica.replica)], replica.restarts)
            running.add_metric([str(replica.replica)], 1.0 if replica.state == "running" else 0.0)
        yield restarts
        yield running
        yield CounterMetricFamily(
            "continuum_supervisor_dropped_events_total",
            "Lifecycle events dropped because the bus was unreachable for too long (the queue is bounded).",
            value=self._dropped_events(),
        )
