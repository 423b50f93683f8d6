"""`bus send`, `bus broadcast`, `bus request` and `bus tail`: messages from the command line.

A payload is given as JSON with its `kind` ('{"kind":"note","text":"hi"}', or @file.json, or @-
for stdin) and decoded with the typed payload class of that kind, so a typo is refused here
with the known kinds or fields, never stored for an agent to choke on.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import fnmatch
import importlib
import signal
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js import api as js_api
from prometheus_client import CollectorRegistry, Counter

from bus.cli.common import (
    CliError,
    ReaderGone,
    add_connection_options,
    add_metrics_option,
    metrics_server,
    open_bus,
    out,
    positive_float,
    positive_int,
    since_time,
)
from bus.config import check_name
from schemas import DecodeError, Payload, PayloadRegistry, SchemaConflict, decode_loose
from schemas.envelope import PRIORITY_DEFAULT, PRIORITY_MAX, PRIORITY_MIN
from schemas.ids import id_problem, is_id
from schemas.registry import kind_of_raw

EXAMPLE_PAYLOAD = '{"kind":"note","text":"hi"}'
_SUBJECT_CLASSES = ("inbox", "group", "event", "reply", "dead")


def register(sub: argparse._SubParsersAction) -> None:
    send = sub.add_parser(
        "send", help="send a payload to one agent",
        description=f"Send a payload to the agent named AGENT, e.g. bus send alice '{EXAMPLE_PAYLOAD}'.",
    )
    send.add_argument("agent", help="recipient agent name")
    send.add_argument("payload", help="payload JSON with a \"kind\", or @file.json, or @- for stdin")
    _add_message_options(send)
    send.set_defaults(func=run_send)

    broadcast = sub.add_parser(
        "broadcast", help="send a payload to every agent carrying a tag",
        description="Broadcast a payload to every agent name carrying TAG (each name gets one copy).",
    )
    broadcast.add_argument("tag", help="tag the recipients carry")
    broadcast.add_argument("payload", help="payload JSON with a \"kind\", or @file.json, or @- for stdin")
    _add_message_options(broadcast)
    broadcast.set_defaults(func=run_broadcast)

    request = sub.add_parser(
        "request", help="send a request to one agent and print its reply",
        description="Send a request to AGENT and wait for its reply; both are stored in the log.",
    )
    request.add_argument("agent", help="agent to ask")
    request.add_argument("payload", help="payload JSON with a \"kind\", or @file.json, or @- for stdin")
    request.add_argument("--timeout", type=positive_float, default=5.0, help="seconds to wait (default %(default)s)")
    _add_message_options(request)
    request.set_defaults(func=run_request)

    tail = sub.add_parser(
        "tail", help="print envelopes live as they are stored",
        description="Print one line per stored envelope: time, kind, from -> to (or #tag, event, dead, "
        "reply), correlation id (its last 8 characters; `bus trace` takes them), stream sequence. New "
        "envelopes only, unless --all, --since-seq or --since.",
    )
    tail.add_argument(
        "filter", nargs="?", default=">",
        help="subject filter relative to the namespace, e.g. 'inbox.alice.>' or 'group.team.*' (default: everything)",
    )
    start = tail.add_mutually_exclusive_group()
    start.add_argument("--all", action="store_true", help="start from the first stored envelope")
    start.add_argument("--since-seq", type=positive_int, metavar="N", help="start from stream sequence N")
    start.add_argument(
        "--since", type=since_time, metavar="WHEN",
        help="start from what was stored at or after WHEN: an ISO time (local unless it names a zone) "
        "or an age (90s, 10m, 2h, 1d)",
    )
    tail.add_argument(
        "--kind", action="append", default=[], metavar="K",
        help="only this kind (repeatable; shell patterns such as 'block.*' work)",
    )
    tail.add_argument(
        "--corr", metavar="ID",
        help="only this conversation: its correlation id, or the short form tail prints (its last characters)",
    )
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    tail.add_argument(
        "--count", "--limit", dest="limit", type=positive_int, default=None, metavar="N",
        help="exit after printing N envelopes",
    )
    add_connection_options(tail)
    add_metrics_option(tail)
    tail.set_defaults(func=run_tail)


def _add_message_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="sender", default="cli", help="sender name (default %(default)s)")
    parser.add_argument(
        "--priority", type=_priority, default=PRIORITY_DEFAULT,
        help=f"{PRIORITY_MIN} (lowest) to {PRIORITY_MAX} (highest); default %(default)s",
    )
    parser.add_argument(
        "--expires-in", type=positive_float, default=None, metavar="SECONDS",
        help="not handled if it reaches the agent later than this",
    )
    parser.add_argument("--correlation-id", default=None, help="the conversation's id, a UUID in lowercase text (default: the envelope id)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_types_option(parser)
    add_connection_options(parser)


def add_types_option(parser: argparse.ArgumentParser) -> None:
    """--types MODULE (repeatable): payload types beyond the built-ins."""
    parser.add_argument(
        "--types", action="append", default=[], metavar="MODULE",
        help="also know the payload types of MODULE (its PAYLOADS tuple, else every tagged "
        "schemas.Payload subclass in it); repeatable",
    )


def _priority(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not PRIORITY_MIN <= value <= PRIORITY_MAX:
        raise argparse.ArgumentTypeError(f"{value} is outside {PRIORITY_MIN}..{PRIORITY_MAX}")
    return value




# -- payloads ----------------------------------------------------------------------------------


def payload_registry(modules: Sequence[str]) -> PayloadRegistry:
    """The built-in payload types plus those of `modules`. Raises CliError on a bad module."""
    extra: list[type] = []
    # Modules next to the user's files import without PYTHONPATH, as `bus agent start mod:Cls`
    # finds its agent class.
    workdir = os.getcwd()
    if modules and workdir not in sys.path:
        sys.path.insert(0, workdir)
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise CliError(f"--types {name}: cannot import it ({exc}); give an importable module path") from exc
        found = getattr(module, "PAYLOADS", None)
        if found is None:
            found = [
                value for value in vars(module).values()
                if isinstance(value, type) and issubclass(value, Payload) and value is not Payload
                and isinstance(value.__struct_config__.tag, str)
            ]
        if not found:
            raise CliError(
                f"--types {name}: no payload types in it (define schemas.Payload subclasses with tag='...', "
                "or a PAYLOADS tuple)"
            )
        extra.extend(found)
    try:
        return PayloadRegistry.with_builtins(*extra)
    except SchemaConflict as exc:
        raise CliError(f"--types: {exc}") from exc


def parse_payload(text: str, registry: PayloadRegistry) -> Any:
    """Decode a payload argument (JSON, @file or @-) into its typed payload.

    Raises CliError naming what was wrong: not JSON, no or unknown kind (with the known kinds),
    a missing, unknown or mistyped field (with the kind's fields).
    """
    raw = _read_payload_arg(text)
    try:
        obj = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise CliError(f"the payload is not valid JSON ({exc}); give an object such as '{EXAMPLE_PAYLOAD}'") from exc
    if not isinstance(obj, dict):
        raise CliError(
            f"the payload must be a JSON object with a \"kind\", not {type(obj).__name__}; e.g. '{EXAMPLE_PAYLOAD}'"
        )
    kinds = registry.kinds()
    kind = obj.get("kind")
    if kind is None:
        raise CliError(f"the payload has no \"kind\"; known kinds: {', '.join(kinds)}")
    typ = registry.type_for(kind) if isinstance(kind, str) else None
    if typ is None:
        close = difflib.get_close_matches(str(kind), kinds, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise CliError(
            f"unknown kind {kind!r}{hint}; known kinds: {', '.join(kinds)} (add your own with --types MODULE)"
        )
    names = {f.encode_name for f in msgspec.structs.fields(typ)}
    unknown = sorted(set(obj) - names - {"kind"})
    if unknown:
        raise CliError(f"unknown field(s) {', '.join(map(repr, unknown))} for kind {kind!r}; {describe_fields(typ)}")
    try:
        return msgspec.json.decode(raw, type=typ)
    except msgspec.ValidationError as exc:
        raise CliError(f"invalid {kind!r} payload: {exc}; {describe_fields(typ)}") from exc


def describe_fields(typ: type) -> str:
    """'fields of <kind>: a: str (required), b: int (optional)' for a payload type."""
    parts = []
    for field in msgspec.structs.fields(typ):
        parts.append(f"{field.encode_name}: {_type_name(field.type)} ({'required' if field.required else 'optional'})")
    return f"fields of {typ.__struct_config__.tag!r}: {', '.join(parts) or 'none'}"


def _type_name(typ: Any) -> str:
    if isinstance(typ, type) and not getattr(typ, "__args__", None):
        return typ.__name__
    return str(typ).replace("typing.", "").replace("datetime.", "")


def _read_payload_arg(text: str) -> bytes:
    if not text.startswith("@"):
        return text.encode()
    source = text[1:]
    if source == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read the payload file {source!r}: {exc.strerror or exc}") from exc


def _message_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The envelope fields the options give. Raises CliError for a correlation id the agents'
    decoder would refuse (in the words of their dead letter)."""
    fields: dict[str, Any] = {"priority": args.priority, "expires_in_s": args.expires_in}
    if args.correlation_id:
        if not is_id(args.correlation_id):
            raise CliError(id_problem("correlation_id", args.correlation_id))
        fields["correlation_id"] = args.correlation_id
    return fields


# -- send / broadcast / request ----------------------------------------------------------------


async def run_send(args: argparse.Namespace) -> int:
    """Send one payload to an agent and print its id and stream sequence."""
    check_name(args.agent, "agent name")
    check_name(args.sender, "sender name")
    registry = payload_registry(args.types)
    payload = parse_payload(args.payload, registry)
    fields = _message_fields(args)
    async with open_bus(args, name=args.sender, registry=registry) as bus:
        sent = await bus.send(args.agent, payload, **fields)
    _print_sent(args, sent, f"to {args.agent}")
    return 0


async def run_broadcast(args: argparse.Namespace) -> int:
    """Broadcast one payload to a tag and print its id and stream sequence."""
    check_name(args.tag, "tag")
    check_name(args.sender, "sender name")
    registry = payload_registry(args.types)
    payload = parse_payload(args.payload, registry)
    fields = _message_fields(args)
    async with open_bus(args, name=args.sender, registry=registry) as bus:
        sent = await bus.broadcast(args.tag, payload, **fields)
    _print_sent(args, sent, f"to #{args.tag}")
    return 0


def _print_sent(args: argparse.Namespace, sent: Any, where: str) -> None:
    envelope, ack = sent.envelope, sent.ack
    if args.json:
        out(msgspec.json.encode({
            "id": envelope.id, "kind": envelope.kind, "seq": ack.seq, "stream": ack.stream,
            "duplicate": ack.duplicate, "correlation_id": envelope.correlation_id,
        }).decode())
        return
    note = " (duplicate: already stored)" if ack.duplicate else ""
    out(f"sent {envelope.kind} {where}: id {envelope.id}, seq {ack.seq}{note}")


async def run_request(args: argparse.Namespace) -> int:
    """Send a request, wait for the reply, print its kind and payload. A timeout or a failed
    handler exits 1 (RequestTimeout / RemoteError)."""
    check_name(args.agent, "agent name")
    check_name(args.sender, "sender name")
    registry = payload_registry(args.types)
    payload = parse_payload(args.payload, registry)
    fields = _message_fields(args)
    async with open_bus(args, name=args.sender, registry=registry) as bus:
        loop = asyncio.get_running_loop()
        started = loop.time()
        reply = await bus.request(args.agent, payload, timeout_s=args.timeout, **fields)
        elapsed_ms = (loop.time() - started) * 1000
        reply_seq = await _stored_seq(bus, bus.subjects.reply(args.sender, reply.causation_id or "", args.agent))
    body = msgspec.json.encode(reply.payload).decode()
    if args.json:
        out(msgspec.json.encode({
            "request_id": reply.causation_id, "reply_id": reply.id, "kind": reply.kind, "from": reply.sender,
            "seq": reply_seq, "elapsed_ms": round(elapsed_ms, 3), "payload": msgspec.Raw(body.encode()),
        }).decode())
        return 0
    out(f"request {reply.causation_id} to {args.agent}")
    out(f"reply {reply.kind} from {reply.sender} in {elapsed_ms:.1f} ms (seq {reply_seq}): {body}")
    return 0


async def _stored_seq(bus: Any, subject: str) -> int | None:
    stored = await bus.transport.direct_get(bus.subjects.stream, {"last_by_subj": subject})
    return None if stored is None else stored.seq


# -- tail --------------------------------------------------------------------------------------


def subject_filter(namespace: str, relative: str) -> str:
    """`<namespace>.<relative>` after checking it is a valid filter that can match something.

    Raises CliError with examples otherwise.
    """
    if relative.startswith(f"{namespace}."):
        relative = relative[len(namespace) + 1:]
    tokens = relative.split(".")
    examples = "e.g. 'inbox.alice.>', 'group.team.*', 'event.alice.>' or '>'"
    bad = (
        any(not t or any(c.isspace() for c in t) for t in tokens)
        or any(">" in t and (t != ">" or i != len(tokens) - 1) for i, t in enumerate(tokens))
        or any("*" in t and t != "*" for t in tokens)
    )
    if bad:
        raise CliError(f"invalid subject filter {relative!r}: tokens are separated by '.', '*' matches one, "
                       f"'>' (last) matches the rest; {examples}")
    if tokens[0] not in (*_SUBJECT_CLASSES, "*", ">"):
        raise CliError(f"subject filter {relative!r} matches nothing: subjects start with "
                       f"{', '.join(_SUBJECT_CLASSES)}; {examples}")
    return f"{namespace}.{relative}"


class _TailPrinter:
    """Formats each stored message as one line (or JSON object); never raises on bad bytes."""

    def __init__(self, args: argparse.Namespace, subjects: Any) -> None:
        self.kinds: list[str] = args.kind
        # A conversation, as its whole id or the short form this command prints (its end).
        self.correlation: str | None = (args.corr or "").strip() or None
        self.json = args.json
        self.subjects = subjects
        self.printed = 0

    def handle(self, msg: Msg) -> bool:
        """Print `msg` unless filtered out. Returns True when it was printed."""
        meta = msg.metadata
        seq, stamp = meta.sequence.stream, meta.timestamp
        try:
            envelope = decode_loose(msg.data)
            kind = kind_of_raw(envelope.payload)
        except DecodeError as exc:
            if self.kinds:
                return False
            self._undecodable(msg.subject, seq, stamp, str(exc))
            return True
        if kind is None:
            if self.kinds:
                return False
            self._undecodable(msg.subject, seq, stamp, "payload has no kind")
            return True
        if self.kinds and not any(fnmatch.fnmatchcase(kind, pattern) for pattern in self.kinds):
            return False
        if self.correlation is not None and not (envelope.correlation_id or "").endswith(self.correlation):
            return False
        if not kind.isprintable():
            kind = ascii(kind)  # anyone may name a kind: no escape sequences reach the terminal
        if self.json:
            out(msgspec.json.encode({
                "seq": seq, "subject": msg.subject, "time": stamp, "kind": kind, "envelope": envelope,
            }).decode())
        else:
            corr = (envelope.correlation_id or "")[-8:]
            out(f"{_clock(stamp)}  {kind:<24} {self._route(msg.subject, envelope):<32} "
                f"corr {corr or '-':<8}  seq {seq}")
        self.printed += 1
        return True

    def _route(self, subject: str, envelope: Any) -> str:
        klass = self.subjects.kind_of_subject(subject)
        if klass == "group" or envelope.tag is not None:
            return f"{envelope.sender} → #{envelope.tag}"
        if klass == "event":
            return f"{envelope.sender} (event)"
        if klass == "dead":
            return f"{envelope.sender} (dead letter)"
        if klass == "reply":
            return f"{envelope.sender} → {envelope.to} (reply)"
        if envelope.to is not None:
            return f"{envelope.sender} → {envelope.to}"
        return f"{envelope.sender} ({subject})"

    def _undecodable(self, subject: str, seq: int, stamp: datetime, reason: str) -> None:
        if self.json:
            out(msgspec.json.encode(
                {"seq": seq, "subject": subject, "time": stamp, "undecodable": reason[:500]}
            ).decode())
        else:
            out(f"{_clock(stamp)}  {'(undecodable)':<24} {subject:<32} {ascii(reason[:120])[1:-1]}  seq {seq}")
        self.printed += 1


def _clock(stamp: datetime) -> str:
    return stamp.astimezone().strftime("%H:%M:%S.%f")[:-3]


async def run_tail(args: argparse.Namespace) -> int:
    """Follow the log with an ordered consumer until Ctrl-C, SIGTERM or --limit."""
    subject = subject_filter(args.namespace, args.filter)
    metrics = CollectorRegistry()
    shown = Counter("continuum_tail_printed_total", "Envelopes printed by `bus tail`.", registry=metrics)
    async with open_bus(args, name="cli-tail", metrics_registry=metrics) as bus:
        printer = _TailPrinter(args, bus.subjects)
        done = asyncio.Event()
        gone = asyncio.Event()  # the reader of standard output went away

        async def on_message(msg: Msg) -> None:
            if done.is_set():
                return
            try:
                printed = printer.handle(msg)
            except ReaderGone:
                # Raised into nats-py's callback it would only be logged, once per envelope.
                gone.set()
                done.set()
                return
            if printed:
                shown.inc()
                if args.limit is not None and printer.printed >= args.limit:
                    done.set()

        config = js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.NEW)
        if args.all:
            config.deliver_policy = js_api.DeliverPolicy.ALL
        elif args.since_seq is not None:
            config.deliver_policy = js_api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = args.since_seq
        elif args.since is not None:
            config.deliver_policy = js_api.DeliverPolicy.BY_START_TIME
            config.opt_start_time = args.since
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, done.set)
        try:
            with metrics_server(metrics, args.metrics_port):
                sub = await bus.js.subscribe(
                    subject, cb=on_message, stream=bus.subjects.stream, ordered_consumer=True, config=config
                )
                try:
                    where = "from the start" if args.all else (
                        f"from seq {args.since_seq}" if args.since_seq else (
                            f"since {args.since.astimezone():%Y-%m-%d %H:%M:%S}" if args.since else "new envelopes"))
                    sys.stderr.write(f"tailing {subject} on {bus.config.url} ({where}; Ctrl-C to stop)\n")
                    sys.stderr.flush()
                    await done.wait()
                finally:
                    await sub.unsubscribe()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    if gone.is_set():
        raise ReaderGone()
    return 0
