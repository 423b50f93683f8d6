"""Prometheus metrics of one `Bus`, registered on an injected registry (never the global one).

Label sets are bounded: subject class (inbox/group/event/reply/dead), consumer name, outcome.
Never ids.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000)


class BusMetrics:
    """Every metric the bus records. One instance per `Bus`, sharing the caller's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.published = Counter(
            "continuum_published_total", "Envelopes stored in the log (acked by the server).",
            ["subject_class"], registry=registry,
        )
        self.publish_duplicates = Counter(
            "continuum_publish_duplicates_total", "Publishes the server recognised as duplicates.",
            registry=registry,
        )
        self.publish_seconds = Histogram(
            "continuum_publish_seconds", "Time from publish call to server ack.",
            buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.publish_batch_size = Histogram(
            "continuum_publish_batch_size", "Messages per group commit (atomic batch).",
            buckets=_BATCH_BUCKETS, registry=registry,
        )
        self.occ_conflicts = Counter(
            "continuum_occ_conflicts_total", "Appends rejected by an expected-sequence check.",
            registry=registry,
        )
        self.delivered = Counter(
            "continuum_delivered_total", "Messages delivered to this process.",
            ["consumer"], registry=registry,
        )
        self.redelivered = Counter(
            "continuum_redelivered_total", "Deliveries that were not the first attempt.",
            ["consumer"], registry=registry,
        )
        self.acked = Counter(
            "continuum_acked_total", "Messages acked after their handler succeeded.",
            ["consumer"], registry=registry,
        )
        self.nacked = Counter(
            "continuum_nacked_total", "Messages handed back for redelivery with a backoff.",
            ["consumer"], registry=registry,
        )
        self.dead_lettered = Counter(
            "continuum_dead_lettered_total", "Messages terminated and written to the dead letters.",
            ["consumer", "reason"], registry=registry,
        )
        self.dead_letter_failures = Counter(
            "continuum_dead_letter_failures_total",
            "Dead letters, expiry records or failure replies that could not be stored yet (the "
            "message is redelivered later).",
            ["consumer"], registry=registry,
        )
        self.expired = Counter(
            "continuum_expired_total", "Envelopes not handled because they had expired.",
            ["consumer"], registry=registry,
        )
        self.handler_seconds = Histogram(
            "continuum_handler_seconds", "Handler run time.",
            ["consumer"], buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.in_flight = Gauge(
            "continuum_handlers_in_flight", "Handlers running now.",
            ["consumer"], registry=registry,
        )
        self.requests = Counter(
            "continuum_requests_total", "Requests sent, by outcome.",
            ["outcome"], registry=registry,
        )
        self.request_seconds = Histogram(
            "continuum_request_seconds", "Request to reply time.",
            buckets=_LATENCY_BUCKETS, registry=registry,
        )
