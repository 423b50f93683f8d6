"""Retention on a real server: a conversation idle past its TTL is summarised and closed, as
events, by the agent itself (on its timer, on a message, on request); an active one is not; the
turns stay searchable (in memory and in the DuckDB views); nothing is closed twice, whether the
sweep is repeated, redelivered, retried after dying mid-sweep or run after a restart; the next
message starts a fresh window; `bus replay` of a handling that swept gives the same hash; and the
research demo's night closes the day's conversations. Time comes from a ManualClock or from
the messages: nothing sleeps."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import wait_for
from fixtures_agents.helpers import payloads, read_log
from test_llm_agent import CountingModel, Died, ctx_for, running, started
from test_research_demo import demo, ids, in_process_team

from agents.llm.offline.research import parse_claims
from agents.llm_agent import BlockSpec, LLMAgent
from agents.memory import AgentMemory, MemoryTools, ToolContext
from agents.memory.retention import (
    RULE,
    SWEEP_TOPIC,
    ManualClock,
    RetentionPolicy,
    decide,
    format_duration,
    run_timer,
    sweep_id,
    sweep_instant,
    sweep_notice,
)
from agents.research.replay import replay_workflow
from agents.research.team import RETENTION, TEAM
from bus import Bus, BusConfig
from projections.config import ProjectionSettings
from projections.service import ProjectionService
from schemas import Envelope, utcnow
from schemas.payloads import DeadLettered, LlmCallCompleted, Note, Notice
from schemas.payloads.llm import ToolUseBlock
from schemas.payloads.memory import (
    ConversationClosed,
    ConversationSummarised,
    TurnRecorded,
)

DAY = timedelta(days=1)
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


class Keeper(LLMAgent):
    """An LLM agent that closes conversations idle for a day, looking every hour."""

    role = "keeper"
    tool_names = ("core_memory_append", "conversation_search")
    core_blocks = (BlockSpec(label="shared", limit=4000),)
    retention = RetentionPolicy(idle_ttl=DAY, sweep_every=timedelta(hours=1))


def keeper(clock: ManualClock | None = None) -> Keeper:
    return Keeper(model=CountingModel(), model_name="offline", clock=clock)


async def seed(bus: Bus, agent: str, conversation: str, turns: int, at: datetime) -> None:
    """Turns of `agent` recorded long ago (a conversation a restarted agent finds in its log)."""
    for turn in range(1, turns + 1):
        await bus.record(agent, TurnRecorded(
            agent=agent, turn=turn, role="user" if turn % 2 else "assistant", at=at + timedelta(minutes=turn),
            text=f"old {conversation} turn {turn} about sodium anodes", conversation=conversation,
        ))


async def closes(bus: Bus, agent: str) -> list[ConversationClosed]:
    return await payloads(bus, f"default.event.{agent}.memory.conversation.closed", ConversationClosed)


async def summaries(bus: Bus, agent: str) -> list[ConversationSummarised]:
    return await payloads(bus, f"default.event.{agent}.memory.conversation.summarised", ConversationSummarised)


def sweep_request(bus: Bus, as_of: datetime) -> Envelope[Any]:
    """A sweep notice to "tester" that asks for an answer (handled directly, not published)."""
    return bus.envelope(sweep_notice(as_of), to="tester", sender="tester", reply_to="tester")


# -- the decision, the clock, the timer (no server) -------------------------------------------


def test_the_policy_is_typed_frozen_and_validated() -> None:
    """Retention is off by default; a non-positive TTL or a sub-second interval is refused; the
    policy decodes from JSON (ISO 8601 durations), so it can be configuration."""
    assert not RetentionPolicy().enabled and RetentionPolicy(idle_ttl=DAY).enabled
    with pytest.raises(ValueError, match="idle_ttl"):
        RetentionPolicy(idle_ttl=timedelta(0))
    with pytest.raises(ValueError, match="sweep_every"):
        RetentionPolicy(idle_ttl=DAY, sweep_every=timedelta(milliseconds=10))
    policy = msgspec.json.decode(b'{"idle_ttl": "P1D", "summarise": false, "sweep_every": null}', type=RetentionPolicy)
    assert policy == RetentionPolicy(idle_ttl=DAY, summarise=False, sweep_every=None)
    with pytest.raises(AttributeError):
        policy.idle_ttl = None  # type: ignore[misc]


@pytest.mark.parametrize(("delta", "exact", "text"), [
    (timedelta(days=2, hours=3, minutes=10), False, "2d 3h"),
    (timedelta(days=1), False, "1d"),
    (timedelta(days=1, seconds=5), True, "1d 0h"),
    (timedelta(hours=12), False, "12h"),
    (timedelta(minutes=45, seconds=2), False, "45m 2s"),
    (timedelta(seconds=30), True, "30s"),
    (timedelta(seconds=-3), False, "0s"),
])
def test_durations_read_in_their_two_largest_units(delta: timedelta, exact: bool, text: str) -> None:
    """The reason's durations: two units, the smaller dropped when zero unless exact."""
    assert format_duration(delta, exact=exact) == text


def test_the_decision_closes_only_conversations_idle_past_the_ttl() -> None:
    """Of three conversations, the one idle past the TTL is summarised (window turns only, with
    the block versions of the time) and closed with the rule and a reason stating it; the active
    one and the one already closed up to its last turn are left alone. Without `summarise`, the
    close comes alone. Deciding changes nothing in memory."""
    memory = AgentMemory("a")
    memory.apply(memory.blocks.create("plan", limit=100, actor="a", value="v1"))
    for conv, at in (("old", T0), ("live", T0 + timedelta(days=2)), ("done", T0)):
        for _ in range(3):
            memory.apply(memory.recall.record("user", at=at, text=f"{conv} talk", conversation=conv))
    memory.apply(ConversationClosed(agent="a", last_turn=3, reason="by hand", at=T0, conversation="done"))
    now = T0 + timedelta(days=2, hours=3)
    policy = RetentionPolicy(idle_ttl=DAY)

    (closure,) = decide(memory, policy, now=now)
    summary, closed = closure.events
    assert isinstance(summary, ConversationSummarised) and isinstance(closed, ConversationClosed)
    assert (summary.conversation, summary.first_turn, summary.last_turn, summary.turns) == ("old", 1, 3, 3)
    assert summary.block_versions == {"plan": 1} and "old talk" in summary.summary and summary.at == now
    assert (closed.conversation, closed.last_turn, closed.rule, closed.summary_id) == ("old", 3, RULE, summary.summary_id)
    assert closed.reason == "idle 2d 3h > ttl 1d" and closed.idle_s == 2 * 86400 + 3 * 3600 and closed.ttl_s == 86400
    assert memory.recall.conversation("old").closed_upto == 0

    (bare,) = decide(memory, RetentionPolicy(idle_ttl=DAY, summarise=False), now=now)
    assert bare.events == [msgspec.structs.replace(closed, summary_id=None)]
    assert decide(memory, RetentionPolicy(), now=now) == []


def test_a_close_moves_the_window_past_its_turns_and_keeps_them_in_recall() -> None:
    """A close without a summary still starts a fresh window: the next turn is the window's
    first, the closed turns stay searchable, and a repeated or older close changes nothing."""
    memory = AgentMemory("a")
    for text in ("one", "two", "three"):
        memory.apply(memory.recall.record("user", at=T0, text=text))
    closed = ConversationClosed(agent="a", last_turn=3, reason="idle", at=T0, rule=RULE)
    memory.apply(closed)
    memory.apply(closed)
    memory.apply(msgspec.structs.replace(closed, last_turn=1))
    memory.apply(memory.recall.record("user", at=T0, text="four"))
    conv = memory.recall.conversation()
    assert [e.turn for e in conv.window()] == [4] and conv.closed_upto == 3
    assert [t.turn for t in memory.recall.search("two")] == [2] and memory.stats().turns_in_window == 1


async def test_the_timer_fires_once_per_bucket_on_the_injected_clock() -> None:
    """The timer fires at once with the current bucket's start, then at each boundary the clock
    passes; a jump over many buckets fires once (for the bucket reached), never sleeping."""
    clock = ManualClock(T0 + timedelta(minutes=20))
    fired: list[tuple[int, datetime]] = []

    async def fire(bucket: int, as_of: datetime) -> None:
        fired.append((bucket, as_of))

    async with asyncio.TaskGroup() as tasks:
        timer = tasks.create_task(run_timer(timedelta(hours=1), clock, fire))
        await wait_for(lambda: clock.sleepers == 1, what="the timer to wait for the next hour")
        assert [at for _, at in fired] == [T0]
        looks = clock.looks
        clock.advance(timedelta(minutes=30))  # 09:50: the same bucket
        await wait_for(lambda: clock.looks > looks, what="the timer to look at the clock again")
        assert len(fired) == 1 and clock.sleepers == 1
        clock.advance(timedelta(hours=5))  # 14:50
        await wait_for(lambda: len(fired) == 2 and clock.sleepers == 1)
        timer.cancel()
    assert fired[1][1] == T0 + timedelta(hours=5) and fired[1][0] == fired[0][0] + 5
    assert sweep_id("default", "a", fired[0][0]) == sweep_id("default", "a", fired[0][0]) != sweep_id("default", "a", fired[1][0])
    assert sweep_instant(sweep_notice(T0)) == T0
    with pytest.raises(ValueError, match="ISO 8601"):
        sweep_instant(Notice(text="yesterday", topic=SWEEP_TOPIC))


# -- the agent on a real server -------------------------------------------------------------


async def test_an_idle_conversation_is_closed_by_the_agents_timer_and_an_active_one_is_not(bus: Bus) -> None:
    """A conversation idle for three days is summarised and closed by the agent's own timer as
    soon as it starts; the active one is not, not even by a sweep asked for now; once the
    injected clock has moved on two days, the timer closes it too. Each timer sweep is a notice
    the agent sent itself, one per hour bucket, and each close is an event with the rule, the
    reason, the bucket's instant and the summary it names."""
    clock = ManualClock(utcnow())
    await seed(bus, "keeper", "side", 3, clock.now() - timedelta(days=3, hours=2))
    async with running(keeper(clock), bus.config, "keeper"):
        await wait_for(lambda: _count(bus, "keeper", 1), what="the timer to close the idle conversation")
        await bus.send("keeper", Note(text="hello"))
        await wait_for(lambda: _turns(bus, "keeper", "main", 2), what="the new conversation's turns")
        answer = await bus.request("keeper", sweep_notice(utcnow()), timeout_s=10)
        assert answer.payload.data == {"closed": []} and "nothing idle > 1d" in answer.payload.text
        assert len(await closes(bus, "keeper")) == 1
        clock.advance(timedelta(days=2))
        await wait_for(lambda: _count(bus, "keeper", 2), what="the timer to close the conversation idle 2 days")

    side, main = await closes(bus, "keeper")
    side_summary, main_summary = await summaries(bus, "keeper")
    assert (side.conversation, side.last_turn, side.rule) == ("side", 3, RULE)
    # Idle as of the start of the hour the timer fired in: 3 days and 0 or 1 hours.
    assert re.fullmatch(r"idle 3d [01]h > ttl 1d", side.reason) and side.ttl_s == 86400 and side.idle_s > 3 * 86400
    assert side.summary_id == side_summary.summary_id and (side_summary.first_turn, side_summary.last_turn) == (1, 3)
    assert side_summary.block_versions == {"shared": 1}
    assert (main.conversation, main.last_turn, main.summary_id) == ("main", 2, main_summary.summary_id)
    assert main.reason.startswith("idle 1d ") and main.at.minute == main.at.second == 0  # the bucket's start
    notices = await payloads(bus, "default.inbox.keeper.keeper", Notice)
    assert [n.topic for n in notices] == [SWEEP_TOPIC, SWEEP_TOPIC]


async def _count(bus: Bus, agent: str, n: int) -> bool:
    return len(await closes(bus, agent)) >= n


async def _turns(bus: Bus, agent: str, conversation: str, n: int) -> bool:
    turns = await payloads(bus, f"default.event.{agent}.memory.turn.>", TurnRecorded)
    return sum(1 for t in turns if t.conversation == conversation) >= n


async def test_the_next_message_after_an_idle_gap_closes_the_old_window_and_starts_a_fresh_one(bus: Bus) -> None:
    """A message arriving three days after the last turn first sweeps (as of its own time,
    before its turn is recorded): the old turns are summarised and closed, the model sees only
    the new turn with the closing summary as background, and the new turns are numbered on."""
    await seed(bus, "tester", "main", 4, utcnow() - timedelta(days=3, hours=1))
    agent = await started(bus, keeper())
    sent = await bus.send("tester", Note(text="hello again"), sender="coordinator")
    await agent.on_note(sent.envelope.payload, ctx_for(bus, sent.envelope, 1))

    (closed,) = await closes(bus, "tester")
    (summary,) = await summaries(bus, "tester")
    assert (closed.last_turn, closed.summary_id, closed.at) == (4, summary.summary_id, sent.envelope.created_at)
    (call,) = await payloads(bus, "default.event.tester.llm.>", LlmCallCompleted)
    messages = call.request.messages
    assert len(messages) == 1 and messages[0].content[0].text == "[from coordinator] hello again"  # type: ignore[union-attr]
    background = call.request.system[2].text
    assert 'turns="1-4"' in background and "old main turn 1" in background
    assert "4 earlier turns are in recall memory outside this window" in background
    turns = await payloads(bus, "default.event.tester.memory.turn.>", TurnRecorded)
    assert [t.turn for t in turns] == [1, 2, 3, 4, 5, 6]
    conv = agent.memory.recall.conversation("main")
    assert [e.turn for e in conv.window()] == [5, 6] and conv.closed_upto == 4


@pytest.fixture
async def service(bus: Bus, tmp_path: Path) -> AsyncIterator[ProjectionService]:
    async with ProjectionService(bus, ProjectionSettings(db_path=str(tmp_path / "views.duckdb"))) as svc:
        yield svc


async def test_closed_turns_stay_searchable_and_the_views_say_who_closed_what_and_why(
    bus: Bus, service: ProjectionService
) -> None:
    """After retention closed a conversation, its turns are still found by recall search and the
    conversation_search tool, and in the DuckDB views: `recall` marks them closed, and a query
    over `recall_closures` answers which conversations retention closed and why."""
    await seed(bus, "tester", "main", 4, utcnow() - timedelta(days=3, hours=1))
    agent = await started(bus, keeper())
    sent = await bus.send("tester", Note(text="hello again"), sender="coordinator")
    await agent.on_note(sent.envelope.payload, ctx_for(bus, sent.envelope, 1))
    last = await bus.last_seq()

    assert [t.turn for t in agent.memory.recall.search("sodium anodes")] == [4, 3, 2, 1]
    use = ToolUseBlock(id="t1", name="conversation_search", input={"query": "sodium anodes"})
    found = MemoryTools(["conversation_search"]).execute(use, agent.memory, ToolContext(agent="tester", now=utcnow()))
    assert not found.result.is_error and "old main turn 1" in found.result.content

    result = await bus.query(
        "SELECT turn, closed, closed_seq IS NOT NULL AS has_seq FROM recall WHERE agent = ? ORDER BY turn",
        ["tester"], min_seq=last, timeout_s=10,
    )
    assert [(r["turn"], r["closed"], r["has_seq"]) for r in result.records()] == [
        (1, True, True), (2, True, True), (3, True, True), (4, True, True), (5, False, False), (6, False, False)]
    found_rows = await bus.query(
        "SELECT turn FROM recall WHERE agent = ? AND closed AND text ILIKE '%sodium%' ORDER BY turn", ["tester"],
        min_seq=last, timeout_s=10,
    )
    assert [r["turn"] for r in found_rows.records()] == [1, 2, 3, 4]
    why = await bus.query(
        "SELECT c.agent, c.conversation, c.last_turn, c.reason, c.ttl_s, s.turns AS summarised_turns "
        "FROM recall_closures c LEFT JOIN recall_summaries s USING (summary_id) WHERE c.rule = ?",
        [RULE], min_seq=last, timeout_s=10,
    )
    (row,) = why.records()
    assert (row["agent"], row["conversation"], row["last_turn"], row["ttl_s"], row["summarised_turns"]) == (
        "tester", "main", 4, 86400.0, 4)
    assert re.fullmatch(r"idle 3d 0h > ttl 1d", row["reason"])


async def test_a_repeated_redelivered_or_restarted_sweep_closes_nothing_twice(bus: Bus) -> None:
    """The first sweep closes the idle conversation; the same sweep redelivered replays its
    recorded step (nothing stored), a second sweep and a sweep after a restart (a new instance
    folded from the log) find nothing to close: one summary and one close in the log."""
    await seed(bus, "tester", "main", 4, utcnow() - timedelta(days=3))
    agent = await started(bus, keeper())
    as_of = utcnow()
    first = sweep_request(bus, as_of)
    answer = await agent.on_notice(first.payload, ctx_for(bus, first, 1))
    assert answer is not None and [c["last_turn"] for c in answer.data["closed"]] == [4]
    before = await bus.last_seq()
    assert await agent.on_notice(first.payload, ctx_for(bus, first, 2)) == answer
    assert await bus.last_seq() == before

    second = sweep_request(bus, as_of + timedelta(hours=1))
    assert (await agent.on_notice(second.payload, ctx_for(bus, second, 1))).data["closed"] == []  # type: ignore[union-attr]
    restarted = await started(bus, keeper())
    assert restarted.memory.recall.conversation("main").closed_upto == 4
    third = sweep_request(bus, as_of + timedelta(days=5))
    assert (await restarted.on_notice(third.payload, ctx_for(bus, third, 1))).data["closed"] == []  # type: ignore[union-attr]
    assert len(await closes(bus, "tester")) == 1 and len(await summaries(bus, "tester")) == 1


async def test_a_sweep_retried_after_dying_between_summary_and_close_records_each_once(bus: Bus) -> None:
    """The process dies right after the sweep stored its summary: the redelivery on a restarted
    agent finds the summary folded, records only the close, and the close names that summary."""
    await seed(bus, "tester", "main", 4, utcnow() - timedelta(days=3))
    first = await started(bus, keeper())
    record = first.log.record

    async def dying_record(event: Any, **kwargs: Any) -> Any:
        stored = await record(event, **kwargs)
        if isinstance(event, ConversationSummarised):
            raise Died
        return stored

    first.log.record = dying_record  # type: ignore[method-assign]
    envelope = sweep_request(bus, utcnow())
    with pytest.raises(Died):
        await first.on_notice(envelope.payload, ctx_for(bus, envelope, 1))
    assert len(await summaries(bus, "tester")) == 1 and not await closes(bus, "tester")

    second = await started(bus, keeper())
    answer = await second.on_notice(envelope.payload, ctx_for(bus, envelope, 2))
    assert answer is not None and [c["last_turn"] for c in answer.data["closed"]] == [4]
    (summary,) = await summaries(bus, "tester")
    (closed,) = await closes(bus, "tester")
    assert closed.summary_id == summary.summary_id and closed.rule == RULE


async def test_a_sweep_notice_without_an_instant_is_dead_lettered_with_the_reason(bus_config: BusConfig) -> None:
    """Bad input loses nothing and crashes nothing: the notice goes to the dead letters, saying
    what the text must be, and the agent goes on answering sweeps."""
    async with Bus(bus_config) as bus, running(keeper(ManualClock(utcnow())), bus_config, "keeper"):
        await bus.send("keeper", Notice(text="yesterday", topic=SWEEP_TOPIC))
        answer = await bus.request("keeper", sweep_notice(utcnow()), timeout_s=10)
        assert "nothing idle" in answer.payload.text
        await wait_for(lambda: _dead(bus), what="the dead letter")
        (dead,) = await payloads(bus, "default.dead.>", DeadLettered)
        assert "ISO 8601" in f"{dead.reason} {dead.error}" and dead.original_kind == "notice"


async def _dead(bus: Bus) -> bool:
    return bool(await payloads(bus, "default.dead.>", DeadLettered))


async def test_replaying_a_handling_that_swept_gives_the_same_hash(bus: Bus) -> None:
    """`bus replay` of a handling whose message closed an idle conversation re-decides the
    summary and the close (as of the message's time, on memory as it stood) and produces the
    same events as the log holds, without a model."""
    await seed(bus, "tester", "main", 4, utcnow() - timedelta(days=3))
    agent = await started(bus, keeper())
    sent = await bus.send("tester", Note(text="hello again"), sender="coordinator")
    await agent.on_note(sent.envelope.payload, ctx_for(bus, sent.envelope, 1))
    report = await replay_workflow(bus, sent.envelope.correlation_id, {"tester": Keeper})
    (handling,) = report.handlings
    assert report.same and handling.recorded == handling.replayed == 4  # summary, close, 2 turns
    assert len(await closes(bus, "tester")) == 1


# -- the research demo ------------------------------------------------------------------------


async def test_the_research_demos_night_closes_the_days_conversations(bus_config: BusConfig, tmp_path: Path) -> None:
    """Between two days the demo moves its clock on a day and asks each agent to sweep: every
    agent's day-1 conversation is summarised and closed, one printed line each with the reason;
    day 2 starts each agent on a fresh window (one message, the closing summary as background),
    still reports exactly day 2's findings, and replays to the same events."""
    lines: list[str] = []
    config = msgspec.structs.replace(bus_config, name="coordinator")
    async with Bus(config) as bus:
        async with in_process_team(config):
            team = demo(bus, tmp_path, lines)
            await team.run_day(1)
            closed = await team.night()
            again = await team.night()
            second = await team.run_day(2)
        day2_calls = [env.payload for _, env in await read_log(bus, "default.event.*.llm.>")
                      if env.correlation_id == second.correlation_id and isinstance(env.payload, LlmCallCompleted)]
        day_summaries = await payloads(bus, "default.event.*.memory.conversation.summarised", ConversationSummarised)
        replay = await replay_workflow(bus, second.correlation_id)

    assert [c.agent for c in closed] == list(TEAM) and again == []
    assert all(c.rule == RULE and c.ttl_s == RETENTION.idle_ttl.total_seconds() for c in closed)  # type: ignore[union-attr]
    night = lines[lines.index(next(line for line in lines if line.startswith("── night"))):]
    printed = [line for line in night if " closed " in line]
    assert len(printed) == 4 and all(re.search(r"closed +main up to turn \d+: idle 1d 0h > ttl 12h \(summarised\)", line)
                                     for line in printed)
    assert [line.split()[0] for line in printed] == list(TEAM)

    by_id = {s.summary_id: s for s in day_summaries}
    for c in closed:
        first_call = next(call for call in day2_calls if call.agent == c.agent)
        assert len(first_call.request.messages) == 1, c.agent
        s = by_id[c.summary_id]  # type: ignore[index]
        assert f'turns="{s.first_turn}-{s.last_turn}"' in first_call.request.system[2].text

    assert {claim["ref"] for claim in parse_claims(second.report)} == ids(2)
    assert replay.same, [(h.agent, h.recorded, h.replayed, h.error) for h in replay.handlings]

