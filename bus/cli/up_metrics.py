"""What `bus up` exports about the processes it started: each child's liveness and, for the one
server it runs, that server's own figures read from its monitoring port (/varz) at scrape time.
Served by a foreground `bus up` (the `bus_up` target), and by the keeper that stands in for a
detached one (bus.cli.keeper)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bus.server import read_varz


def up_metrics(children_up: Callable[[], list[tuple[str, bool]]], monitor_url: str | None) -> CollectorRegistry:
    """A registry with `bus up`'s metrics: each child's liveness (`children_up()`: name, running)
    and, with a `monitor_url`, that server's own counters."""
    registry = CollectorRegistry()
    registry.register(_UpCollector(children_up, monitor_url))
    return registry


# nats-server /varz fields exported by `bus up`, named as Prometheus wants: cumulative counts are
# counters (`_total`), sizes are in bytes (`_bytes`), levels are gauges.
VARZ_METRICS: tuple[tuple[str, str, str, str], ...] = (
    # (varz key, metric name, type, help)
    ("connections", "continuum_nats_connections", "gauge", "Client connections open now."),
    ("in_msgs", "continuum_nats_received_messages_total", "counter", "Messages the server received from clients and routes."),
    ("out_msgs", "continuum_nats_sent_messages_total", "counter", "Messages the server sent to clients and routes."),
    ("in_bytes", "continuum_nats_received_bytes_total", "counter", "Message bytes the server received."),
    ("out_bytes", "continuum_nats_sent_bytes_total", "counter", "Message bytes the server sent."),
    ("slow_consumers", "continuum_nats_slow_consumers_total", "counter", "Clients the server cut off for reading too slowly."),
    ("mem", "continuum_nats_resident_memory_bytes", "gauge", "The server process's resident memory."),
)


class _UpCollector(Collector):
    """Liveness of `bus up`'s children and the server's own counters, read at scrape time."""

    def __init__(self, children_up: Callable[[], list[tuple[str, bool]]], monitor_url: str | None) -> None:
        self._children_up = children_up
        self._monitor_url = monitor_url

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("continuum_child_up", "1 while a child process of `bus up` runs.", labels=["child"])
        for name, running in self._children_up():
            up.add_metric([name], 1.0 if running else 0.0)
        yield up
        if self._monitor_url is None:
            return
        try:
            varz = read_varz(self._monitor_url, timeout_s=1.0)  # runs in the metrics HTTP thread
        except (OSError, ValueError):
            varz = None
        yield GaugeMetricFamily(
            "continuum_nats_up", "1 when the server's monitoring endpoint (/varz) answered this scrape.",
            value=0.0 if varz is None else 1.0,
        )
        for key, name, kind, help_text in VARZ_METRICS if varz is not None else ():
            if isinstance(varz.get(key), (int, float)):
                family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                yield family(name, f"{help_text} (nats-server /varz {key})", value=float(varz[key]))
