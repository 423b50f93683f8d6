"""Prometheus metrics of the projection service, on an injected registry (never the global one).

Label sets are bounded: view names (a fixed list), query outcome (the QueryFailure kinds plus
"ok"), target (live | rebuild).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH = (1, 10, 100, 500, 1000, 2500, 5000, 10_000, 20_000, 50_000)


class ProjectionMetrics:
    """Every metric the projections record."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.applied = Counter(
            "continuum_projection_events_applied_total",
            "Events folded into the views (rate = apply rate).", ["target"], registry=registry,
        )
        self.checkpoint = Gauge(
            "continuum_projection_checkpoint", "Last stream sequence applied, per view.",
            ["view"], registry=registry,
        )
        self.lag_events = Gauge(
            "continuum_projection_lag_events", "Stored events not yet applied to the views.",
            registry=registry,
        )
        self.lag_seconds = Gauge(
            "continuum_projection_lag_seconds",
            "Age of the newest applied event when it was applied, while events are waiting (0 when caught up).",
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "continuum_projection_batch_seconds", "Time to fold and commit one batch.",
            ["target"], buckets=_LATENCY, registry=registry,
        )
        self.batch_size = Histogram(
            "continuum_projection_batch_size", "Events per committed batch.",
            ["target"], buckets=_BATCH, registry=registry,
        )
        self.undecodable = Counter(
            "continuum_projection_undecodable_total",
            "Stored messages that are not envelopes (kept in `events` with their error).", registry=registry,
        )
        self.poisoned = Counter(
            "continuum_projection_poisoned_total",
            "Events a view could not fold (kept in `events` with the fold's error).", registry=registry,
        )
        self.integrity_violations = Counter(
            "continuum_projection_integrity_violations_total",
            "Missing, forked or out-of-chain events found in the log (see the `integrity` view).",
            registry=registry,
        )
        self.fold_retries = Counter(
            "continuum_projection_fold_retries_total",
            "Folds retried after a failure that lies not in the events (out of memory, disk full), by target.",
            ["target"], registry=registry,
        )
        self.reopens = Counter(
            "continuum_projection_reopens_total",
            "Times the views file was opened again after DuckDB invalidated it for want of memory.",
            registry=registry,
        )
        self.half_commits = Counter(
            "continuum_projection_half_commits_total",
            "Folds whose commit DuckDB failed half-way (out of memory); the views they touched are rebuilt from seq 1.",
            registry=registry,
        )
        self.reader_restarts = Counter(
            "continuum_projection_reader_restarts_total", "Times the log reader had to start over.",
            registry=registry,
        )
        self.rebuilds = Counter(
            "continuum_projection_rebuilds_total", "Rebuilds by outcome (swapped | failed).",
            ["outcome"], registry=registry,
        )
        self.query_seconds = Histogram(
            "continuum_query_seconds", "Query latency, from request to answer, by outcome.",
            ["outcome"], buckets=_LATENCY, registry=registry,
        )
