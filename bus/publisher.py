"""Durable publishing into the log, with group commit.

`Publisher.publish` returns once the server has stored (and, under `sync_interval: always`,
fsynced) the message, with its stream sequence. With an fsync per write, one request per
message caps near 1-3k msg/s; concurrent calls are therefore coalesced into JetStream atomic
batches, which the server fsyncs a few times per commit instead of once per message:

    publish() ─► queue ─► former:    takes what queued (≤ max_batch) as one unit; sends a
                                     batch's messages at once, all but the committing one
                          committer: sends each unit's commit in queue order, and settles the
                                     unit (acks, recovery, errors) before the next commit

No linger timer: a lone publish goes out at once as a plain request, and batches form from
what queued while earlier units were committing. A unit smaller than `min_atomic_batch` is sent
as pipelined single requests: an atomic batch has a fixed server-side cost of a few ms, so group
commit only pays once the queue is deep (light traffic keeps sub-millisecond latency). Up to `max_inflight_batches` units are on
their way (staged at the server or committing), but only one commit is outstanding: the
server applies a stream's writes one at a time anyway, and a unit that needs recovery (a
duplicate id, a lost ack) is settled before any later unit commits, so publishes fired in order
by one task are stored in that order on the recovery paths too. A staged batch that is never
committed stores nothing; the server drops it after its 10 s idle timeout.

What each caller gets, whatever else shares its commit:
- its own message's sequence (a batch's messages are stored contiguously, ending at the
  commit's sequence); `duplicate=True` with the original sequence if the id was stored before;
- ConcurrencyConflict for its own stale expected-sequence check only;
- BusUnavailable when no ack came within `ack_timeout_s` (it may be stored: re-publishing with
  the same msg_id is safe), when the server rejected a whole batch for a batch-level reason,
  or when the publisher closed; ConfigurationError for a message the protocol cannot carry.
A rejected batch stores nothing; its messages are re-sent one by one so that each caller gets
its own outcome. A commit whose ack was lost with the connection is re-sent with the same ids.

The wire: frames go out through a `WireConnection` (bus.wire; coalesced into one socket write
per loop turn) and the acks come back on an inbox subscription of that connection, as raw bytes
handed over from the socket callback. A lost connection is told by its `reconnects` counter
moving (or it being down). The only other I/O, reading back a stored message after a failed
expected-sequence check, is a JetStream API call on the control-plane client.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal

import msgspec

from bus.config import PublisherSettings
from bus.errors import BusUnavailable, ConcurrencyConflict, ConfigurationError, PermissionDenied
from bus.metrics import BusMetrics
from bus.refusal import Refusal, acting_as
from bus.puback import (
    BATCH_LEVEL_ERRORS,
    ERR_BATCH_INCOMPLETE,
    ERR_WRONG_LAST_SEQUENCE,
    PubAck,
    WirePubAck,
    ack_error,
    decode_ack,
    publish_headers,
)
from bus.subjects import Subjects
from bus.transport import Transport
from bus.wire.connection import WireConnection
from bus.wire.hpub import SPACE_OR_CONTROL, encode_batch, encode_single, header_block
from bus.wire.protocol import parse_status

__all__ = ["PubAck", "Publisher"]

log = logging.getLogger("continuum.publisher")

_SUBJECT_CACHE_MAX = 4096


class _Entry(msgspec.Struct, gc=False):
    """One publish() call on its way. Untracked by the garbage collector (it holds no cycle:
    the caller's frame keeps the future, not the entry): thousands are in flight at once."""

    subject: bytes
    data: bytes
    hdr: bytes  # "NATS/1.0" + header lines, without the closing blank line
    msg_id: str
    kind: str  # subject class, the `published` metric's label
    expected: int | None
    future: Any  # asyncio.Future[PubAck]
    started: float
    deadline: float
    # Later calls with the same msg_id in the same unit: sent once, answered as duplicates.
    followers: list[_Entry] | None = None
    # The ack inbox subject of its latest plain-request attempt (b"": none yet, or in a batch).
    reply: bytes = b""


class _Reply(msgspec.Struct, gc=False):
    """A reply on the ack inbox, as the connection handed it over."""

    header: bytes  # b"" when it has none
    data: bytes


class _Unit:
    """What one commit carries: one plain publish, or an atomic batch of ≥ 2 messages."""

    __slots__ = ("entries", "staged", "commit", "reply", "staged_on", "sent", "attempts")

    def __init__(self, entries: list[_Entry]) -> None:
        self.entries = entries
        self.staged = b""  # a batch's frames before the commit
        self.commit = b""
        self.reply = b""
        # The connection (reconnect count) the staged frames were written on, if written.
        self.staged_on: int | None = None
        # A commit went out at least once: failing now, the batch may have been stored.
        self.sent = False
        self.attempts = 0  # answered "no responders" (no leader) so far

    @property
    def deadline(self) -> float:
        return min(e.deadline for e in self.entries)


_Outcome = Literal["done", "resend", "one_by_one"]
# Refused subjects remembered (refused again without a round trip) for this long, at most this many.
_REFUSED_FOR_S = 5.0
_REFUSED_MAX = 256
# An unanswered commit checks this often whether the connection was lost (its reply would then
# never come, and the unit is re-sent with the same message ids).
_RECONNECT_CHECK_S = 0.1
# How long leaving waits for the server to confirm the ack inbox's unsubscription.
_UNSUBSCRIBE_DRAIN_S = 0.5
# Waits before re-sending what no stream leader took (503: an election in progress), doubling.
_LEADERLESS_BACKOFF_S = (0.05, 0.1, 0.2, 0.4)


class Publisher:
    """Publishes into the log with group commit and waits for the server's ack.

    An async context manager: entering subscribes to the ack inbox on `conn` and starts the two
    tasks it owns; leaving sends what is queued and waits for the acks, then stops them (bounded).
    `conn` belongs to the caller, who connects it first, keeps its `run()` going and closes it
    after the publisher. `transport` (the control plane) only reads back a message after a failed
    expected-sequence check.
    """

    def __init__(
        self,
        conn: WireConnection,
        transport: Transport,
        *,
        subjects: Subjects,
        settings: PublisherSettings,
        metrics: BusMetrics,
    ) -> None:
        self._conn = conn
        self._transport = transport
        self._subjects = subjects
        self._settings = settings
        self._metrics = metrics
        self._max_batch = settings.max_batch
        self._queue: collections.deque[_Entry] = collections.deque()
        self._wake_former = asyncio.Event()
        self._units: asyncio.Queue[_Unit | None] = asyncio.Queue()
        self._slots = asyncio.Semaphore(settings.max_inflight_batches)
        self._waiting_units = 0  # formed, not yet committing
        self._replies: dict[bytes, asyncio.Future[_Reply | None]] = {}
        self._reply_prefix = b""
        self._reply_count = 0
        self._batch_prefix = secrets.token_hex(8)
        self._batch_count = 0
        self._subject_cache: dict[str, tuple[bytes, str]] = {}
        self._sid: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open = False
        self._closing = False
        self._broken: BaseException | None = None
        # Units being settled, for failing a refused subject's callers at once.
        self._settling: set[_Unit] = set()
        # Subjects the server refused this identity (PermissionDenied), and when.
        self._refused: dict[bytes, tuple[float, PermissionDenied]] = {}

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> "Publisher":
        """Subscribe the ack inbox and start the tasks. Raises BusUnavailable when the connection
        is closed or was never connected."""
        if self._conn.is_closed or not self._conn.info:
            raise BusUnavailable("the publisher's NATS connection is not open: connect it first")
        self._loop = asyncio.get_running_loop()
        inbox = self._conn.new_inbox()
        self._reply_prefix = inbox.encode() + b"."
        # No flush needed: the SUB frame precedes every publish on this one connection (and is
        # sent again first after a reconnect), so the server knows the inbox before any ack.
        self._sid = self._conn.subscribe(inbox + ".*", self._on_reply)
        self._conn.on_refusal(self._on_refused)
        self._tasks = [
            self._loop.create_task(self._form_units(), name="publisher-former"),
            self._loop.create_task(self._commit_units(), name="publisher-committer"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._on_task_done)
        self._open = True
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Send what is queued and wait for its acks (new calls get BusUnavailable), then stop
        both tasks. Bounded: after ack_timeout_s + 1 s they are cancelled and every call still
        waiting gets BusUnavailable."""
        if not self._open:
            return
        self._open = False
        self._closing = True
        self._wake_former.set()
        try:
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=self._settings.ack_timeout_s + 1.0)
        finally:
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                try:
                    await task
                except asyncio.CancelledError:
                    if not task.cancelled():
                        raise  # this coroutine itself is being cancelled
                except Exception:  # noqa: S110 - already logged by _on_task_done
                    pass
            self._tasks = []
            self._fail_everything(_closed_error)
            await self._unsubscribe()

    async def _unsubscribe(self) -> None:
        sid, self._sid = self._sid, None
        if sid is None or self._conn.is_closed:
            return  # the subscription went with the connection
        # Bounded: a late ack after this is dropped anyway (nobody waits for it any more).
        await self._conn.unsubscribe(sid, drain_timeout_s=_UNSUBSCRIBE_DRAIN_S)

    def _epoch(self) -> int:
        """Moves when the connection was re-established: an attempt written before then may
        never be answered. (nats-server publishes no leader-election advisory to the account,
        measured: a leader that died is noticed by `resend_after_s` instead.)"""
        return self._conn.reconnects

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self._broken = task.exception()
        log.error("publisher task %s failed", task.get_name(), exc_info=self._broken)
        self._fail_everything(lambda: BusUnavailable(f"the publisher failed: {self._broken!r}"))

    def _fail_everything(self, make: Callable[[], BaseException]) -> None:
        while self._queue:
            self._fail(self._queue.popleft(), make())
        while not self._units.empty():
            unit = self._units.get_nowait()
            if unit is not None:
                self._fail_unit(unit, make)
        for future in self._replies.values():
            future.cancel()
        self._replies.clear()

    # -- the public call -------------------------------------------------------------------

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
        Raises ConcurrencyConflict, PermissionDenied, BusUnavailable (no ack within
        `ack_timeout_s`, or the publisher is closed: the message may or may not be stored, and
        re-publishing with the same msg_id is safe), ConfigurationError (a subject, header or
        size the protocol cannot carry).
        """
        if not self._open:
            raise BusUnavailable("the publisher is closed; publish inside `async with Bus(...)`")
        if self._broken is not None:
            raise BusUnavailable(f"the publisher failed: {self._broken!r}")
        future = self._enqueue(subject, data, msg_id, headers, expected_last_subject_seq, expected_last_subject)
        return await future

    def _enqueue(
        self, subject: str, data: bytes, msg_id: str, headers: dict[str, str] | None,
        expected: int | None, expected_subject: str | None,
    ) -> asyncio.Future[PubAck]:
        cached = self._subject_cache.get(subject)
        if cached is None:
            cached = self._learn_subject(subject)
        if self._refused:
            self._check_refused(cached[0])
        if not msg_id or not msg_id.isprintable() or " " in msg_id:
            raise ConfigurationError(f"invalid msg_id {msg_id!r}: it must be non-empty, printable, without spaces")
        if headers or expected is not None:
            if expected_subject is not None and SPACE_OR_CONTROL.search(expected_subject):
                raise ConfigurationError(f"invalid expected_last_subject {expected_subject!r}")
            hdr = header_block(publish_headers(msg_id, headers, expected, expected_subject))
        else:
            hdr = b"NATS/1.0\r\nNats-Msg-Id: %b\r\n" % msg_id.encode()
        max_payload = self._conn.max_payload
        if len(hdr) + len(data) > max_payload:
            raise ConfigurationError(
                f"message of {len(hdr) + len(data)} bytes exceeds the server's max_payload of "
                f"{max_payload}; store large blobs elsewhere and publish a reference"
            )
        loop = self._loop
        assert loop is not None
        now = loop.time()
        future: asyncio.Future[PubAck] = loop.create_future()
        self._queue.append(_Entry(
            cached[0], data, hdr, msg_id, cached[1], expected, future, now, now + self._settings.ack_timeout_s
        ))
        self._wake_former.set()
        return future

    def _learn_subject(self, subject: str) -> tuple[bytes, str]:
        if not subject or SPACE_OR_CONTROL.search(subject):
            raise ConfigurationError(f"invalid subject {subject!r}: it must be non-empty, without spaces")
        if len(self._subject_cache) >= _SUBJECT_CACHE_MAX:
            self._subject_cache.clear()  # subjects with request ids in them would grow it forever
        learned = (subject.encode(), self._subjects.kind_of_subject(subject))
        self._subject_cache[subject] = learned
        return learned

    # -- forming units ---------------------------------------------------------------------

    async def _form_units(self) -> None:
        """Form a unit when a slot is free and either a full batch is queued or no other unit is
        waiting for the committer (so partial batches keep growing while one commits)."""
        while True:
            if not self._queue:
                if self._closing:
                    self._units.put_nowait(None)
                    return
            elif len(self._queue) >= self._max_batch or self._waiting_units == 0:
                await self._slots.acquire()
                unit = self._take_unit()
                if unit is None:
                    self._slots.release()
                    continue
                await self._stage(unit)
                continue
            self._wake_former.clear()
            await self._wake_former.wait()

    def _take_unit(self) -> _Unit | None:
        """Up to max_batch entries from the head of the queue, in order.

        A message with an expected-sequence check is a unit of its own, sent as a plain
        request. In an atomic batch a stale check rejects the whole batch (every other caller's
        message would have to be re-sent), and the server refuses a subject check when an
        earlier message of the same batch wrote that subject, which is what two writers of one
        agent in one batch would do. Alone, a conflict fails that caller only; the unit keeps
        its place in the queue's order, so a task's earlier publishes are stored before it.
        """
        assert self._loop is not None
        now = self._loop.time()
        entries: list[_Entry] = []
        by_id: dict[str, _Entry] = {}
        queue = self._queue
        while queue and len(entries) < self._max_batch:
            entry = queue[0]
            if entry.expected is not None and entries:
                break
            queue.popleft()
            if entry.future.done():  # the caller was cancelled before it was sent: never sent
                continue
            if entry.deadline <= now:
                self._fail(entry, self._not_sent())
                continue
            if entry.expected is not None:
                entries.append(entry)
                break
            first = by_id.get(entry.msg_id)
            if first is not None:
                if first.followers is None:
                    first.followers = []
                first.followers.append(entry)
                continue
            by_id[entry.msg_id] = entry
            entries.append(entry)
        return _Unit(entries) if entries else None

    async def _stage(self, unit: _Unit) -> None:
        """Encode the unit, write a batch's frames up to (not including) its commit, and queue
        it for the committer."""
        try:
            self._encode(unit)
        except Exception as exc:  # a bug in encoding: fail these callers, keep serving the rest
            log.exception("cannot encode a publish unit")
            self._fail_unit(unit, lambda error=exc: BusUnavailable(f"cannot encode the publish: {error!r}"))
            self._slots.release()
            return
        self._metrics.publish_batch_size.observe(len(unit.entries))
        try:
            if unit.staged and self._conn.is_connected:
                unit.staged_on = self._conn.reconnects
                self._conn.write(unit.staged)
        finally:  # queued even if cancelled meanwhile, so that shutdown answers its callers
            self._waiting_units += 1
            self._units.put_nowait(unit)

    def _encode(self, unit: _Unit) -> None:
        """(Re-)encode a unit for a fresh attempt: a new reply subject and, for a batch, a new
        batch id (a half-staged batch of an earlier attempt must not be continued)."""
        unit.reply = reply = self._next_reply()
        if len(unit.entries) == 1:
            unit.staged, unit.commit = b"", encode_single(unit.entries[0], reply)
        elif not self._batched(unit):
            unit.staged, unit.commit = b"", b""  # sent one by one when settled
        else:
            unit.staged, unit.commit = encode_batch(unit.entries, self._next_batch_id(), reply)
        unit.staged_on = None

    def _next_reply(self) -> bytes:
        self._reply_count += 1
        return b"%b%d" % (self._reply_prefix, self._reply_count)

    def _next_batch_id(self) -> bytes:
        self._batch_count += 1
        return f"{self._batch_prefix}-{self._batch_count}".encode()

    # -- committing units ------------------------------------------------------------------

    async def _commit_units(self) -> None:
        """Settle units one after another, in the order they were formed."""
        while True:
            unit = await self._units.get()
            if unit is None:
                return
            self._waiting_units -= 1
            self._wake_former.set()
            self._settling.add(unit)
            try:
                await self._settle(unit)
            except asyncio.CancelledError:
                self._fail_unit(unit, _closed_error)
                raise
            except Exception as exc:  # a bug while settling: fail this unit's callers, go on
                log.exception("a publish unit failed unexpectedly")
                self._fail_unit(unit, lambda error=exc: BusUnavailable(f"publish failed: {error!r}"))
            finally:
                self._settling.discard(unit)
                self._slots.release()

    def _batched(self, unit: _Unit) -> bool:
        """Whether a unit goes out as an atomic batch: only when it is big enough for the
        batch's fixed server-side cost to beat one fsynced write per message."""
        return len(unit.entries) >= self._settings.min_atomic_batch

    async def _settle(self, unit: _Unit) -> None:
        deadline = unit.deadline
        if len(unit.entries) == 1:
            await self._publish_one_by_one(unit.entries, deadline, first=unit)
            return
        if not self._batched(unit):
            await self._publish_one_by_one(unit.entries, deadline)
            return
        outcome = await self._commit_batch(unit, deadline)
        while outcome == "resend":
            self._encode(unit)
            outcome = await self._commit_batch(unit, deadline)
        if outcome == "one_by_one":
            await self._publish_one_by_one(unit.entries, deadline)

    async def _commit_batch(self, unit: _Unit, deadline: float) -> _Outcome:
        """Send one attempt of an atomic batch and act on the server's answer."""
        if not await self._wait_connected(deadline):
            self._fail_unit(unit, self._unreachable)
            return "done"
        if self._expired(deadline):  # uncommitted staged frames store nothing
            self._fail_unit(unit, self._unacked if unit.sent else self._not_sent)
            return "done"
        reconnects, epoch = self._conn.reconnects, self._epoch()
        split = unit.staged_on == reconnects  # staged frames went out on this connection
        if unit.staged_on is not None and not split:
            # Staged frames written just before a connection dropped may still reach the server
            # on the next one (the connection keeps unsent frames for it): a fresh batch id keeps
            # the whole batch sent now from continuing theirs.
            self._encode(unit)
        future = self._expect_reply(unit.reply)
        self._conn.write(unit.commit if split else unit.staged + unit.commit)
        unit.sent = True
        msg = await self._await_reply(future, self._attempt_deadline(deadline), epoch)
        if msg is None:
            self._replies.pop(unit.reply, None)
            if self._lost_connection(epoch) or not self._expired(deadline):
                # Ambiguous: the commit may or may not have been stored (the connection dropped,
                # or the stream's leader died with it). The re-send carries the same message
                # ids, so it is stored at most once (a 10201 means it already was).
                log.info("no ack for a %d-message batch (%s); re-sending it", len(unit.entries),
                         "connection lost or new leader" if self._lost_connection(epoch) else "leader gone?")
                return "resend"
            self._fail_unit(unit, self._unacked)
            return "done"
        if _is_no_responders(msg):
            # No stream leader took it (an election in progress): nothing of it was stored.
            unit.attempts += 1
            if not await self._leaderless_pause(unit.attempts, deadline):
                self._fail_unit(unit, lambda: self._leaderless(unit.entries[0]))
                return "done"
            return "resend"
        try:
            wire = decode_ack(msg.data)
        except BusUnavailable:
            log.warning("unreadable batch ack %r; resolving one by one", msg.data[:200])
            return "one_by_one"
        if wire.error is not None:
            code = wire.error.err_code
            if code == ERR_BATCH_INCOMPLETE and split:
                return "resend"  # staged frames dropped (idle timeout while we recovered): send whole
            if code in BATCH_LEVEL_ERRORS:
                description = f"group commit rejected ({code}): {wire.error.description}"
                self._fail_unit(unit, lambda: BusUnavailable(description))
                return "done"
            log.info("batch of %d rejected (%d: %s); publishing its messages one by one",
                     len(unit.entries), code, wire.error.description)
            return "one_by_one"
        if wire.count != len(unit.entries) or not wire.stream:
            log.warning("unexpected batch ack %r for %d messages; resolving one by one",
                        msg.data[:200], len(unit.entries))
            return "one_by_one"
        # The server stores a batch's messages contiguously, in batch order, ending at `seq`.
        # Callers are woken on the next loop turn, after the next unit's commit is on its way.
        assert self._loop is not None
        self._loop.call_soon(self._resolve_batch, unit.entries, wire.stream, wire.seq - wire.count + 1)
        return "done"

    def _resolve_batch(self, entries: list[_Entry], stream: str, first_seq: int) -> None:
        """Answer a committed batch's callers (the hot path: one pass, no per-entry calls)."""
        assert self._loop is not None
        now = self._loop.time()
        observe = self._metrics.publish_seconds.observe
        counts: dict[str, int] = {}
        seq = first_seq
        for entry in entries:
            future = entry.future
            if not future.done():
                future.set_result(PubAck(stream=stream, seq=seq))
            observe(now - entry.started)
            counts[entry.kind] = counts.get(entry.kind, 0) + 1
            if entry.followers:
                self._resolve_followers(entry, PubAck(stream=stream, seq=seq), now)
            seq += 1
        self._count_published(counts)

    async def _publish_one_by_one(self, entries: list[_Entry], deadline: float, first: _Unit | None = None) -> None:
        """Publish each entry as a plain request, pipelined in order in one write, and re-send
        (same ids, same order) what was not answered (connection lost, leader gone) or was
        refused for want of a stream leader, until the deadline."""
        pending = entries
        counts: dict[str, int] = {}
        conflicts: list[tuple[_Entry, WirePubAck]] = []
        sent: set[int] = set()  # id() of entries sent without an answer: maybe stored
        leaderless_rounds = 0
        while pending:
            if not await self._wait_connected(deadline):
                for entry in pending:
                    self._fail(entry, self._unacked() if id(entry) in sent else self._unreachable())
                break
            if self._expired(deadline):
                for entry in pending:
                    self._fail(entry, self._unacked() if id(entry) in sent else self._leaderless(entry)
                               if leaderless_rounds else self._not_sent())
                break
            if first is not None:
                replies, blob, first = [first.reply], first.commit, None
            else:
                replies = [self._next_reply() for _ in pending]
                blob = b"".join(encode_single(e, r) for e, r in zip(pending, replies))
            futures = [self._expect_reply(r) for r in replies]
            for entry, reply in zip(pending, replies):
                entry.reply = reply
            epoch = self._epoch()
            self._conn.write(blob)
            attempt = self._attempt_deadline(deadline)
            if len(futures) == 1:
                await self._await_reply(futures[0], attempt, epoch)
            else:
                await self._await_replies(futures, attempt, epoch)
            again: list[_Entry] = []
            leaderless = False
            for entry, reply, future in zip(pending, replies, futures):
                msg = None if future.cancelled() or not future.done() else future.result()
                if msg is None and entry.future.done():  # refused (PermissionDenied) or cancelled
                    self._replies.pop(reply, None)
                    continue
                if msg is None:
                    self._replies.pop(reply, None)
                    sent.add(id(entry))
                    again.append(entry)
                    continue
                if _is_no_responders(msg):
                    leaderless = True
                    again.append(entry)
                    continue
                sent.discard(id(entry))
                conflict = self._settle_plain(entry, msg, counts)
                if conflict is not None:
                    conflicts.append((entry, conflict))
            if again and leaderless:
                leaderless_rounds += 1
                if not await self._leaderless_pause(leaderless_rounds, deadline):
                    for entry in again:
                        self._fail(entry, self._unacked() if id(entry) in sent else self._leaderless(entry))
                    break
            elif again:
                log.info("no ack for %d publish(es) (%s); re-sending with the same ids", len(again),
                         "connection lost or new leader" if self._lost_connection(epoch) else "leader gone?")
            pending = again
        self._count_published(counts)
        for entry, wire in conflicts:
            await self._settle_conflict(entry, wire, deadline)

    def _settle_plain(self, entry: _Entry, msg: _Reply, counts: dict[str, int]) -> WirePubAck | None:
        """Resolve an entry from its own PubAck; a 10071 is handed back for a read-back."""
        try:
            wire = decode_ack(msg.data)
        except BusUnavailable as exc:
            self._fail(entry, exc)
            return None
        if wire.error is not None:
            if wire.error.err_code == ERR_WRONG_LAST_SEQUENCE:
                return wire
            self._fail(entry, ack_error(wire.error, entry.expected))
            return None
        if not wire.stream:
            self._fail(entry, BusUnavailable(f"no stream stored the message (reply {msg.data[:200]!r})"))
            return None
        self._resolve(entry, PubAck(stream=wire.stream, seq=wire.seq, duplicate=wire.duplicate), counts)
        return None

    async def _settle_conflict(self, entry: _Entry, wire: WirePubAck, deadline: float) -> None:
        """A failed expected-sequence check. The server checks it before dedup, so a re-sent
        message stored by an earlier attempt fails it too: if the message at the sequence the
        server reports carries this msg_id, it is this message, already stored."""
        assert wire.error is not None
        error = ack_error(wire.error, entry.expected)
        assert isinstance(error, ConcurrencyConflict)
        if error.actual:
            assert self._loop is not None
            try:
                stored = await self._transport.direct_get(
                    self._subjects.stream, {"seq": error.actual}, timeout_s=max(0.05, deadline - self._loop.time())
                )
            except BusUnavailable as exc:
                self._fail(entry, BusUnavailable(f"cannot tell whether a conflicting append was this one: {exc}"))
                return
            if stored is not None and stored.headers.get("Nats-Msg-Id") == entry.msg_id:
                ack = PubAck(stream=wire.stream, seq=error.actual, duplicate=True)
                self._resolve(entry, ack, {})
                return
        self._metrics.occ_conflicts.inc()
        self._fail(entry, error)

    # -- the wire --------------------------------------------------------------------------

    def _expect_reply(self, reply: bytes) -> asyncio.Future[_Reply | None]:
        assert self._loop is not None
        future: asyncio.Future[_Reply | None] = self._loop.create_future()
        self._replies[reply] = future
        return future

    def _on_reply(self, subject: bytes, reply: bytes, header: bytes, data: bytes) -> None:
        """An ack (or a no-responders status) on the inbox; runs inside the socket callback."""
        future = self._replies.pop(subject, None)
        if future is not None and not future.done():
            future.set_result(_Reply(header, data))

    async def _await_reply(
        self, future: asyncio.Future[_Reply | None], deadline: float, epoch: int
    ) -> _Reply | None:
        """The reply, or None once the deadline passed or the connection was lost (or the log
        elected a leader) since the write (`epoch`). A timer checks the connection, so an answered commit wakes its waiter directly."""
        assert self._loop is not None
        loop = self._loop

        def check() -> None:
            nonlocal timer
            if future.done():
                return
            if loop.time() >= deadline or self._lost_connection(epoch):
                future.set_result(None)
            else:
                timer = loop.call_later(min(_RECONNECT_CHECK_S, max(0.0, deadline - loop.time())), check)

        timer = loop.call_later(min(_RECONNECT_CHECK_S, max(0.0, deadline - loop.time())), check)
        try:
            return await future
        finally:
            timer.cancel()

    async def _await_replies(
        self, futures: list[asyncio.Future[_Reply | None]], deadline: float, epoch: int
    ) -> None:
        """Wait until every future is answered, the deadline passed, or the connection was lost."""
        assert self._loop is not None
        waiting = [f for f in futures if not f.done()]
        while waiting:
            remaining = deadline - self._loop.time()
            if remaining <= 0 or self._lost_connection(epoch):
                return
            await asyncio.wait(waiting, timeout=min(remaining, _RECONNECT_CHECK_S))
            waiting = [f for f in waiting if not f.done()]

    def _lost_connection(self, epoch: int) -> bool:
        return not self._conn.is_connected or self._epoch() != epoch

    async def _wait_connected(self, deadline: float) -> bool:
        """Wait (bounded by `deadline`) until the connection is up; False if it is not by then."""
        assert self._loop is not None
        return await self._conn.wait_connected(deadline - self._loop.time())

    def _expired(self, deadline: float) -> bool:
        assert self._loop is not None
        return self._loop.time() >= deadline

    def _attempt_deadline(self, deadline: float) -> float:
        """When to stop waiting for one attempt's ack and re-send: an ack lost with a stream
        leader that died never comes, while the connection (to another server) stays up."""
        assert self._loop is not None
        return min(deadline, self._loop.time() + self._settings.resend_after_s)

    async def _leaderless_pause(self, rounds: int, deadline: float) -> bool:
        """Wait a little before re-sending what no stream leader took; False when the deadline
        leaves no time for another attempt."""
        assert self._loop is not None
        pause = _LEADERLESS_BACKOFF_S[min(rounds, len(_LEADERLESS_BACKOFF_S)) - 1]
        if self._loop.time() + pause >= deadline:
            return False
        await asyncio.sleep(pause)
        return True

    def _unacked(self) -> BusUnavailable:
        return BusUnavailable(
            f"no publish ack within {self._settings.ack_timeout_s}s: it MAY HAVE BEEN STORED (it was sent, "
            "the answer was lost: a connection or a stream leader went away); re-publishing with the "
            "same msg_id is safe"
        )

    def _leaderless(self, entry: _Entry) -> BusUnavailable:
        return BusUnavailable(
            f"not stored: no stream leader took {entry.subject.decode()} within {self._settings.ack_timeout_s}s "
            "(the log is electing a leader and has no quorum yet, or no stream captures the subject)"
        )

    def _not_sent(self) -> BusUnavailable:
        return BusUnavailable(
            f"not sent within {self._settings.ack_timeout_s}s: the server is slow or unreachable, or the "
            "publisher is backlogged (the message was not stored)"
        )

    def _unreachable(self) -> BusUnavailable:
        if self._conn.is_closed:
            return BusUnavailable("the NATS connection is closed")
        return BusUnavailable(
            f"NATS unreachable for {self._settings.ack_timeout_s}s (not stored unless it was sent before "
            "the connection dropped; re-publishing with the same msg_id is safe)"
        )

    # -- outcomes --------------------------------------------------------------------------

    def _resolve(self, entry: _Entry, ack: PubAck, counts: dict[str, int]) -> None:
        assert self._loop is not None
        now = self._loop.time()
        if ack.duplicate:
            self._metrics.publish_duplicates.inc()
        else:
            counts[entry.kind] = counts.get(entry.kind, 0) + 1
        self._metrics.publish_seconds.observe(now - entry.started)
        if not entry.future.done():
            entry.future.set_result(ack)
        if entry.followers:
            self._resolve_followers(entry, ack, now)

    def _resolve_followers(self, entry: _Entry, ack: PubAck, now: float) -> None:
        """Later calls with the same msg_id get the same sequence, as duplicates (as the
        server would have answered them)."""
        assert entry.followers is not None
        again = PubAck(stream=ack.stream, seq=ack.seq, duplicate=True)
        self._metrics.publish_duplicates.inc(len(entry.followers))
        for follower in entry.followers:
            self._metrics.publish_seconds.observe(now - follower.started)
            if not follower.future.done():
                follower.future.set_result(again)

    def _count_published(self, counts: dict[str, int]) -> None:
        for kind, n in counts.items():
            self._metrics.published.labels(kind).inc(n)

    # -- refusals ----------------------------------------------------------------------------

    def _on_refused(self, refusal: Refusal) -> None:
        """The server refused a publish (in the socket callback): fail every caller waiting on
        that subject now, and refuse later calls to it for a while without sending them."""
        if refusal.action != "publish" or self._loop is None:
            return
        subject = refusal.subject.encode()
        error = refusal.error(acting_as(self._conn.name, self._conn.settings.credential))
        self._refused[subject] = (self._loop.time(), error)
        if len(self._refused) > _REFUSED_MAX:
            self._refused.pop(next(iter(self._refused)))
        for entry in self._queue:
            if entry.subject == subject:
                self._fail(entry, _copy_error(error))
        for unit in self._settling:
            for entry in unit.entries:
                if entry.subject == subject:
                    self._fail(entry, _copy_error(error))
                    # Its ack will never come: wake the committer now, not after resend_after_s
                    # (every later publish waits behind it).
                    waiting = self._replies.pop(entry.reply, None) if entry.reply else None
                    if waiting is not None and not waiting.done():
                        waiting.set_result(None)

    def _check_refused(self, subject: bytes) -> None:
        """Raise the PermissionDenied the server sent for `subject` recently (a credential's
        grants change only by re-issuing it, which reconnects)."""
        refused = self._refused.get(subject)
        if refused is None:
            return
        assert self._loop is not None
        if self._loop.time() - refused[0] > _REFUSED_FOR_S:
            del self._refused[subject]
            return
        raise _copy_error(refused[1])

    def _fail(self, entry: _Entry, error: BaseException) -> None:
        if not entry.future.done():
            entry.future.set_exception(error)
        for follower in entry.followers or ():
            if not follower.future.done():
                follower.future.set_exception(_copy_error(error))

    def _fail_unit(self, unit: _Unit, make: Callable[[], BaseException]) -> None:
        for entry in unit.entries:
            self._fail(entry, make())


def _closed_error() -> BusUnavailable:
    return BusUnavailable("the publisher closed before this message was acked (it may have been stored; "
                          "re-publishing with the same msg_id is safe)")


def _copy_error(error: BaseException) -> BaseException:
    """A fresh exception like `error`, so callers never share (and re-raise) one object."""
    if isinstance(error, ConcurrencyConflict):
        return ConcurrencyConflict(str(error), expected=error.expected, actual=error.actual)
    try:
        return type(error)(*error.args)
    except TypeError:
        return BusUnavailable(str(error))


def _is_no_responders(msg: _Reply) -> bool:
    """The server's "no stream captures this subject" answer: a 503 status without payload."""
    return not msg.data and bool(msg.header) and parse_status(msg.header)[0] == "503"
