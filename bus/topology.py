"""Streams and consumers declared as data and applied idempotently.

Consumers: `ensure_consumer` creates what is missing and updates filters and limits in place.

Streams: `ensure_stream` creates a missing stream from its declaration but never changes a live
one: the log *is* the event store, and a lower max age or max bytes deletes history. A live
stream that differs from a process's declaration is used as it is, with one warning naming each
differing field; only an operator changes it (`bus stream update`, through `update_stream`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import msgspec
import nats.errors
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

from bus.config import ConsumerSettings, StreamSettings
from bus.errors import BusUnavailable, ConfigurationError
from bus.subjects import Subjects

log = logging.getLogger("continuum.topology")

T = TypeVar("T")

_NS = 1_000_000_000
# How long a JetStream API call keeps retrying while nobody answers it: a stream or the meta
# group electing a leader (4-9 s in nats-server), or a cluster that formed a moment ago.
API_PATIENCE_S = 20.0
_API_BACKOFF_S = (0.05, 0.1, 0.2, 0.5)
# One attempt of a read (stream or consumer info) while waiting out an election. A leader answers
# in milliseconds; a request sent while there was none is never answered, so waiting on it for
# the API's whole timeout only delays seeing the new leader (a client starting during a leader's
# SIGSTOP met the election up to 2 s late). Reads are safe to send again.
READ_ATTEMPT_S = 1.0
# The server's answer when a stream was created (differently) between our look and our create.
_STREAM_NAME_IN_USE = 10058

# The stream fields a declaration can differ in, in the order they are reported.
STREAM_FIELDS = (
    "subjects", "max_age", "max_bytes", "duplicate_window", "num_replicas",
    "allow_direct", "allow_atomic", "deny_delete", "placement",
)
# What every Bus relies on in the log, whatever its settings: its subjects, direct get (stored
# replies), atomic batches (group commit), and no deletes. None of them removes a message.
LOG_FEATURES = ("subjects", "allow_direct", "allow_atomic", "deny_delete")
# Each StreamSettings field and the stream field it sets.
_SETTING_FIELDS = {
    "max_age_s": "max_age", "max_bytes": "max_bytes",
    "duplicate_window_s": "duplicate_window", "replicas": "num_replicas", "placement_tags": "placement",
}


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
        max_age=max_age,  # 0: forever, as the server reads it (stated, so it is compared too)
        max_bytes=settings.max_bytes,
        duplicate_window=window,
        num_replicas=settings.replicas,
        placement=placement(settings.placement_tags),
        allow_direct=True,
        allow_atomic=True,
        deny_delete=True,
    )


def placement(tags: tuple[str, ...] | list[str]) -> js_api.Placement | None:
    """Replicas only on servers carrying every tag; None: anywhere."""
    return js_api.Placement(tags=list(tags)) if tags else None


def advisory_stream_config(subjects: Subjects, settings: StreamSettings | None = None) -> js_api.StreamConfig:
    """Max-deliveries advisories made durable, so a dead letter is written even when every
    process that received the message died on it. Replicated and placed like the log
    (`settings`), so losing one node never loses it."""
    settings = settings or StreamSettings()
    return js_api.StreamConfig(
        name=subjects.advisory_stream,
        description="Continuum max-deliveries advisories",
        subjects=[subjects.max_deliveries_advisory("*")],
        retention=js_api.RetentionPolicy.LIMITS,
        storage=js_api.StorageType.FILE,
        max_age=7 * 24 * 3600,
        # The server's default, stated: left at nats-py's 0 it reads as drift on every start.
        duplicate_window=120.0,
        num_replicas=settings.replicas,
        placement=placement(settings.placement_tags),
    )


def stream_nodes(info: js_api.StreamInfo) -> list[str]:
    """The servers that take part in acking a stream's writes, by name: its leader, then the
    replicas that are current (one offline or lagging acks nothing until it has caught up).
    Empty on a single server (no cluster block)."""
    cluster = info.cluster
    if cluster is None or not cluster.leader and not cluster.replicas:
        return []
    names = [cluster.leader] if cluster.leader else []
    names.extend(
        r.name for r in cluster.replicas or []
        if r.name and r.name not in names and r.current and not r.offline
    )
    return names


def like_log(info: js_api.StreamInfo) -> StreamSettings:
    """The replicas and placement of a live log, for the internal streams that follow it."""
    config = info.config
    tags = tuple(config.placement.tags or []) if config.placement is not None else ()
    return StreamSettings(replicas=config.num_replicas or 1, placement_tags=tags)


async def ensure_advisory_stream(js: JetStreamContext, subjects: Subjects, log_info: js_api.StreamInfo) -> None:
    """The advisory stream, created replicated and placed like the live log when missing.
    Raises BusUnavailable, ConfigurationError."""
    await ensure_stream(js, advisory_stream_config(subjects, like_log(log_info)))


def log_stream_checks(settings: StreamSettings) -> tuple[str, ...]:
    """The log fields a Bus with `settings` compares with a live log: the features every Bus
    relies on, and the stream field of each setting chosen explicitly. A setting left at its
    default states no wish about a log that already exists, so a log an operator changed with
    `bus stream update` does not make every process with default settings complain."""
    default = StreamSettings()
    chosen = {
        stream_field
        for setting, stream_field in _SETTING_FIELDS.items()
        if getattr(settings, setting) != getattr(default, setting)
    }
    return tuple(f for f in STREAM_FIELDS if f in LOG_FEATURES or f in chosen)


def _leaderless(exc: BaseException) -> bool:
    """An API error that an election explains: no answer, no responders, 503."""
    return isinstance(exc, (nats.errors.TimeoutError, nats.errors.NoRespondersError, ServiceUnavailableError,
                            asyncio.TimeoutError))


async def patiently(
    call: Callable[[], Awaitable[T]], what: str, patience_s: float = API_PATIENCE_S, *, attempt_s: float | None = None
) -> T:
    """`await call()`, called again while the failure is one a leader election explains (no
    answer, no responders, 503), for up to `patience_s`: an election is a wait, not an error.
    With `attempt_s`, one attempt is given up after that long (for reads only: an abandoned
    write may still happen). Other errors, and the last one once patience runs out, are raised
    as they are."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience_s
    attempt = 0
    while True:
        try:
            async with asyncio.timeout(attempt_s):  # (None: no limit of its own)
                return await call()
        except Exception as exc:
            if not _leaderless(exc):
                raise
            pause = _API_BACKOFF_S[min(attempt, len(_API_BACKOFF_S) - 1)]
            if loop.time() + pause >= deadline:
                raise
            if attempt == 0:
                log.info("%s: no answer yet (%s); retrying for up to %.0fs", what, type(exc).__name__, patience_s)
            attempt += 1
            await asyncio.sleep(pause)


async def ensure_stream(
    js: JetStreamContext, config: js_api.StreamConfig, *, checked: Iterable[str] = STREAM_FIELDS
) -> js_api.StreamInfo:
    """Create the stream from `config` when it does not exist; return the live stream's info.

    An existing stream is used as it is, never updated. Each field in `checked` where it differs
    from `config` is named in one warning (live vs wanted); other differences are logged at debug.
    Raises ConfigurationError when the server refuses to create the stream (e.g. replicas > 1 on
    a single server), BusUnavailable when it does not answer.
    """
    what = f"setting up stream {config.name}"
    try:
        try:
            info = await patiently(lambda: js.stream_info(config.name), what, attempt_s=READ_ATTEMPT_S)
        except NotFoundError:
            try:
                return await patiently(lambda: js.add_stream(config), what)
            except APIError as exc:
                if exc.err_code != _STREAM_NAME_IN_USE:
                    raise
                # created by another process first
                info = await patiently(lambda: js.stream_info(config.name), what, attempt_s=READ_ATTEMPT_S)
    except (APIError, nats.errors.TimeoutError, nats.errors.NoRespondersError, asyncio.TimeoutError) as exc:
        raise _translated(exc, "set up", config.name) from exc
    compared = set(checked)
    differences = stream_differences(info.config, config)
    warned = [d for d in differences if d.field in compared]
    if warned:
        log.warning(
            "stream %s differs from this process's declaration, so it is used as it is: %s "
            "(run `bus stream update` to change it)",
            config.name, "; ".join(f"{d.field} live {d.live_text}, wanted {d.wanted_text}" for d in warned),
        )
    if rest := [d for d in differences if d.field not in compared]:
        log.debug("stream %s: settings this process left at their defaults differ: %s", config.name,
                  "; ".join(f"{d.field} live {d.live_text}, default {d.wanted_text}" for d in rest))
    return info


async def update_stream(js: JetStreamContext, config: js_api.StreamConfig) -> js_api.StreamInfo:
    """Apply `config` to the live stream: the operator's path (`bus stream update`), never a
    process's start. Raises ConfigurationError when the server refuses the change (its reason
    in the message), BusUnavailable when it does not answer."""
    try:
        return await patiently(lambda: js.update_stream(config), f"updating stream {config.name}")
    except (APIError, nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
        raise _translated(exc, "update", config.name) from exc


def _translated(exc: Exception, action: str, stream: str) -> Exception:
    if isinstance(exc, ServiceUnavailableError | nats.errors.TimeoutError | nats.errors.NoRespondersError):
        return BusUnavailable(
            f"the server did not answer a request to {action} stream {stream} ({type(exc).__name__}): "
            "is it running, with JetStream enabled?"
        )
    description = getattr(exc, "description", None) or type(exc).__name__
    hint = ""
    if "replica" in description.lower() or "insufficient resources" in description.lower() or "cluster" in description.lower():
        hint = (
            ": a replicated stream needs a JetStream cluster with at least that many servers (and tags, if "
            "placement tags are set); start one with `bus up --cluster 3`, or set BUS_REPLICAS=1"
        )
    return ConfigurationError(f"the server refused to {action} stream {stream}: {description}{hint}")


def log_stream_update(
    subjects: Subjects,
    live: js_api.StreamConfig,
    *,
    max_age_s: float | None = None,
    max_bytes: int | None = None,
    duplicate_window_s: float | None = None,
    replicas: int | None = None,
    placement_tags: tuple[str, ...] | None = None,
) -> js_api.StreamConfig:
    """The live log's config with the given settings changed (None: keep the live value) and the
    features every Bus relies on restored. A max age shorter than the duplicate window shortens
    the window with it (the server requires window <= max age), unless the window was given.

    Raises ConfigurationError when a given duplicate window is longer than the max age.
    """
    declared = log_stream_config(subjects, StreamSettings())
    changes: dict[str, Any] = {f: getattr(declared, f) for f in LOG_FEATURES}
    for field, value in (("max_age", max_age_s), ("max_bytes", max_bytes),
                         ("duplicate_window", duplicate_window_s), ("num_replicas", replicas)):
        if value is not None:
            changes[field] = value
    if placement_tags is not None:
        changes["placement"] = placement(placement_tags)
    wanted = dataclasses.replace(live, **changes)
    max_age = wanted.max_age or 0.0
    if max_age and wanted.duplicate_window > max_age:
        if duplicate_window_s is not None:
            raise ConfigurationError(
                f"the duplicate window ({describe('duplicate_window', duplicate_window_s)}) cannot be longer "
                f"than the max age ({describe('max_age', max_age)}): give a shorter --duplicate-window"
            )
        wanted.duplicate_window = max_age
    return wanted


def declared_stream_update(
    live: js_api.StreamConfig, declared: js_api.StreamConfig, *, clear_placement: bool = False
) -> js_api.StreamConfig:
    """The live stream's config with every field of STREAM_FIELDS that `declared` sets restored
    (a feature it leaves off is left as it is live); with `clear_placement`, no placement."""
    wanted = dataclasses.replace(
        live, **{f: v for f in STREAM_FIELDS if (v := getattr(declared, f)) is not None and v is not False}
    )
    if clear_placement:
        wanted.placement = None
    return wanted


class FieldChange(msgspec.Struct, frozen=True):
    """One stream field whose live value differs from the wanted one."""

    field: str
    live: Any
    wanted: Any

    @property
    def live_text(self) -> str:
        return describe(self.field, self.live)

    @property
    def wanted_text(self) -> str:
        return describe(self.field, self.wanted)

    @property
    def loss(self) -> str | None:
        """What applying it deletes, or None when it deletes nothing (a growth, a feature)."""
        if self.field == "max_age" and self.wanted and (not self.live or self.wanted < self.live):
            return f"messages older than {self.wanted_text} are deleted"
        if self.field == "max_bytes" and self.wanted >= 0 and (self.live < 0 or self.wanted < self.live):
            return f"the oldest messages beyond {self.wanted_text} are deleted"
        if self.field == "num_replicas" and self.wanted < self.live:
            return f"the copies of every message on {self.live - self.wanted} server(s) are deleted"
        return None


def stream_differences(live: js_api.StreamConfig, wanted: js_api.StreamConfig) -> list[FieldChange]:
    """The fields of STREAM_FIELDS that `wanted` sets and `live` has otherwise. A field `wanted`
    leaves None, or a feature it leaves off (False), is no wish: it is not compared."""
    changes = []
    for field in STREAM_FIELDS:
        want = getattr(wanted, field)
        if want is None or want is False:
            continue
        have, want = _comparable(field, getattr(live, field)), _comparable(field, want)
        if field in ("max_age", "duplicate_window"):
            # The server keeps nanoseconds: compare what it would store.
            same = int(have * _NS) == int(want * _NS)
        else:
            same = have == want
        if not same:
            changes.append(FieldChange(field, have, want))
    return changes


def _comparable(field: str, value: Any) -> Any:
    if field == "subjects":
        return sorted(value or [])
    if field in ("max_age", "duplicate_window"):
        return float(value or 0.0)
    if field == "max_bytes":
        return -1 if value is None or value <= 0 else int(value)  # the server stores 0 as -1
    if field == "num_replicas":
        return int(value or 1)
    if field == "placement":
        return tuple(sorted(getattr(value, "tags", None) or []))
    return bool(value)


def describe(field: str, value: Any) -> str:
    """A stream field's value for people: 'forever', '7d', 'unlimited', '1 GiB', 'default.>'."""
    if field == "max_age" and not value:
        return "forever"
    if field in ("max_age", "duplicate_window"):
        return _duration(float(value))
    if field == "max_bytes":
        return "unlimited" if value is None or value < 0 else _bytes(int(value))
    if field == "subjects":
        return ", ".join(value) or "(none)"
    if field == "placement":
        tags = value if isinstance(value, tuple) else _comparable("placement", value)
        return f"servers tagged {', '.join(tags)}" if tags else "any server"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.10g}s"


def _bytes(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            exact = n % size == 0
            return f"{n // size} {unit}" if exact else f"{n} B ({n / size:.1f} {unit})"
    return f"{n} B"


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


def agent_consumer_configs(
    subjects: Subjects, agent: str, tags: Sequence[str], settings: ConsumerSettings
) -> list[js_api.ConsumerConfig]:
    """The consumers an agent's messages reach it through: its inbox, and its tags' broadcasts
    when it has tags."""
    configs = [inbox_consumer_config(subjects, agent, settings)]
    if tags:
        configs.append(group_consumer_config(subjects, agent, list(tags), settings))
    return configs


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
    """Create a durable consumer, or update its filters and limits in place, waiting out a
    leader election (`patiently`). Returns its info; raises nats-py's errors."""
    what = f"setting up consumer {config.durable_name}"
    try:
        info = await patiently(lambda: js.consumer_info(stream, config.durable_name), what, attempt_s=READ_ATTEMPT_S)
    except NotFoundError:
        return await patiently(lambda: js.add_consumer(stream, config), what)
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
    return await patiently(lambda: js.add_consumer(stream, config), what)
