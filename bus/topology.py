"""Streams and consumers declared as data and applied idempotently.

`ensure_*` create what is missing, update what may change in place, and log a warning naming
each field when a live object has drifted from the declaration in a way that cannot be updated.
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from bus.config import ConsumerSettings, StreamSettings
from bus.subjects import Subjects

log = logging.getLogger("continuum.topology")

_NS = 1_000_000_000


def log_stream_config(subjects: Subjects, settings: StreamSettings) -> js_api.StreamConfig:
    """The event log: file storage, limits retention, dedup window, direct get, atomic batches."""
    max_age = settings.max_age_s
    window = settings.duplicate_window_s
    if max_age:
        window = min(window, max_age)
    return js_api.StreamConfig(
        name=subjects.stream,
        description="Continuum event log",
        subjects=[subjects.all],
        retention=js_api.RetentionPolicy.LIMITS,
        storage=js_api.StorageType.FILE,
        max_age=max_age or None,
        max_bytes=settings.max_bytes,
        duplicate_window=window,
        num_replicas=settings.replicas,
        allow_direct=True,
        allow_atomic=True,
        deny_delete=True,
    )


def advisory_stream_config(subjects: Subjects) -> js_api.StreamConfig:
    """Max-deliveries advisories made durable, so a dead letter is written even when every
    process that received the message died on it."""
    return js_api.StreamConfig(
        name=subjects.advisory_stream,
        description="Continuum max-deliveries advisories",
        subjects=[subjects.max_deliveries_advisory("*")],
        retention=js_api.RetentionPolicy.LIMITS,
        storage=js_api.StorageType.FILE,
        max_age=7 * 24 * 3600,
        # The server's default, stated: left at nats-py's 0 it reads as drift on every start.
        duplicate_window=120.0,
        num_replicas=1,
    )


async def ensure_stream(js: JetStreamContext, config: js_api.StreamConfig) -> js_api.StreamInfo:
    """Create the stream, or update it when a mutable field differs. Returns its info."""
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        return await js.add_stream(config)
    live = info.config
    drift = {
        name: (getattr(live, name), want)
        for name in ("subjects", "max_age", "max_bytes", "duplicate_window", "allow_direct", "allow_atomic")
        if (want := getattr(config, name)) is not None and getattr(live, name) != want
    }
    if drift:
        log.warning("stream %s drifted from its declaration, updating: %s", config.name, drift)
        info = await js.update_stream(config)
    return info


def inbox_consumer_config(subjects: Subjects, agent: str, settings: ConsumerSettings) -> js_api.ConsumerConfig:
    """An agent's inbox: everything ever sent to it, so a late joiner gets its backlog."""
    return _consumer_config(
        subjects.inbox_consumer(agent), [subjects.inbox_filter(agent)], js_api.DeliverPolicy.ALL, settings
    )


def group_consumer_config(
    subjects: Subjects, agent: str, tags: list[str], settings: ConsumerSettings
) -> js_api.ConsumerConfig:
    """Broadcasts to an agent's tags, from the moment the consumer is first created (old
    broadcasts stay in the log and the views, but are not delivered to a late joiner)."""
    return _consumer_config(
        subjects.group_consumer(agent),
        sorted(subjects.group_filter(t) for t in tags),
        js_api.DeliverPolicy.NEW,
        settings,
    )


def dead_letter_consumer_config(subjects: Subjects, agent: str) -> js_api.ConsumerConfig:
    """The max-deliveries advisories of an agent's two consumers, on the advisory stream, read
    by its dead-letter watcher (replicas share it). Unlimited redelivery: an advisory is only
    acked once its dead letter is stored."""
    watched = (subjects.inbox_consumer(agent), subjects.group_consumer(agent))  # validates `agent`
    name = f"{agent}__deadletters"
    return js_api.ConsumerConfig(
        durable_name=name,
        name=name,
        deliver_policy=js_api.DeliverPolicy.ALL,
        ack_policy=js_api.AckPolicy.EXPLICIT,
        ack_wait=30.0,
        max_deliver=-1,
        max_ack_pending=1000,
        filter_subjects=sorted(subjects.max_deliveries_advisory(c) for c in watched),
        max_waiting=512,
    )


def _consumer_config(
    name: str, filters: list[str], deliver: js_api.DeliverPolicy, settings: ConsumerSettings
) -> js_api.ConsumerConfig:
    return js_api.ConsumerConfig(
        durable_name=name,
        name=name,
        deliver_policy=deliver,
        ack_policy=js_api.AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_s,
        max_deliver=settings.retry.max_deliver,
        max_ack_pending=settings.max_ack_pending,
        filter_subjects=filters if len(filters) > 1 else None,
        filter_subject=filters[0] if len(filters) == 1 else None,
        max_waiting=512,
    )


async def ensure_consumer(js: JetStreamContext, stream: str, config: js_api.ConsumerConfig) -> js_api.ConsumerInfo:
    """Create a durable consumer, or update its filters and limits in place. Returns its info."""
    try:
        info = await js.consumer_info(stream, config.durable_name)
    except NotFoundError:
        return await js.add_consumer(stream, config)
    live = info.config
    live_filters = sorted(live.filter_subjects or ([live.filter_subject] if live.filter_subject else []))
    want_filters = sorted(config.filter_subjects or ([config.filter_subject] if config.filter_subject else []))
    changed = (
        live_filters != want_filters
        or live.ack_wait != config.ack_wait
        or live.max_deliver != config.max_deliver
        or live.max_ack_pending != config.max_ack_pending
    )
    if not changed:
        return info
    log.info("updating consumer %s: filters %s -> %s", config.durable_name, live_filters, want_filters)
    # The deliver policy cannot change on a live consumer; keep the live one.
    config.deliver_policy = live.deliver_policy
    return await js.add_consumer(stream, config)
