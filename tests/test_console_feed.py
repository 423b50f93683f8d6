"""The console's live feed against a real nats-server: below its rate it reads every envelope;
when the log runs faster than the server may push to it, it jumps to the newest and counts what
it jumped over, so its totals still add up and it never lags far behind."""

from __future__ import annotations

import asyncio

import msgspec
from conftest import wait_for

from bus import Bus
from bus.console.config import ConsoleConfig
from bus.console.feed import LiveFeed, TrafficFilter
from schemas.payloads import Note


async def test_a_log_faster_than_the_feed_is_jumped_over_and_counted(bus: Bus) -> None:
    """12 MB sent at once (more than the server's 8 MB burst) to a feed allowed 1 MB/s: the feed
    jumps ahead (`passed`) instead of reading it all, reaches the head within seconds, the
    per-second totals count every envelope, and a page is told how many it did not see."""
    feed = LiveFeed(ConsoleConfig(follow_rate_bps=8_000_000, max_behind_s=0.2, max_push=20, recent=10))
    bulky = "x" * 16_000
    async with asyncio.TaskGroup() as tasks:
        follower = tasks.create_task(feed.follow(bus))
        await wait_for(lambda: feed.following.is_set(), timeout_s=10)
        async with feed.page(TrafficFilter()) as page:
            sent = [await bus.send("watcher", Note(text=f"{n} {bulky}")) for n in range(750)]
            last = await bus.last_seq()
            # At 1 MB/s, reading all 12 MB would take ~4 s after the burst; jumping, the feed
            # reaches the head well within that (the bound is loose for a loaded machine).
            await wait_for(lambda: feed.head_seq >= last, timeout_s=30)
            passed = sum(s.passed for s in feed.stats())
            assert passed > 0
            assert sum(s.total for s in feed.stats()) == len(sent)
            feed.push_once()
            skipped, newest = 0, 0
            while not page.queue.empty():
                data = await page.next()
                if data.startswith(b"event: traffic"):
                    batch = msgspec.json.decode(data.split(b"data: ", 1)[1])
                    skipped += batch["skipped"]
                    newest = max(newest, *(item["seq"] for item in batch["items"]))
            assert newest == last and skipped >= passed
        follower.cancel()


async def test_a_feed_below_its_rate_reads_every_envelope(bus: Bus) -> None:
    """At a rate the feed may read, nothing is jumped over: every envelope is counted in its
    subject class and listed."""
    feed = LiveFeed(ConsoleConfig(max_push=500))
    async with asyncio.TaskGroup() as tasks:
        follower = tasks.create_task(feed.follow(bus))
        await wait_for(lambda: feed.following.is_set(), timeout_s=10)
        for n in range(200):
            await bus.send("watcher", Note(text=str(n)))
        last = await bus.last_seq()
        await wait_for(lambda: feed.head_seq >= last, timeout_s=10)
        assert sum(s.passed for s in feed.stats()) == 0 and not feed.flooded
        assert sum(s.inbox for s in feed.stats()) == 200
        assert [i.seq for i in feed.recent(TrafficFilter(agent="watcher"), 500)] == list(range(last - 199, last + 1))
        follower.cancel()
