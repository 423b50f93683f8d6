"""`bus stream info` (the live settings and counts of the log and advisory streams) and
`bus stream update` (the one way the log's settings change).

A process never changes a live stream (bus.topology.ensure_stream); an operator does, here.
An update that can delete stored messages (a shorter max age, a lower max bytes, fewer
replicas) is refused without --force.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import msgspec
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from bus.cli.common import CliError, add_connection_options, non_negative_float, open_bus, out, positive_int
from bus.config import StreamSettings
from bus.object_store import object_store_config, stream_of
from bus.privacy.keyring import key_bucket_config
from bus.topology import (
    FieldChange,
    advisory_stream_config,
    declared_stream_update,
    describe,
    log_stream_update,
    placement,
    stream_differences,
    update_stream,
)

# The server's floor for max age and the duplicate window.
MIN_SECONDS = 0.1
# The server counts nanoseconds in an int64 (292 years); a century is past any real retention.
MAX_SECONDS = 100 * 365 * 86400
MAX_BYTES = (1 << 63) - 1
# The most replicas JetStream keeps of a stream.
MAX_REPLICAS = 5
_BYTE_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_BYTE_LIMIT = re.compile(r"^\s*(\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def register(sub: argparse._SubParsersAction) -> None:
    stream = sub.add_parser(
        "stream", help="the log stream's live settings: show them, change them",
        description="Show or change the namespace's log stream. Processes never change a live log; "
        "only `bus stream update` does.",
    )
    stream_sub = stream.add_subparsers(dest="stream_command", metavar="ACTION")
    stream_sub.required = True

    info = stream_sub.add_parser(
        "info", help="the live settings and message counts of the log and advisory streams",
        description="Print the live max age, max bytes, duplicate window, replicas and features of the "
        "log stream and the advisory stream, with their message counts and sequences.",
    )
    info.add_argument("--json", action="store_true", help="print one JSON object")
    add_connection_options(info)
    info.set_defaults(func=run_info)

    update = stream_sub.add_parser(
        "update", help="change the log's retention, duplicate window or replicas",
        description="Change the live log stream's settings (unset options keep their live value), print "
        "each change as old -> new, and restore the features every process relies on (direct get, atomic "
        "batches, no deletes, its subjects) and the advisory stream's declaration. A change that can "
        "delete stored messages is refused without --force.",
    )
    update.add_argument("--max-age", type=max_age_seconds, metavar="SECONDS",
                        help="delete messages older than this (0 = keep forever)")
    update.add_argument("--max-bytes", type=byte_limit, metavar="BYTES",
                        help="delete the oldest messages beyond this size (-1 = unlimited; suffixes KiB, MiB, GiB, TiB)")
    update.add_argument("--duplicate-window", type=window_seconds, metavar="SECONDS",
                        help="how long a re-sent envelope id is recognised and stored once")
    update.add_argument("--placement-tags", type=_tags, metavar="TAG,...", default=None,
                        help="keep the replicas only on servers with all these server_tags ('' for any server)")
    update.add_argument("--replicas", type=replica_count, metavar="N",
                        help=f"copies of the log on a cluster (1..{MAX_REPLICAS}; a single server keeps 1)")
    update.add_argument("--force", action="store_true",
                        help="apply a change that deletes stored messages (shorter max age, lower max bytes, "
                        "fewer replicas)")
    add_connection_options(update)
    update.set_defaults(func=run_update)


# -- argument types ----------------------------------------------------------------------------


def max_age_seconds(text: str) -> float:
    """An argparse type: 0 (forever) or 0.1 s .. 100 years, in seconds."""
    value = non_negative_float(text)
    return 0.0 if value == 0 else _bounded_seconds(text, value)


def window_seconds(text: str) -> float:
    """An argparse type: 0.1 s .. 100 years, in seconds."""
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text} must be at least {MIN_SECONDS} seconds")
    return _bounded_seconds(text, value)


def _bounded_seconds(text: str, value: float) -> float:
    if value < MIN_SECONDS:
        raise argparse.ArgumentTypeError(f"{text} is under the server's minimum of {MIN_SECONDS} seconds")
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text} is over {MAX_SECONDS} seconds (100 years)")
    return value


def byte_limit(text: str) -> int:
    """An argparse type: -1 (unlimited) or 1 .. 2^63-1 bytes, with an optional KiB/MiB/GiB/TiB."""
    if text.strip() == "-1":
        return -1
    match = _BYTE_LIMIT.match(text)
    if match is None or match.group(2).lower() not in _BYTE_UNITS:
        raise argparse.ArgumentTypeError(
            f"{_shown(text)!r} is not a size: give whole bytes (e.g. 1073741824 or 1GiB; units KiB, MiB, GiB, TiB), "
            "or -1 for unlimited"
        )
    digits = match.group(1)
    # Checked before int(): a thousand-digit "size" is an error to report, not to compute.
    value = int(digits) * _BYTE_UNITS[match.group(2).lower()] if len(digits) <= 20 else MAX_BYTES + 1
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1 byte (or -1 for unlimited)")
    if value > MAX_BYTES:
        raise argparse.ArgumentTypeError(f"{_shown(text)} is over the server's limit of {MAX_BYTES} bytes")
    return value


def _shown(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."


def replica_count(text: str) -> int:
    """An argparse type: 1 .. MAX_REPLICAS."""
    value = positive_int(text)
    if value > MAX_REPLICAS:
        raise argparse.ArgumentTypeError(f"{value} is more than JetStream's {MAX_REPLICAS} replicas")
    return value


# -- info --------------------------------------------------------------------------------------


class StreamView(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    messages: int
    bytes: int
    first_seq: int
    last_seq: int
    max_age_s: float  # 0: forever
    max_bytes: int  # -1: unlimited
    duplicate_window_s: float
    replicas: int
    subjects: list[str]
    allow_direct: bool
    allow_atomic: bool
    deny_delete: bool


class StreamsView(msgspec.Struct, frozen=True, kw_only=True):
    namespace: str
    log: StreamView
    advisories: StreamView


async def run_info(args: argparse.Namespace) -> int:
    """Print both streams' live settings and counts; exit 2 with a hint when no server runs."""
    async with open_bus(args, name="cli-stream") as bus:
        view = StreamsView(
            namespace=bus.subjects.ns,
            log=_view(await bus.js.stream_info(bus.subjects.stream)),
            advisories=_view(await bus.js.stream_info(bus.subjects.advisory_stream)),
        )
    if args.json:
        out(msgspec.json.encode(view).decode())
        return 0
    for label, stream in (("log", view.log), ("advisories", view.advisories)):
        out(f"{label:<12} {stream.name}: {stream.messages} messages, {stream.bytes} bytes, "
            f"seq {stream.first_seq}..{stream.last_seq}")
        for field, value in (
            ("max_age", stream.max_age_s), ("max_bytes", stream.max_bytes),
            ("duplicate_window", stream.duplicate_window_s), ("num_replicas", stream.replicas),
            ("subjects", stream.subjects), ("allow_direct", stream.allow_direct),
            ("allow_atomic", stream.allow_atomic), ("deny_delete", stream.deny_delete),
        ):
            out(f"  {field:<17} {describe(field, value)}")
    return 0


def _view(info: Any) -> StreamView:
    config, state = info.config, info.state
    return StreamView(
        name=config.name, messages=state.messages, bytes=state.bytes,
        first_seq=state.first_seq, last_seq=state.last_seq,
        max_age_s=float(config.max_age or 0.0),
        max_bytes=config.max_bytes if config.max_bytes and config.max_bytes > 0 else -1,
        duplicate_window_s=float(config.duplicate_window or 0.0),
        replicas=config.num_replicas or 1, subjects=list(config.subjects or []),
        allow_direct=bool(config.allow_direct), allow_atomic=bool(config.allow_atomic),
        deny_delete=bool(config.deny_delete),
    )


# -- update ------------------------------------------------------------------------------------


async def run_update(args: argparse.Namespace) -> int:
    """Apply the requested settings to the live log (and restore the advisory stream's declaration).

    Raises CliError (exit 2) when a change would delete stored messages and --force is not given,
    or when no server runs; ConfigurationError (exit 2) when the server refuses the change.
    """
    async with open_bus(args, name="cli-stream") as bus:
        subjects = bus.subjects
        live_log = (await bus.js.stream_info(subjects.stream)).config
        wanted_log = log_stream_update(
            subjects, live_log, max_age_s=args.max_age, max_bytes=args.max_bytes,
            duplicate_window_s=args.duplicate_window, replicas=args.replicas,
            placement_tags=args.placement_tags,
        )
        pairs = [(live_log, wanted_log)]
        # The internal streams (advisories, the key store of private records, the archive's object
        # store bucket) follow the log's
        # replicas and placement.
        like_log = StreamSettings(
            replicas=wanted_log.num_replicas or 1,
            placement_tags=tuple(wanted_log.placement.tags or []) if wanted_log.placement else (),
        )
        internal = (
            (subjects.advisory_stream, advisory_stream_config(subjects, like_log)),
            (subjects.keys_stream, key_bucket_config(subjects, like_log.replicas, placement(like_log.placement_tags))),
            (stream_of(subjects.archive_bucket),
             object_store_config(subjects.archive_bucket, like_log.replicas, placement(like_log.placement_tags))),
        )
        for name, declared in internal:
            try:
                live_internal = (await bus.js.stream_info(name)).config
            except NotFoundError:
                continue  # created when first needed, replicated like the log is then
            pairs.append((live_internal, declared_stream_update(
                live_internal, declared, clear_placement=not like_log.placement_tags,
            )))
        plans: list[tuple[js_api.StreamConfig, list[FieldChange]]] = []
        for live, wanted in pairs:
            if changes := stream_differences(live, wanted):
                plans.append((wanted, changes))
        if not plans:
            out(f"nothing to change: {subjects.stream} already has {_summary(live_log)}")
            return 0
        losses = [f"{wanted.name} {c.field} {c.live_text} -> {c.wanted_text}: {c.loss}"
                  for wanted, changes in plans for c in changes if c.loss]
        if losses and not args.force:
            raise CliError(
                "refusing to change the log in a way that deletes stored messages: " + "; ".join(losses)
                + ". Nothing was changed; run again with --force to apply it"
            )
        for wanted, changes in plans:
            await update_stream(bus.js, wanted)
            for c in changes:
                out(f"{wanted.name}: {c.field} {c.live_text} -> {c.wanted_text}")
            out(f"updated {wanted.name} ({len(changes)} change{'s' if len(changes) != 1 else ''})")
    return 0


def _summary(config: js_api.StreamConfig) -> str:
    return ", ".join(
        f"{field} {describe(field, getattr(config, field))}"
        for field in ("max_age", "max_bytes", "duplicate_window", "num_replicas", "placement")
    )


def _tags(text: str) -> tuple[str, ...]:
    tags = tuple(t.strip() for t in text.split(",") if t.strip())
    if any(" " in t for t in tags):
        raise argparse.ArgumentTypeError(f"{text!r}: tags are comma-separated, without spaces")
    return tags
