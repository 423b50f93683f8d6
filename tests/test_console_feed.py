"""The console's live feed against a real nats-server: below its read size it reads every
envelope; when the log runs faster, it reads the newest and counts what it jumped over, so its
totals still add up, it never lags behind, and it reads at the flooded pace meanwhile."""

from __future__ import annotations

import asyncio

import msgspec
from conftest import wait_for

from bus import Bus
from bus.console.config import ConsoleConfig
from bus.console.feed import LiveFeed, TrafficFilter
from schemas.payloads import Note


async def test_a_log_faster_than_the_feed_reads_is_jumped_over_and_counted(bus: Bus) -> None:
    """600 envelopes stored between two reads of a feed reading at most 50: it reads the newest
    50, counts the other 550 as passed (in the second's total and as skipped for a page),
    becomes flooded, and the per-second totals count every envelope."""
    feed = LiveFeed(ConsoleConfig(max_read=50, max_push=20, recent=100))
    async with feed.page(TrafficFilter()) as page:
        await feed.read_newest(bus, most=10)  # an empty log: nothing to read
        sent = [await bus.send("watcher", Note(text=str(n))) for n in range(600)]
        last = await bus.last_seq()
        await feed.read_newest(bus, most=50)
        assert feed.head_seq == last and feed.flooded
        assert sum(s.passed for s in feed.stats()) == 550
        assert sum(s.total for s in feed.stats()) == len(sent)
        assert [i.seq for i in feed.recent(TrafficFilter(), 100)] == list(range(last - 49, last + 1))
        feed.push_once()
        batch = msgspec.json.decode((await page.next()).split(b"data: ", 1)[1])
        assert [i["seq"] for i in batch["items"]] == list(range(last - 19, last + 1))
        assert batch["skipped"] == 550 + 30


async def test_a_following_feed_below_its_read_size_reads_every_envelope(bus: Bus) -> None:
    """Following at a rate the feed may read whole, nothing is jumped over: every envelope is
    counted in its subject class, listed, and pushed to an open page."""
    feed = LiveFeed(ConsoleConfig(max_push=500, max_read=500))
    seen: list[int] = []
    async with asyncio.TaskGroup() as tasks, feed.page(TrafficFilter(agent="watcher")) as page:
        follower = tasks.create_task(feed.follow(bus))
        await wait_for(lambda: feed.following.is_set(), timeout_s=10)
        for n in range(200):
            await bus.send("watcher", Note(text=str(n)))
        last = await bus.last_seq()

        async def page_saw_all() -> bool:
            while not page.queue.empty():
                data = await page.next()
                if data.startswith(b"event: traffic"):
                    seen.extend(i["seq"] for i in msgspec.json.decode(data.split(b"data: ", 1)[1])["items"])
            return bool(seen) and seen[-1] == last

        await wait_for(page_saw_all, timeout_s=10, interval_s=0.05, what="the page to see every envelope")
        assert seen == list(range(last - 199, last + 1))
        assert sum(s.passed for s in feed.stats()) == 0 and not feed.flooded
        assert sum(s.inbox for s in feed.stats()) == 200
        follower.cancel()


async def test_after_a_flood_the_feed_reads_every_envelope_again(bus: Bus) -> None:
    """A burst faster than `flood_per_s` floods the feed (the newest read, the rest counted as
    passed); once the log is quiet again, it reads every envelope again and an open page is
    shown each of them."""
    feed = LiveFeed(ConsoleConfig(flood_per_s=200, max_push=50, push_interval_s=0.05, flooded_interval_s=0.3))
    seen: list[int] = []
    async with asyncio.TaskGroup() as tasks, feed.page(TrafficFilter(agent="after")) as page:
        follower = tasks.create_task(feed.follow(bus))
        await wait_for(lambda: feed.following.is_set(), timeout_s=10)
        await asyncio.gather(*(bus.send("burst", Note(text=str(n))) for n in range(2_000)))
        await wait_for(lambda: sum(s.passed for s in feed.stats()) > 0, timeout_s=10, what="the burst jumped over")
        await wait_for(lambda: not feed.flooded, timeout_s=10, what="the flood to end")
        sent = [(await bus.send("after", Note(text=str(n)))).ack.seq for n in range(20)]

        async def page_saw_all() -> bool:
            while not page.queue.empty():
                data = await page.next()
                if data.startswith(b"event: traffic"):
                    seen.extend(i["seq"] for i in msgspec.json.decode(data.split(b"data: ", 1)[1])["items"])
            return bool(seen) and seen[-1] == sent[-1]

        await wait_for(page_saw_all, timeout_s=10, interval_s=0.05, what="the page to see every envelope after the flood")
        assert seen == sent and not feed.flooded
        follower.cancel()
    passed = sum(s.passed for s in feed.stats())
    assert sum(s.total for s in feed.stats()) >= 2_020 and sum(s.inbox for s in feed.stats()) == 2_020 - passed


async def test_large_records_faster_than_the_feed_reads_bytes_are_jumped_over_and_counted(bus: Bus) -> None:
    """40 small records between two reads are all read; then 40 records of ~100 KB (4 MB, over
    `most_bytes`): the feed reads only as many of the newest as fit one push's bytes (here 2),
    counts the rest as passed and is flooded."""
    feed = LiveFeed(ConsoleConfig(push_bytes=256 * 1024, max_push=50, recent=100))
    async with feed.page(TrafficFilter()) as page:
        await feed.read_newest(bus, most=50, most_bytes=1024 * 1024)  # an empty log
        for n in range(40):
            await bus.send("reader", Note(text=str(n)))
        await feed.read_newest(bus, most=50, keep=50, most_bytes=1024 * 1024)
        assert not feed.flooded and sum(s.passed for s in feed.stats()) == 0
        assert len(feed.recent(TrafficFilter(), 100)) == 40

        for n in range(40):
            await bus.send("reader", Note(text=f"{n:03d}" + "x" * 100_000))
        last = await bus.last_seq()
        await feed.read_newest(bus, most=50, keep=50, most_bytes=1024 * 1024)
        assert feed.head_seq == last and feed.flooded
        read = [i.seq for i in feed.recent(TrafficFilter(), 100)][40:]
        assert read == list(range(last - len(read) + 1, last + 1)) and 1 <= len(read) <= 3
        assert sum(s.passed for s in feed.stats()) == 40 - len(read)
        assert sum(s.total for s in feed.stats()) == 80
        feed.push_once()
        batch = msgspec.json.decode((await page.next()).split(b"data: ", 1)[1])
        assert batch["items"][-1]["seq"] == last
