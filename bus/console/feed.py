"""LiveFeed: the log as it happens, aggregated for every open page.

    feed = LiveFeed(config)
    async with asyncio.TaskGroup() as tasks:            # the app's lifespan owns both loops
        tasks.create_task(feed.follow(bus))
        tasks.create_task(feed.stats_loop())
    async with feed.page(TrafficFilter(agent="writer")) as page:
        data = await page.next()                      # one server-sent event, as bytes

The feed reads the newest of the log, not all of it: every `push_interval_s` while a page is
open (`idle_interval_s` while none is), it asks the log's head (stream state) and reads what
was stored since the last read in one batched direct get. When more was stored than a read may
take (over `max_read` envelopes or `max_read_bytes`, or faster than `flood_per_s` envelopes or
`flood_bytes_per_s` since the last read), the feed is flooded:
it reads only the newest `max_push` (what a page is shown) and counts the sequences it jumped
over (`passed`: in that second's total, in no subject class; as skipped for the pages), and it
reads every `flooded_interval_s` instead while that lasts (nobody reads a flood row by row;
each push costs the page a parse and a draw). Then it hands each page one batch: the envelopes
read that pass the page's filter, at most `max_push` of them, decoded only the newest within
`push_bytes` (the older rest counted as skipped). A page that reads slowly keeps at most
`page_queue` batches; older ones are dropped and counted. So whatever the bus's rate, the feed
costs the server and the console a few requests a second and a bounded read and decode, and no
page falls behind the log by more than one read.

It keeps the last `recent` envelopes for a page that opens and counts what it saw per second
(by subject class, failed and retried attempts, dead letters). Records are kept as they came and
decoded only when a page needs them (all of a push's records, within `push_bytes`, only when a
page filters).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import msgspec

from bus.console.config import ConsoleConfig
from bus.log_reader import LogRecord
from schemas import DecodeError
from schemas.codec import decode_loose
from schemas.registry import kind_of_raw

if TYPE_CHECKING:
    from bus.client import Bus

log = logging.getLogger("continuum.console.feed")

CATEGORIES = ("inbox", "group", "event", "reply", "dead")
# After a jump, the flooded pace holds this long (a flood comes in bursts of reads).
FLOOD_HOLD_S = 1.0


class TrafficItem(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One stored envelope as the traffic view lists it (no payload: that is fetched on click)."""

    seq: int
    at: float  # when the server stored it, ms since the epoch
    category: str
    kind: str
    sender: str | None = None
    to: str | None = None
    tag: str | None = None
    id: str | None = None
    corr: str | None = None
    cause: str | None = None
    error: str | None = None  # bytes that are not an envelope: why


class TrafficFilter(msgspec.Struct, frozen=True, kw_only=True):
    """What one page follows: an agent (as sender or recipient), a kind (`note`, or a prefix
    ending in `*`), a tag, a correlation id (or its end, as `bus tail` prints it)."""

    agent: str | None = None
    kind: str | None = None
    tag: str | None = None
    corr: str | None = None

    def matches(self, item: TrafficItem) -> bool:
        """True when `item` passes every part of the filter that is set."""
        if self.agent is not None and self.agent not in (item.sender, item.to):
            return False
        if self.kind is not None:
            if self.kind.endswith("*"):
                if not item.kind.startswith(self.kind[:-1]):
                    return False
            elif item.kind != self.kind:
                return False
        if self.tag is not None and item.tag != self.tag:
            return False
        if self.corr is not None and not (item.corr or "").endswith(self.corr):
            return False
        return True


class _Second(msgspec.Struct, kw_only=True):
    t: int
    total: int = 0
    inbox: int = 0
    group: int = 0
    event: int = 0
    reply: int = 0
    dead: int = 0
    failed: int = 0
    retried: int = 0
    passed: int = 0  # stored, but jumped over by the feed (so in no subject class, nor failed)


class _Page:
    """One open page's subscription: its filter and its bounded queue of encoded events."""

    def __init__(self, filter_: TrafficFilter, limit: int) -> None:
        self.filter = filter_
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=limit)
        self.dropped = 0

    def offer(self, data: bytes) -> None:
        """Queue `data`, dropping the oldest queued event when full (never blocks)."""
        if self.queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
                self.dropped += 1
        self.queue.put_nowait(data)

    async def next(self) -> bytes:
        """The next event for this page, waiting for one."""
        return await self.queue.get()


class TooManyPages(Exception):
    """The console already serves `max_pages` live pages."""


_encoder = msgspec.json.Encoder()

# A settlement's outcome in a delivery report. Counted by a scan of the bytes, not a decode: a
# report carries a batch of settlements (~100 KB for 1,000), and a decode of each, with the
# depth check before it, cost the console ~1 ms a report (measured), ~5% of a core while a
# consumer acked at full speed. A quote inside a JSON string is escaped, so text cannot match.
_OUTCOME = re.compile(rb'"outcome"\s*:\s*"(failed|dead_lettered|retried)"')


def sse(event: str, data: Any) -> bytes:
    """One server-sent event: its name and its data as one JSON line."""
    return b"event: " + event.encode() + b"\ndata: " + _encoder.encode(data) + b"\n\n"


class LiveFeed:
    """Follows the log and fans it out to pages (see the module docstring)."""

    def __init__(self, config: ConsoleConfig) -> None:
        self._config = config
        self._recent: collections.deque[LogRecord] = collections.deque(maxlen=config.recent)
        self._pending: collections.deque[LogRecord] = collections.deque(maxlen=config.pending_limit)
        self._overflow = 0  # envelopes that left `_pending` unpushed (over pending_limit)
        self._seconds: collections.deque[_Second] = collections.deque(maxlen=config.history_s)
        self._pages: set[_Page] = set()
        self._health: bytes | None = None
        self.head_seq = 0
        self.following = asyncio.Event()
        self._read_to = 0  # the last sequence read (or jumped over)
        self._page_opened = asyncio.Event()
        self._flooded_until = 0.0  # monotonic: until then, read at the flooded pace
        self._bytes_seen: int | None = None  # the log's bytes at the last read

    # -- reading the log ------------------------------------------------------------------

    async def follow(self, bus: "Bus") -> None:
        """Read the newest of the log and push it to the pages, for ever (see the module
        docstring), starting `recent` envelopes back. Raises BusUnavailable, PermissionDenied."""
        config = self._config
        first, last = await bus.log_bounds()
        self._read_to = max(first - 1, last - config.recent, 0)
        self.head_seq = max(self.head_seq, last)
        await self.read_newest(bus, most=config.recent, most_bytes=config.max_read_bytes)
        self.following.set()
        loop = asyncio.get_running_loop()
        last_read = loop.time()
        while True:
            if self.flooded:
                interval = config.flooded_interval_s
            else:
                interval = config.push_interval_s if self._pages else config.idle_interval_s
            # A steady cadence: a read that took long is not followed by a whole interval more.
            # A page that opens ends the (idle) wait.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, last_read + interval - loop.time())):
                    await self._page_opened.wait()
            self._page_opened.clear()
            now = loop.time()
            # More than flood_per_s since the last read is a flood, whatever the interval waited.
            most = min(config.max_read, max(config.max_push, int(config.flood_per_s * (now - last_read))))
            most_bytes = min(config.max_read_bytes, max(config.push_bytes, int(config.flood_bytes_per_s * (now - last_read))))
            last_read = now
            await self.read_newest(bus, most=most, keep=config.max_push, most_bytes=most_bytes)
            self.push_once()

    async def read_newest(self, bus: "Bus", *, most: int, keep: int | None = None, most_bytes: int | None = None) -> None:
        """Take what was stored since the last read: all of it when that is at most `most`
        envelopes and `most_bytes` (default: no bound), else only the newest `keep` (default
        `most`), and of large records only as many as fit `push_bytes`; the rest are counted as
        passed, and the feed is flooded for FLOOD_HOLD_S. Raises BusUnavailable, PermissionDenied."""
        extent = await bus.log_extent()
        first, head = extent.first_seq, extent.last_seq
        self.head_seq = max(self.head_seq, head)
        # The bytes stored since the last read (a trim or purge makes the difference negative:
        # then none); on the first read, the log's average record times the records to read.
        unread = head - self._read_to
        if self._bytes_seen is None:
            stored_bytes = unread * extent.bytes // max(1, extent.messages)
        else:
            stored_bytes = max(0, extent.bytes - self._bytes_seen)
        self._bytes_seen = extent.bytes
        if head <= self._read_to:
            return
        start = max(self._read_to + 1, first, 1)
        newest = most if keep is None else keep
        by_bytes = most_bytes is not None and stored_bytes > most_bytes
        if by_bytes:
            # Large records (a consumer acking at full speed stores ~100 KB delivery reports,
            # tens a second): reading them all would cost the server and the console MBs a
            # second for rows nobody reads. Only as many of the newest as a push decodes.
            newest = min(newest, max(1, int(self._config.push_bytes * unread / stored_bytes)))
        if by_bytes or head - start + 1 > most:
            start = max(start, head - newest + 1)
        if start > self._read_to + 1:
            self.passed(start - self._read_to - 1)
            self._flooded_until = time.monotonic() + FLOOD_HOLD_S
        count = head - start + 1
        stored = await bus.transport.direct_get_batch(
            bus.subjects.stream, {"seq": start, "batch": count}, limit=count
        )
        for message in stored:
            if message.seq > self._read_to:
                self.take(LogRecord(message.seq, message.stored_ns, message.subject.encode(), message.data))
                self._read_to = message.seq
        if not stored:
            self._read_to = start - 1  # purged meanwhile, or a replica behind: from there next time

    def passed(self, count: int) -> None:
        """Count `count` envelopes stored now that the feed jumped over: in this second's total
        (as `passed`, by no subject class) and, for the pages, as skipped."""
        if count <= 0:
            return
        second = self._second(time.time_ns() // 1_000_000_000)
        second.total += count
        second.passed += count
        self._overflow += count

    def take(self, record: LogRecord) -> None:
        """Count and keep one stored message (decoded later, if a page needs it)."""
        self.head_seq = max(self.head_seq, record.seq)
        self._recent.append(record)
        if len(self._pending) == self._pending.maxlen:
            self._overflow += 1
        self._pending.append(record)
        second = self._second(record.time_ns // 1_000_000_000)
        second.total += 1
        parts = record.subject.split(b".", 2)
        category = parts[1] if len(parts) > 1 else b""
        if category == b"inbox":
            second.inbox += 1
        elif category == b"event":
            second.event += 1
            if record.subject.endswith(b".delivery.report"):
                failed, retried = _outcomes(record.data)
                second.failed += failed
                second.retried += retried
        elif category == b"group":
            second.group += 1
        elif category == b"reply":
            second.reply += 1
        elif category == b"dead":
            second.dead += 1

    def _second(self, t: int) -> _Second:
        seconds = self._seconds
        if seconds and seconds[-1].t >= t:
            for entry in reversed(seconds):
                if entry.t == t:
                    return entry
                if entry.t < t:
                    break
            return seconds[-1]  # older than the newest kept second and not kept: count it there
        seconds.append(_Second(t=t))
        return seconds[-1]

    # -- pages ------------------------------------------------------------------------------

    def recent(self, filter_: TrafficFilter, limit: int) -> list[TrafficItem]:
        """The newest `limit` kept envelopes that pass `filter_`, oldest first."""
        found: list[TrafficItem] = []
        for record in reversed(self._recent):
            item = traffic_item(record)
            if filter_.matches(item):
                found.append(item)
                if len(found) >= limit:
                    break
        found.reverse()
        return found

    def stats(self) -> list[_Second]:
        """Counts per second, oldest first (seconds with nothing stored are absent)."""
        return list(self._seconds)

    @contextlib.asynccontextmanager
    async def page(self, filter_: TrafficFilter) -> AsyncIterator[_Page]:
        """Subscribe a page for the duration of the block; it starts with the health figures.
        Raises TooManyPages."""
        if len(self._pages) >= self._config.max_pages:
            raise TooManyPages(f"the console serves at most {self._config.max_pages} live pages")
        page = _Page(filter_, self._config.page_queue)
        if self._health is not None:
            page.offer(self._health)
        self._pages.add(page)
        self._page_opened.set()
        try:
            yield page
        finally:
            self._pages.discard(page)

    @property
    def flooded(self) -> bool:
        """True while the feed jumps over envelopes (and for FLOOD_HOLD_S after): it reads at
        the flooded pace then."""
        return time.monotonic() < self._flooded_until

    @property
    def pages(self) -> int:
        """Live pages open now."""
        return len(self._pages)

    def close_pages(self) -> None:
        """End every page's stream: each gets an empty event, which its stream takes as the end."""
        for page in self._pages:
            page.offer(b"")

    def publish_health(self, figures: Any) -> None:
        """Send the health figures to every page now, and to each page that opens later."""
        self._health = sse("health", figures)
        for page in self._pages:
            page.offer(self._health)

    async def stats_loop(self) -> None:
        """Every second, the counts to every page. Runs until cancelled."""
        while True:
            await asyncio.sleep(1.0)
            if self._pages:
                data = sse("stats", {"seconds": self.stats()[-60:], "head_seq": self.head_seq})
                for page in self._pages:
                    page.offer(data)

    def push_once(self) -> None:
        """Hand each page the envelopes that came since the last push (bounded), then forget them."""
        if not self._pending:
            return
        records = list(self._pending)
        overflow, self._overflow = self._overflow, 0
        self._pending.clear()
        if not self._pages:
            return
        limit = self._config.max_push
        filtering = any(_filtering(page.filter) for page in self._pages)
        # Decoded once per push for every page: all of it when a page filters, else the newest
        # `max_push`; either way the newest within `push_bytes` (at least one), as a decode costs
        # in proportion to the bytes (the depth check first): a consumer acking at full speed
        # records ~50 delivery reports of ~100 KB a second.
        decoded = [traffic_item(r) for r in _newest_within(records, None if filtering else limit, self._config.push_bytes)]
        unexamined = len(records) - len(decoded)
        for page in self._pages:
            if _filtering(page.filter):
                chosen = [item for item in decoded if page.filter.matches(item)]
                extra = unexamined
            else:
                chosen = decoded
                extra = unexamined + overflow
            if not chosen:
                continue
            shown = chosen[-limit:]
            skipped = len(chosen) - len(shown) + extra
            page.offer(sse("traffic", {"items": shown, "skipped": skipped, "dropped": page.dropped}))


def _newest_within(records: list[LogRecord], most: int | None, max_bytes: int) -> list[LogRecord]:
    """The newest of `records` (at most `most` when given) whose data add up to at most
    `max_bytes`, oldest first; the newest one even when it alone is larger."""
    taken = 0
    start = len(records)
    floor = 0 if most is None else max(0, len(records) - most)
    while start > floor:
        size = len(records[start - 1].data)
        if taken and taken + size > max_bytes:
            break
        taken += size
        start -= 1
    return records[start:]


def _filtering(filter_: TrafficFilter) -> bool:
    return any(v is not None for v in (filter_.agent, filter_.kind, filter_.tag, filter_.corr))


def traffic_item(record: LogRecord) -> TrafficItem:
    """What the traffic view shows of a stored message; never raises on bad bytes."""
    subject = record.subject.decode(errors="replace")
    parts = subject.split(".")
    category = parts[1] if len(parts) > 1 else "?"
    at = record.time_ns / 1e6
    try:
        envelope = decode_loose(record.data)
    except DecodeError as exc:
        return TrafficItem(seq=record.seq, at=at, category=category, kind="(undecodable)", error=str(exc)[:300])
    return TrafficItem(
        seq=record.seq, at=at, category=category, kind=kind_of_raw(envelope.payload) or "(no kind)",
        sender=envelope.sender, to=envelope.to, tag=envelope.tag, id=envelope.id,
        corr=envelope.correlation_id, cause=envelope.causation_id,
    )


def _outcomes(data: bytes) -> tuple[int, int]:
    """(failed or dead-lettered, retried) attempts in a delivery report's bytes."""
    failed = retried = 0
    for outcome in _OUTCOME.findall(data):
        if outcome == b"retried":
            retried += 1
        else:
            failed += 1
    return failed, retried
