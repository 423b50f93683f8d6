"""The memory views (facts, contradictions, blocks, recall, llm_calls): what each shows for
memory and LLM-call events recorded with `bus.record`, the bitemporal questions the views README
documents, and that rebuilding them equals folding them incrementally."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from bus import Bus
from bus.log_reader import LogRecord
from conftest import read_records
from projections.batch import build_batch
from projections.config import ProjectionSettings
from projections.service import ProjectionService
from projections.store import Store
from projections.views import VIEWS
from schemas import new_id
from schemas.payloads.llm import (
    LlmCallCompleted,
    LlmCallFailed,
    Message,
    ModelRequest,
    ModelResponse,
    TextBlock,
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
    Usage,
)
from schemas.payloads.memory import (
    BlockAppended,
    BlockAttached,
    BlockCreated,
    BlockDetached,
    BlockReplaced,
    BlockSet,
    Citation,
    Claim,
    ContradictionFlagged,
    ConversationClosed,
    ConversationSummarised,
    FactRecorded,
    FactRetracted,
    FactSuperseded,
    TurnRecorded,
)

MEMORY_VIEWS = ("facts", "contradictions", "blocks", "recall", "llm_calls")
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


@pytest.fixture
async def service(bus: Bus, tmp_path: Path) -> AsyncIterator[ProjectionService]:
    async with ProjectionService(bus, ProjectionSettings(db_path=str(tmp_path / "views.duckdb"))) as svc:
        yield svc


async def rows(bus: Bus, sql: str, *params: Any, min_seq: int | None = None) -> list[dict[str, Any]]:
    result = await bus.query(sql, list(params), min_seq=min_seq, timeout_s=10)
    return result.records()


def fact(fact_id: str, subject: str, statement: str, *, by: str = "reader", value: str = "", **extra: Any) -> FactRecorded:
    return FactRecorded(
        fact_id=fact_id, subject=subject, statement=statement, value=value, recorded_by=by, confidence=0.8,
        source=Citation(ref=f"paper:{fact_id}", title="A study", quote="we measured"), **extra,
    )


def claim(f: FactRecorded) -> Claim:
    return Claim(fact_id=f.fact_id, subject=f.subject, statement=f.statement, source=f.source.ref,
                 recorded_by=f.recorded_by, value=f.value, confidence=f.confidence)


# -- facts and contradictions ----------------------------------------------------------------


async def test_facts_are_bitemporal_and_answer_the_documented_questions(bus: Bus, service: ProjectionService) -> None:
    """Facts keep their source, confidence and world time; a supersession ends a fact (never
    deletes it) and a repeated record or an ending of an inactive fact changes nothing. The
    README's three queries answer from plain SQL: new since S, what an agent knew as of S, and
    open contradictions about a subject."""
    up = fact("f1", "fec:retention@cell-a", "FEC raises retention", value="increases",
              valid_from=T0, tags=["fec", "anode"], category="finding")
    down = fact("f2", "fec:retention@cell-a", "FEC lowers retention", value="decreases", by="critic")
    other = fact("f3", "water:gas", "Water makes gas", value="increases")
    first = await bus.record("reader", up)
    await bus.record("critic", down)
    await bus.record("reader", other)
    await bus.record("reader", up)  # a retried record: same fact id
    flag = await bus.record("critic", ContradictionFlagged(
        contradiction_id="c1", claim_a=claim(up), claim_b=claim(down), rule="opposite-direction", actor="critic"))
    known_then = flag.ack.seq
    newer = fact("f4", "fec:retention@cell-a", "FEC raises retention below 4.3 V", value="increases")
    await bus.record("reader", newer)
    superseded = await bus.record("reader", FactSuperseded(
        fact_id="f1", by="f4", rule="narrower-claim", actor="reader", contradiction_id="c1", valid_to=T0 + timedelta(days=1)))
    again = await bus.record("reader", FactRetracted(fact_id="f1", rule="late", actor="reader"))

    facts = {f["fact_id"]: f for f in await rows(bus, "SELECT * FROM facts", min_seq=again.ack.seq)}

    assert set(facts) == {"f1", "f2", "f3", "f4"}
    f1 = facts["f1"]
    assert (f1["status"], f1["current"], f1["ended_seq"], f1["ended_by_fact"], f1["ended_rule"]) == (
        "superseded", False, superseded.ack.seq, "f4", "narrower-claim")
    assert (f1["recorded_seq"], f1["subject_base"], f1["category"], f1["tags"]) == (
        first.ack.seq, "fec:retention", "finding", ["fec", "anode"])
    assert (f1["source_ref"], f1["confidence"], f1["valid_from"], f1["valid_to"]) == (
        "paper:f1", 0.8, T0, T0 + timedelta(days=1))
    assert f1["ended_contradiction_id"] == "c1" and f1["recorded_at"] == first.envelope.created_at
    anomalies = await rows(bus, "SELECT kind, fact_id FROM fact_anomalies ORDER BY seq")
    assert anomalies == [{"kind": "duplicate_record", "fact_id": "f1"}, {"kind": "end_of_inactive_fact", "fact_id": "f1"}]

    new_since = await rows(bus, "SELECT fact_id FROM facts WHERE recorded_seq > ? ORDER BY recorded_seq", known_then)
    assert [r["fact_id"] for r in new_since] == ["f4"]
    changed_since = await rows(bus, "SELECT fact_id FROM facts WHERE recorded_seq > ? OR ended_seq > ? ORDER BY fact_id",
                               known_then, known_then)
    assert [r["fact_id"] for r in changed_since] == ["f1", "f4"]

    as_of = ("SELECT fact_id FROM facts WHERE recorded_by = ? AND recorded_seq <= ? "
             "AND (ended_seq IS NULL OR ended_seq > ?) ORDER BY fact_id")
    assert [r["fact_id"] for r in await rows(bus, as_of, "reader", known_then, known_then)] == ["f1", "f3"]
    assert [r["fact_id"] for r in await rows(bus, as_of, "reader", again.ack.seq, again.ack.seq)] == ["f3", "f4"]
    as_of_time = ("SELECT fact_id FROM facts WHERE recorded_by = ? AND recorded_at <= ? "
                  "AND (ended_at IS NULL OR ended_at > ?) ORDER BY fact_id")
    t = flag.envelope.created_at.isoformat()
    assert [r["fact_id"] for r in await rows(bus, as_of_time, "reader", t, t)] == ["f1", "f3"]

    [c] = await rows(bus, "SELECT * FROM contradictions")
    assert (c["fact_a"], c["fact_b"], c["statement_b"], c["recorded_by_b"], c["rule"], c["actor"]) == (
        "f1", "f2", "FEC lowers retention", "critic", "opposite-direction", "critic")
    assert (c["open"], c["resolved_seq"], c["resolved_fact"], c["resolved_by_event_kind"]) == (
        False, superseded.ack.seq, "f1", "memory.fact.superseded")
    open_about = "SELECT contradiction_id FROM contradictions WHERE open AND ? IN (subject_a, subject_b)"
    assert await rows(bus, open_about, "fec:retention@cell-a") == []
    was_open = ("SELECT contradiction_id FROM contradictions WHERE ? IN (subject_a, subject_b) "
                "AND flagged_seq <= ? AND (resolved_seq IS NULL OR resolved_seq > ?)")
    assert await rows(bus, was_open, "fec:retention@cell-a", known_then, known_then) == [{"contradiction_id": "c1"}]


async def test_an_open_contradiction_stays_open_until_one_of_its_facts_names_it(bus: Bus, service: ProjectionService) -> None:
    """Retracting an unrelated fact, or one of the pair without naming the contradiction, leaves
    it open; the retraction that names it resolves it."""
    a, b = fact("fa", "salt:conductivity", "LiFSI conducts best", value="high"), fact("fb", "salt:conductivity", "LiFSI conducts worst", value="low")
    for f in (a, b, fact("fc", "other", "unrelated")):
        await bus.record("reader", f)
    await bus.record("critic", ContradictionFlagged(contradiction_id="c9", claim_a=claim(a), claim_b=claim(b), rule="r", actor="critic"))
    await bus.record("reader", FactRetracted(fact_id="fc", rule="wrong", actor="reader", contradiction_id="c9"))
    plain = await bus.record("reader", FactRetracted(fact_id="fa", rule="wrong", actor="reader"))
    query = "SELECT contradiction_id FROM contradictions WHERE open AND ? IN (subject_a, subject_b)"
    assert await rows(bus, query, "salt:conductivity", min_seq=plain.ack.seq) == [{"contradiction_id": "c9"}]

    named = await bus.record("reader", FactRetracted(fact_id="fb", rule="outvoted", actor="lead", contradiction_id="c9"))
    [c] = await rows(bus, "SELECT open, resolved_fact, resolved_actor, resolved_rule FROM contradictions", min_seq=named.ack.seq)
    assert c == {"open": False, "resolved_fact": "fb", "resolved_actor": "lead", "resolved_rule": "outvoted"}


# -- blocks ---------------------------------------------------------------------------------


async def test_blocks_keep_every_version_and_reject_stale_and_oversized_writes(bus: Bus, service: ProjectionService) -> None:
    """Each applied write is a version row ending where the next begins; a redelivered write is
    ignored, a stale one and one over the limit are kept as rejected rows; holders come from
    the creation, attach and detach."""
    created = await bus.record("lead", BlockCreated(block_id="b1", label="plan", limit=20, actor="lead",
                                                    value="start", holders=["lead", "reader"]))
    v2 = await bus.record("lead", BlockAppended(block_id="b1", text=" more", value="start more", version=2, actor="lead"))
    await bus.record("lead", BlockAppended(block_id="b1", text=" more", value="start more", version=2, actor="lead"))
    await bus.record("reader", BlockSet(block_id="b1", value="reader's view", version=2, actor="reader"))
    await bus.record("lead", BlockSet(block_id="b1", value="x" * 21, version=3, actor="lead"))
    v4 = await bus.record("lead", BlockSet(block_id="b1", value="jumped", version=4, actor="lead", reason="rethink"))
    await bus.record("lead", BlockSet(block_id="nope", value="?", version=2, actor="lead"))
    await bus.record("lead", BlockAttached(block_id="b1", agent="critic", actor="lead"))
    await bus.record("lead", BlockAttached(block_id="b1", agent="critic", actor="lead"))
    last = await bus.record("lead", BlockDetached(block_id="b1", agent="reader", actor="lead"))

    versions = await rows(bus, "SELECT block_id, version, value, op, seq, ended_seq, gap, rejected, reject_reason, current, label, \"limit\" "
                               "FROM blocks ORDER BY seq", min_seq=last.ack.seq)
    summary = [(v["block_id"], v["version"], v["op"], v["rejected"], v["reject_reason"], v["current"]) for v in versions]
    assert summary == [
        ("b1", 1, "created", False, None, False),
        ("b1", 2, "appended", False, None, False),
        ("b1", 2, "set", True, "stale_write", False),
        ("b1", 3, "set", True, "over_limit", False),
        ("b1", 4, "set", False, None, True),
        ("nope", 2, "set", True, "unknown_block", False),
    ]
    assert (versions[0]["ended_seq"], versions[1]["ended_seq"], versions[4]["ended_seq"]) == (v2.ack.seq, v4.ack.seq, None)
    assert versions[4]["gap"] is True and versions[1]["gap"] is False
    assert (versions[0]["label"], versions[0]["limit"]) == ("plan", 20)

    as_of = await rows(bus, "SELECT value FROM blocks WHERE block_id = 'b1' AND NOT rejected AND seq <= ? "
                            "AND (ended_seq IS NULL OR ended_seq > ?)", v2.ack.seq, v2.ack.seq)
    assert as_of == [{"value": "start more"}]

    holders = await rows(bus, "SELECT agent, attached_seq, detached_seq, holding FROM block_holders ORDER BY agent")
    assert [(h["agent"], h["holding"]) for h in holders] == [("critic", True), ("lead", True), ("reader", False)]
    assert holders[2]["attached_seq"] == created.ack.seq and holders[2]["detached_seq"] == last.ack.seq


# -- recall ---------------------------------------------------------------------------------


async def test_recall_keeps_turns_searchable_and_marks_eviction_and_close(bus: Bus, service: ProjectionService) -> None:
    """Turns are rows searchable by text, role and time; a duplicate turn number is ignored; a
    summary marks the turns it covers, a close marks the conversation's turns, tool calls and
    tool errors are counted from the content blocks."""
    at = [T0 + timedelta(minutes=i) for i in range(5)]
    await bus.record("reader", TurnRecorded(agent="reader", turn=1, role="user", at=at[0], text="What about sodium anodes?", sender="lead"))
    await bus.record("reader", TurnRecorded(
        agent="reader", turn=2, role="assistant", at=at[1], text="searching [archival_search]",
        content=[TextBlock(text="searching"), ToolUseBlock(id="t1", name="archival_search", input={"q": "sodium"})]))
    await bus.record("reader", TurnRecorded(agent="reader", turn=2, role="assistant", at=at[1], text="duplicate"))
    await bus.record("reader", TurnRecorded(
        agent="reader", turn=3, role="user", at=at[2], text="tool failed",
        content=[ToolResultBlock(tool_use_id="t1", content="boom", is_error=True)]))
    summary = await bus.record("reader", ConversationSummarised(
        agent="reader", summary_id="s1", first_turn=1, last_turn=2, summary="asked about sodium", method="extractive",
        turns=2, tokens_evicted=40, at=at[3], block_versions={"plan": 3}))
    await bus.record("reader", TurnRecorded(agent="reader", turn=4, role="user", at=at[3], text="Sodium again", conversation="side"))
    closed = await bus.record("reader", ConversationClosed(agent="reader", last_turn=3, reason="done", at=at[4]))

    turns = await rows(bus, "SELECT * FROM recall ORDER BY seq", min_seq=closed.ack.seq)
    assert [(t["conversation"], t["turn"], t["role"]) for t in turns] == [
        ("main", 1, "user"), ("main", 2, "assistant"), ("main", 3, "user"), ("side", 4, "user")]
    assert turns[1]["tool_calls"] == ["archival_search"] and turns[2]["tool_errors"] == 1
    assert turns[0]["content_json"] is None and turns[1]["content_json"][1]["name"] == "archival_search"
    assert [(t["summarised_by"], t["evicted_seq"]) for t in turns] == [
        ("s1", summary.ack.seq), ("s1", summary.ack.seq), (None, None), (None, None)]
    assert [t["closed"] for t in turns] == [True, True, True, False]
    assert turns[0]["sender"] == "lead" and turns[0]["turn_at"] == at[0]

    found = await rows(bus, "SELECT turn FROM recall WHERE agent = ? AND text ILIKE '%' || ? || '%' AND role = ? AND turn_at >= ? ORDER BY turn",
                       "reader", "sodium", "user", at[0].isoformat())
    assert [r["turn"] for r in found] == [1, 4]
    [s] = await rows(bus, "SELECT * FROM recall_summaries")
    assert (s["first_turn"], s["last_turn"], s["block_versions"], s["seq"]) == (1, 2, {"plan": 3}, summary.ack.seq)


# -- llm calls ------------------------------------------------------------------------------


def _request() -> ModelRequest:
    return ModelRequest(
        model="claude-test", max_tokens=100, system=[TextBlock(text="You read papers.", cache=True)],
        messages=[Message(role="user", content=[TextBlock(text="hi")])],
        tools=[ToolSpec(name="archival_search", description="search", input_schema={"type": "object"})],
    )


async def test_llm_calls_keep_the_full_request_response_tokens_and_cost(bus: Bus, service: ProjectionService) -> None:
    """A completed call has its tokens (cache reads and writes apart), tool calls, text, latency
    and cost, and its full request and response JSON; a failed one its error and no tokens; an
    unpriced model has a NULL cost, not 0; a call id recorded twice is one row."""
    response = ModelResponse(
        id="msg_1", model="claude-test", stop_reason="tool_use",
        content=[TextBlock(text="Let me look."), ToolUseBlock(id="t1", name="archival_search", input={"q": "x"})],
        usage=Usage(input_tokens=120, output_tokens=30, cache_read_input_tokens=900, cache_creation_input_tokens=50))
    done = LlmCallCompleted(agent="reader", call_id="k1", provider="anthropic", model="claude-test", request=_request(),
                            response=response, request_sha256="ab" * 32, latency_ms=812.5, step="llm:1")
    day = new_id()
    await bus.record("reader", done, correlation_id=day)
    await bus.record("reader", done, correlation_id=day)
    failed = await bus.record("reader", LlmCallFailed(
        agent="reader", call_id="k2", provider="anthropic", model="claude-test", request=_request(), request_sha256="cd" * 32,
        error_type="RateLimited", message="slow down", retryable=True, latency_ms=20.0, status_code=429))

    calls = {c["call_id"]: c for c in await rows(bus, "SELECT * FROM llm_calls", min_seq=failed.ack.seq)}
    assert set(calls) == {"k1", "k2"}
    k1, k2 = calls["k1"], calls["k2"]
    assert (k1["ok"], k1["input_tokens"], k1["output_tokens"], k1["cache_read_tokens"], k1["cache_write_tokens"]) == (True, 120, 30, 900, 50)
    assert (k1["tool_calls"], k1["response_text"], k1["stop_reason"], k1["cost_usd"]) == (["archival_search"], "Let me look.", "tool_use", None)
    assert (k1["messages"], k1["tools"], k1["system_chars"], k1["latency_ms"], k1["correlation_id"]) == (1, 1, 16, 812.5, day)
    assert k1["request_json"]["system"][0]["text"] == "You read papers." and k1["response_json"]["id"] == "msg_1"
    assert (k2["ok"], k2["input_tokens"], k2["error_type"], k2["retryable"], k2["status_code"]) == (False, None, "RateLimited", True, 429)
    [totals] = await rows(bus, "SELECT sum(cost_usd) AS cost, count(*) FILTER (WHERE cost_usd IS NULL) AS unpriced FROM llm_calls")
    assert totals == {"cost": None, "unpriced": 2}


# -- determinism ----------------------------------------------------------------------------


async def _record_memory_workload(bus: Bus, seed: int) -> int:
    """A random but valid-looking mix of every memory event, with duplicates, stale writes and
    out-of-order endings. Returns the last sequence."""
    rng = random.Random(seed)
    last = 0
    facts: list[FactRecorded] = []
    versions = {"b0": 1, "b1": 1}
    for block in versions:
        last = (await bus.record("lead", BlockCreated(block_id=block, label=block, limit=40, actor="lead", holders=["lead"]))).ack.seq
    turns = {"reader": 0, "critic": 0}
    for i in range(160):
        roll = rng.random()
        agent = rng.choice(list(turns))
        if roll < 0.25:
            f = fact(f"f{i}", f"s{rng.randrange(4)}", f"statement {i}", by=agent, value=rng.choice(["up", "down"]))
            facts.append(f)
            payload: Any = f if rng.random() > 0.1 or not facts else facts[rng.randrange(len(facts))]
        elif roll < 0.35 and facts:
            target = rng.choice(facts)
            payload = (FactSuperseded(fact_id=target.fact_id, by=f"f{i}", rule="newer", actor=agent, contradiction_id="c0")
                       if rng.random() < 0.5 else FactRetracted(fact_id=target.fact_id, rule="wrong", actor=agent))
        elif roll < 0.42 and len(facts) > 1:
            a, b = rng.sample(facts, 2)
            payload = ContradictionFlagged(contradiction_id=rng.choice(["c0", f"c{i}"]), claim_a=claim(a), claim_b=claim(b), rule="r", actor=agent)
        elif roll < 0.65:
            block = rng.choice(list(versions))
            version = versions[block] + rng.choice([1, 1, 1, 0, 2, -1])
            value = rng.choice(["a", "bb", "ccc", "x" * 50])
            if version > versions[block] and len(value) <= 40:
                versions[block] = version
            payload = BlockSet(block_id=block, value=value, version=max(version, 1), actor=agent)
        elif roll < 0.72:
            kind = rng.choice([BlockAttached, BlockDetached])
            payload = kind(block_id=rng.choice(list(versions)), agent=rng.choice(["reader", "critic"]), actor="lead")
        elif roll < 0.92:
            turns[agent] += rng.choice([1, 1, 1, 0])
            payload = TurnRecorded(agent=agent, turn=max(turns[agent], 1), role=rng.choice(["user", "assistant"]), at=T0, text=f"turn {i}")
        elif roll < 0.97:
            payload = ConversationSummarised(agent=agent, summary_id=f"s{i}", first_turn=1, last_turn=max(turns[agent] - 1, 1),
                                             summary="...", method="m", turns=1, tokens_evicted=1, at=T0)
        else:
            payload = ConversationClosed(agent=agent, last_turn=turns[agent], reason="end", at=T0)
        last = (await bus.record(agent, payload)).ack.seq
    return last


def _fold_hashes(path: Path, records: list[LogRecord], sizes: list[int]) -> dict[str, str]:
    store = Store(path, stream="CONTINUUM_DEFAULT", views=tuple(v for v in VIEWS if v.name in MEMORY_VIEWS))
    store.open()
    try:
        at = 0
        for size in sizes:
            if at >= len(records):
                break
            store.apply(build_batch(records[at:at + size]))
            at += size
        return store.content_hashes()
    finally:
        store.close()


async def test_memory_views_do_not_depend_on_batch_boundaries(bus: Bus, tmp_path: Path) -> None:
    """The same memory log (duplicates, stale writes, endings of inactive facts included) folded
    whole, one event at a time and in random batches gives identical tables."""
    last = await _record_memory_workload(bus, seed=5)
    records = await read_records(bus, last)
    rng = random.Random(5)

    whole = _fold_hashes(tmp_path / "whole.duckdb", records, [len(records)])
    single = _fold_hashes(tmp_path / "single.duckdb", records, [1] * len(records))
    uneven = _fold_hashes(tmp_path / "uneven.duckdb", records, [rng.randrange(1, 30) for _ in records])

    assert whole == single == uneven
    assert {k.split(".")[0] for k in whole} == set(MEMORY_VIEWS)
    assert all(int(whole[t].split(":")[0]) > 0 for t in ("facts.facts", "blocks.block_versions", "recall.recall"))


async def test_rebuilt_memory_views_equal_the_live_ones(bus: Bus, tmp_path: Path) -> None:
    """Views folded live by the projection service, in whatever batches the events arrived,
    equal the same views rebuilt from sequence 1 by that service (the framework's content hash)."""
    settings = ProjectionSettings(db_path=str(tmp_path / "views.duckdb"))
    async with ProjectionService(bus, settings) as service:
        last = await _record_memory_workload(bus, seed=11)
        await bus.query("SELECT 1", min_seq=last)
        live = {k: v for k, v in (await service.content_hashes()).items() if k.split(".")[0] in MEMORY_VIEWS}
        report = await service.rebuild(list(MEMORY_VIEWS), wait=True)
        rebuilt = {k: v for k, v in (await service.content_hashes()).items() if k.split(".")[0] in MEMORY_VIEWS}
    assert sorted(report.views) == sorted(MEMORY_VIEWS) and report.applied_seq == last
    assert rebuilt == live
    assert int(rebuilt["facts.facts"].split(":")[0]) > 0


# -- one write per batch ------------------------------------------------------------------------


def _raw_log(payloads: list[bytes]) -> list[LogRecord]:
    """Log records carrying these payload JSON texts verbatim (odd spellings included)."""
    records = []
    for seq, payload in enumerate(payloads, start=1):
        data = msgspec.json.encode({"id": f"e{seq}", "sender": "t", "payload": msgspec.Raw(payload),
                                    "created_at": f"2026-03-02T09:00:{seq % 60:02d}.{seq:06d}Z"})
        records.append(LogRecord(seq, 1_772_442_000_000_000_000 + seq, b"continuum.event.t.memory", data))
    return records


def _one_write_payloads() -> list[bytes]:
    """Facts and block writes in the shapes msgspec writes and in shapes it does not: explicit
    nulls and empty strings, non-string fields, duplicate keys, spaces, escapes; repeats, stale,
    duplicate, oversized, gapped and unknown-block writes."""
    enc = msgspec.json.encode
    full = fact("f1", "fec:retention@cell-a@x", "FEC raises retention é ✓", value="increases", tags=["fec", "anode"],
                category="finding", valid_from=T0, valid_to=T0 + timedelta(days=2))
    odd = [
        (b'{"kind":"memory.fact.recorded","fact_id":"f2","subject":"@x","statement":"","value":"","category":"",'
         b'"confidence":1,"recorded_by":null,"tags":"fec","source":{"ref":"r","title":null},'
         b'"valid_from":"2026-03-02 10:00:00+02","valid_to":"not a time"}'),
        b'{"kind":"memory.fact.recorded","fact_id":"f3","subject":"s","statement":"x","confidence":0.1,"tags":[]}',
        b'{"kind":"memory.fact.recorded","fact_id":"f4","subject":"s","statement":"x","confidence":true}',
        b'{"kind":"memory.fact.recorded","fact_id":"f5","subject":"s","statement":"x","tags":[1,"a"],"source":"p"}',
        b'{"kind":"memory.fact.recorded","fact_id":"f6","fact_id":"f7","subject":"s","statement":"first key"}',
        b'{"kind": "memory.fact.recorded", "fact_id": "f8", "subject": "s", "statement": "spaced"}',
        b'{"kind":"memory.fact.recorded","fact_id":"f9","subject":"s","statement":"\\u00e9scaped"}',
        b'{"kind":"memory.fact.recorded","subject":"s","statement":"no id"}',
        b'{"kind":"memory.fact.recorded","fact_id":"f10","subject":"s","statement":"nul \\u0000"}',
    ]
    blocks = [
        BlockSet(block_id="b2", value="before creation", version=2, actor="a"),
        BlockCreated(block_id="b1", label="plan", limit=10, actor="lead", value="v1"),
        BlockCreated(block_id="b2", label="plan", limit=10, actor="lead"),
        BlockSet(block_id="b1", value="ab", version=2, actor="a", reason="why"),
        BlockAppended(block_id="b1", text="b", value="ab", version=2, actor="a"),
        BlockSet(block_id="b1", value="zz", version=2, actor="b"),
        BlockSet(block_id="b1", value="jump", version=5, actor="a"),
        BlockSet(block_id="b1", value="x" * 11, version=6, actor="a"),
        BlockSet(block_id="b1", value="ok", version=0, actor="a"),
        BlockSet(block_id="nope", value="?", version=2, actor="a"),
        BlockReplaced(block_id="b1", old="jump", new="é✓", value="é✓", version=6, actor="a"),
    ]
    odd_blocks = [
        b'{"kind":"memory.block.set","block_id":"b1","value":"no version","actor":"a"}',
        b'{"kind":"memory.block.set","block_id":"b1","value":"text version","version":"7","actor":"a"}',
        b'{"kind":"memory.block.set","block_id":"b1","value":8,"version":8,"actor":"a"}',
        b'{"kind":"memory.block.set","block_id":"b1","value":"","version":9,"actor":null,"reason":null}',
        b'{"kind":"memory.block.set","block_id":"b2","value":"fits","version":3,"actor":"a"}',
        b'{"kind":"memory.block.set","block_id":"b2","value":"fits","version":3,"actor":"a"}',
    ]
    return [enc(full), *odd, enc(full), *map(enc, blocks), *odd_blocks, enc(fact("f2", "s", "repeat of a raw record"))]


async def test_one_write_batches_fold_as_the_general_statements_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of one fact record or one block write takes the one-record statements when its
    payload reads the same in Python as in SQL, and gives the same tables as the general
    statements, one record per batch or all in one; payloads with odd shapes fall back to the
    general statements and fold as they always did."""
    from projections.views import blocks, facts

    records = _raw_log(_one_write_payloads())
    taken: list[str] = []
    recorded_row, fold_one = facts._recorded_row, blocks._fold_one

    def counting_row(one: Any) -> Any:
        row = recorded_row(one)
        taken.extend(["fact"] if row is not None else [])
        return row

    def counting_fold(tx: Any, s: str, one: Any) -> Any:
        done = fold_one(tx, s, one)
        taken.extend(["block"] if done is not None else [])
        return done

    monkeypatch.setattr(facts, "_recorded_row", counting_row)
    monkeypatch.setattr(blocks, "_fold_one", counting_fold)
    fast = _fold_hashes(tmp_path / "fast.duckdb", records, [1] * len(records))
    assert taken.count("fact") == 5 and taken.count("block") == 13  # the others fell back

    monkeypatch.setattr(facts, "single_record", lambda batch, kinds: None)
    monkeypatch.setattr(blocks, "single_record", lambda batch, kinds: None)
    general = _fold_hashes(tmp_path / "general.duckdb", records, [1] * len(records))
    whole = _fold_hashes(tmp_path / "whole.duckdb", records, [len(records)])

    assert fast == general == whole
    assert int(fast["facts.facts"].split(":")[0]) == 9 and int(fast["facts.fact_anomalies"].split(":")[0]) == 2
    assert int(fast["blocks.block_versions"].split(":")[0]) >= 12
