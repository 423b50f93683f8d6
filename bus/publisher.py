"""Durable publishing into the log.

`Publisher.publish` returns once the server has stored (and, under `sync_interval: always`,
fsynced) the message, with its stream sequence. This version sends one request per message.
"""

from __future__ import annotations

import asyncio
import re
import time
from types import TracebackType

import msgspec
import nats.errors
from nats.aio.client import Client as NATS

from bus.config import PublisherSettings
from bus.errors import BusUnavailable, ConcurrencyConflict, PermissionDenied
from bus.metrics import BusMetrics
from bus.subjects import Subjects


class PubAck(msgspec.Struct, frozen=True, kw_only=True):
    """The server's receipt: the stream and the sequence the message is stored at.
    `duplicate` is True when the message id was already stored (the original seq is returned)."""

    stream: str
    seq: int
    duplicate: bool = False


class _WirePubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    batch: str | None = None
    count: int | None = None
    error: "_WireError | None" = None


class _WireError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


_ack_decoder = msgspec.json.Decoder(_WirePubAck)
_WRONG_LAST = re.compile(r"wrong last sequence: (\d+)")
ERR_WRONG_LAST_SEQUENCE = 10071


def parse_puback(data: bytes, *, expected: int | None = None) -> PubAck:
    """Turn a PubAck reply into a `PubAck`, or raise the bus error it stands for.

    Raises ConcurrencyConflict (err 10071), PermissionDenied, or BusUnavailable for any other
    server error (with the server's description).
    """
    try:
        wire = _ack_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise BusUnavailable(f"unreadable publish ack {data[:200]!r}") from exc
    if wire.error is not None:
        err = wire.error
        if err.err_code == ERR_WRONG_LAST_SEQUENCE:
            match = _WRONG_LAST.search(err.description)
            actual = int(match.group(1)) if match else None
            raise ConcurrencyConflict(
                f"expected last sequence {expected}, server has {actual}", expected=expected, actual=actual
            )
        if "permission" in err.description.lower():
            raise PermissionDenied(err.description)
        raise BusUnavailable(f"publish rejected ({err.err_code}): {err.description}")
    if not wire.stream:
        raise BusUnavailable(f"no stream stored the message (reply {data[:200]!r}); is the stream declared?")
    return PubAck(stream=wire.stream, seq=wire.seq, duplicate=wire.duplicate)


def publish_headers(
    msg_id: str,
    headers: dict[str, str] | None,
    expected_last_subject_seq: int | None,
    expected_last_subject: str | None,
) -> dict[str, str]:
    """The NATS headers of one durable publish: dedup id and optional optimistic concurrency."""
    out = dict(headers) if headers else {}
    out["Nats-Msg-Id"] = msg_id
    if expected_last_subject_seq is not None:
        out["Nats-Expected-Last-Subject-Sequence"] = str(expected_last_subject_seq)
        if expected_last_subject:
            out["Nats-Expected-Last-Subject-Sequence-Subject"] = expected_last_subject
    return out


class Publisher:
    """Publishes into the log and waits for the server's ack. An async context manager."""

    def __init__(
        self, nc: NATS, *, subjects: Subjects, settings: PublisherSettings, metrics: BusMetrics
    ) -> None:
        self._nc = nc
        self._subjects = subjects
        self._settings = settings
        self._metrics = metrics

    async def __aenter__(self) -> "Publisher":
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def publish(
        self,
        subject: str,
        data: bytes,
        *,
        msg_id: str,
        headers: dict[str, str] | None = None,
        expected_last_subject_seq: int | None = None,
        expected_last_subject: str | None = None,
    ) -> PubAck:
        """Store `data` at `subject` with dedup id `msg_id`; return the server's receipt.

        With `expected_last_subject_seq`, the write succeeds only if the last message on
        `expected_last_subject` (default: `subject`; wildcards allowed) has that sequence (0: none).
        Raises ConcurrencyConflict, PermissionDenied, or BusUnavailable.
        """
        started = time.perf_counter()
        hdrs = publish_headers(msg_id, headers, expected_last_subject_seq, expected_last_subject)
        try:
            reply = await self._nc.request(subject, data, timeout=self._settings.ack_timeout_s, headers=hdrs)
        except (nats.errors.TimeoutError, asyncio.TimeoutError) as exc:
            raise BusUnavailable(f"no publish ack for {subject} within {self._settings.ack_timeout_s}s") from exc
        except nats.errors.NoRespondersError as exc:
            raise BusUnavailable(f"no stream captures {subject}; is the stream declared?") from exc
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError) as exc:
            raise BusUnavailable(f"not connected to NATS: {exc}") from exc
        try:
            ack = parse_puback(reply.data, expected=expected_last_subject_seq)
        except ConcurrencyConflict:
            self._metrics.occ_conflicts.inc()
            raise
        self._record(subject, ack, started)
        return ack

    def _record(self, subject: str, ack: PubAck, started: float) -> None:
        if ack.duplicate:
            self._metrics.publish_duplicates.inc()
        else:
            self._metrics.published.labels(self._subjects.kind_of_subject(subject)).inc()
        self._metrics.publish_seconds.observe(time.perf_counter() - started)
