"""The console's pure parts, without a server: the live feed's bounds and filters, the
conversation layout (collapsed runs, marked nodes, lanes), a context window split into parts
with token counts, and the parameter checks."""

from __future__ import annotations

import msgspec
import pytest
from starlette.datastructures import QueryParams

from bus.console import params
from bus.console.config import ConsoleConfig
from bus.console.context_window import context_window, tokens_for
from bus.console.diagram import layout
from bus.console.feed import LiveFeed, TooManyPages, TrafficFilter
from bus.log_reader import LogRecord
from schemas import encode, utcnow
from schemas.envelope import Envelope
from schemas.ids import new_id
from schemas.payloads import DeliveryReport, Note, Settlement


def record(seq: int, to: str = "alice", sender: str = "bob", kind_text: str = "hi") -> LogRecord:
    envelope = Envelope(id=new_id(), sender=sender, to=to, payload=Note(text=kind_text), created_at=utcnow())
    return LogRecord(seq=seq, time_ns=1_800_000_000_000_000_000 + seq * 1_000_000, subject=f"default.inbox.{to}.{sender}".encode(), data=encode(envelope))


async def test_a_push_is_bounded_filtered_and_a_slow_page_drops_old_batches() -> None:
    """At most `max_push` envelopes per push (the rest counted as skipped); a filtered page gets
    only its agent's; a page that never reads keeps `page_queue` batches; pages are capped."""
    feed = LiveFeed(ConsoleConfig(max_push=10, page_queue=2, max_pages=2, recent=50))
    async with feed.page(TrafficFilter()) as everything, feed.page(TrafficFilter(agent="carol")) as carol:
        for seq in range(1, 101):
            feed.take(record(seq, to="carol" if seq % 10 == 0 else "alice"))
        feed.push_once()
        batch = msgspec.json.decode((await everything.next()).split(b"data: ", 1)[1])
        assert [i["seq"] for i in batch["items"]] == list(range(91, 101)) and batch["skipped"] == 90
        mine = msgspec.json.decode((await carol.next()).split(b"data: ", 1)[1])
        assert [i["seq"] for i in mine["items"]] == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
        for round_ in range(5):
            feed.take(record(200 + round_))
            feed.push_once()
        assert everything.queue.qsize() == 2 and everything.dropped == 3
        with pytest.raises(TooManyPages):
            async with feed.page(TrafficFilter()):
                pass
    assert feed.pages == 0
    assert [i.seq for i in feed.recent(TrafficFilter(), 3)] == [202, 203, 204]
    assert sum(s.inbox for s in feed.stats()) == 105


async def test_undecodable_bytes_are_listed_not_raised() -> None:
    """Bytes that are not an envelope become a row saying why."""
    feed = LiveFeed(ConsoleConfig())
    feed.take(LogRecord(seq=1, time_ns=0, subject=b"default.inbox.a.b", data=b"\xff not json"))
    [item] = feed.recent(TrafficFilter(), 5)
    assert item.kind == "(undecodable)" and item.error


def test_delivery_reports_count_failed_and_retried_attempts_from_their_bytes() -> None:
    """A delivery report's failed and dead-lettered attempts count as failed, its retried ones as
    retried, in the second it was stored; outcome-like text inside a string counts for nothing."""
    settled = [Settlement(stream_seq=n, attempt=1, outcome=outcome, error='"outcome":"failed"')
               for n, outcome in enumerate(["handled", "failed", "retried", "dead_lettered", "retried", "handled"])]
    report = Envelope(id=new_id(), sender="clerk", payload=DeliveryReport(agent="clerk", consumer="c", settlements=settled),
                      created_at=utcnow())
    note = Envelope(id=new_id(), sender="bob", to="alice", payload=Note(text='{"outcome":"failed"}'), created_at=utcnow())
    feed = LiveFeed(ConsoleConfig())
    feed.take(LogRecord(seq=1, time_ns=0, subject=b"default.event.clerk.delivery.report", data=encode(report)))
    feed.take(LogRecord(seq=2, time_ns=0, subject=b"default.inbox.alice.bob", data=encode(note)))
    [second] = feed.stats()
    assert (second.failed, second.retried, second.event, second.inbox) == (2, 2, 1, 1)


async def test_a_push_decodes_only_the_newest_within_its_byte_budget() -> None:
    """Records larger than a push may decode are passed over, the newest first kept: the page
    gets the newest that fit in `push_bytes` (always at least one) and the rest counted as skipped."""
    big = "x" * 40_000
    feed = LiveFeed(ConsoleConfig(max_push=10, push_bytes=100_000))
    async with feed.page(TrafficFilter()) as page, feed.page(TrafficFilter(agent="alice")) as alice:
        for seq in range(1, 7):
            feed.take(record(seq, kind_text=big))
        feed.push_once()
        batch = msgspec.json.decode((await page.next()).split(b"data: ", 1)[1])
        assert [i["seq"] for i in batch["items"]] == [5, 6] and batch["skipped"] == 4
        mine = msgspec.json.decode((await alice.next()).split(b"data: ", 1)[1])
        assert [i["seq"] for i in mine["items"]] == [5, 6] and mine["skipped"] == 4
        feed.take(record(7, kind_text=big * 3))  # alone over the budget: still shown
        feed.push_once()
        batch = msgspec.json.decode((await page.next()).split(b"data: ", 1)[1])
        assert [i["seq"] for i in batch["items"]] == [7] and batch["skipped"] == 0


def test_layout_collapses_routine_runs_and_keeps_marked_nodes() -> None:
    """Routine events of one agent in a row are one counted node; contradictions, model calls and
    messages keep their own; lanes are the participants in order of appearance."""
    def step(n: int, kind: str, sender: str, category: str = "event", to: str | None = None) -> dict[str, object]:
        return {"step": n, "seq": 10 + n, "kind": kind, "sender": sender, "category": category, "recipient": to, "tag": None}

    steps = [
        step(1, "note", "coordinator", "inbox", "synthesiser"),
        step(2, "agent.step", "synthesiser"), step(3, "memory.turn.recorded", "synthesiser"), step(4, "agent.step", "synthesiser"),
        step(5, "llm.call.completed", "synthesiser"),
        step(6, "memory.contradiction.flagged", "synthesiser"), step(7, "memory.contradiction.flagged", "synthesiser"),
        step(8, "agent.step", "synthesiser"),
        step(9, "note", "synthesiser", "inbox", "writer"),
    ]
    diagram = layout("c", steps)
    assert diagram.lanes == ["coordinator", "synthesiser", "writer"]
    assert [(n.kind, n.count, n.mark) for n in diagram.nodes] == [
        ("note", 1, None), ("events", 3, None), ("llm.call.completed", 1, "model"),
        ("memory.contradiction.flagged", 1, "contradiction"), ("memory.contradiction.flagged", 1, "contradiction"),
        ("agent.step", 1, None), ("note", 1, None),
    ]
    assert diagram.nodes[1].seqs == [12, 13, 14] and diagram.nodes[1].label == "agent.step ×2, memory.turn.recorded"
    assert (diagram.nodes[-1].lane, diagram.nodes[-1].to_lane) == (1, 2)


def test_a_context_window_is_split_into_parts_with_token_counts() -> None:
    """Tools, the system prompt, core memory and each block, metadata, summaries and each
    message are parts; the estimate is characters / 3 (+ framing); nothing but whitespace between sections is left out."""
    system = ("Agent: w\nYou write.\n", "<core_memory>\nintro\n<block label=\"digest\" version=\"2\">\nday 1\n</block>\n</core_memory>",
              "<memory_metadata>\n3 turns\n</memory_metadata>\n<conversation_summaries>\nearlier\n</conversation_summaries>")
    request = {
        "model": "m", "max_tokens": 10,
        "system": [{"type": "text", "text": system[0]}, {"type": "text", "text": system[1]}, {"type": "text", "text": system[2]}],
        "tools": [{"name": "t", "description": "d", "input_schema": {"type": "object"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]},
                     {"role": "assistant", "content": [{"type": "tool_use", "id": "1", "name": "t", "input": {"a": 1}}]}],
    }
    window = context_window(request)
    assert window.error is None
    assert [p.section for p in window.parts] == [
        "tools", "system", "core memory", "block", "memory metadata", "summaries", "message", "message",
    ]
    assert window.parts[3].label == "block digest" and "day 1" in window.parts[3].text
    assert window.parts[6].tokens == tokens_for(len("hello there")) + 4
    def squeezed(text: str) -> str:
        return "".join(text.split())

    # Every character but whitespace is in some part (the core memory part holds its frame).
    assert sorted(squeezed("".join(p.text for p in window.parts[1:6]))) == sorted(squeezed("".join(system)))
    assert window.estimated_tokens == sum(p.tokens for p in window.parts)
    broken = context_window({"messages": "not a list"})
    assert broken.error and broken.parts[0].section == "raw"


def test_parameters_are_checked_before_use() -> None:
    """Names, ids, sequences, limits, kinds and points in time: what does not fit is a BadRequest
    naming the parameter."""
    assert params.name("writer") == "writer" and params.seq("12") == 12
    for bad in ("", "a b", "x'--", "a" * 65, None):
        with pytest.raises(params.BadRequest, match="agent must be"):
            params.name(bad)
    for bad in ("0", "-1", "1e3", "9" * 30, None):
        with pytest.raises(params.BadRequest, match="log sequence"):
            params.seq(bad)
    assert params.limit(QueryParams("limit=5"), 10, 20) == 5 and params.limit(QueryParams(""), 10, 20) == 10
    with pytest.raises(params.BadRequest, match="limit must be"):
        params.limit(QueryParams("limit=21"), 10, 20)
    assert params.optional_kind(QueryParams("kind=memory.*")) == "memory.*"
    with pytest.raises(params.BadRequest, match="kind must be"):
        params.optional_kind(QueryParams("kind=a*b"))
    assert params.as_of(QueryParams("as_of=7")) == 7
    assert params.as_of(QueryParams("as_of=2026-12-07T09:30")).tzinfo is not None
    with pytest.raises(params.BadRequest, match="unknown parameter"):
        params.unexpected(QueryParams("x=1"), ("agent",))
