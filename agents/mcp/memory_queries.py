"""The questions `bus mcp` asks the views, as SQL run through the bus's query service.

Every statement is a fixed text with `?` parameters (a caller's words never become SQL), every
answer is bounded (`limit` + 1 rows are read, to say whether more matched), and long texts are
clipped. Points in the log are sequences: a time is first turned into the last sequence stored
at or before it (`seq_at`), so "as of" and "since" mean the same for every view.

Raises what `Bus.query` raises: QueryError (the service refused or failed the query),
BusUnavailable (no projection service answering).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import msgspec

from agents.mcp.models import (
    MAX_TEXT_CHARS,
    AgentInfo,
    Agents,
    BlockValue,
    Claim,
    Contradiction,
    Contradictions,
    Fact,
    MemorySearch,
    Turn,
    WhatsNew,
)

if TYPE_CHECKING:
    from bus import Bus
    from schemas.query import QueryResult

T = TypeVar("T")
MemoryKind = Literal["facts", "recall", "blocks"]
QUERY_TIMEOUT_S = 10.0
# Who sends the research team's daily report, and to whom (agents/research/demo.py).
REPORT_SENDER, REPORT_RECIPIENT = "writer", "coordinator"

_DIGITS = re.compile(r"^\d{1,19}$")


class SearchSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A memory search: words (empty: anything), which memories, whose, and when."""

    text: str = ""
    kinds: tuple[MemoryKind, ...] = ("facts", "recall", "blocks")
    agent: str | None = None
    subject: str | None = None
    as_of_seq: int | None = None
    since_seq: int | None = None
    include_ended: bool = False
    limit: int = 10
    min_seq: int | None = None


def parse_point(text: str, what: str) -> int | datetime:
    """A point in the log as a caller wrote it: a stream sequence (digits) or an ISO 8601 time
    (UTC when it names no offset). Raises ValueError saying what was expected."""
    text = text.strip()
    if _DIGITS.match(text):
        return int(text)
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{what} {text!r} is neither a log sequence (digits, e.g. 1200) nor an ISO 8601 time "
            "(e.g. 2026-03-03T09:00:00Z)"
        ) from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


async def seq_at(bus: Bus, point: int | datetime, *, min_seq: int | None = None) -> int:
    """The sequence a point stands for: itself, or the last one stored at or before the time."""
    if isinstance(point, int):
        return point
    result = await _query(
        bus, "SELECT coalesce(max(seq), 0) AS seq FROM events WHERE stored_at <= CAST(? AS TIMESTAMPTZ)",
        [point.isoformat()], min_seq=min_seq, limit=1,
    )
    return int(result.rows[0][0]) if result.rows else 0


# -- search -------------------------------------------------------------------------------------


async def search_memory(bus: Bus, spec: SearchSpec) -> MemorySearch:
    """Facts, recall turns and block values matching `spec`, newest first, `spec.limit` each."""
    searches = {"facts": _search_facts, "recall": _search_recall, "blocks": _search_blocks}
    answers = await _at_once({kind: searches[kind](bus, spec) for kind in dict.fromkeys(spec.kinds)})
    empty: tuple[list[Any], bool, int] = ([], False, 0)
    facts, turns, blocks = (answers.get(k, empty) for k in ("facts", "recall", "blocks"))
    return MemorySearch(
        applied_seq=min(a[2] for a in answers.values()) if answers else 0,
        as_of_seq=spec.as_of_seq, facts=facts[0], turns=turns[0], blocks=blocks[0],
        truncated=any(a[1] for a in answers.values()),
    )


_FACT_COLUMNS = (
    "fact_id, subject, statement, value, confidence, category, source_ref, source_title, recorded_by, "
    "recorded_seq, recorded_at, status, ended_seq"
)


def facts_statement(spec: SearchSpec) -> tuple[str, list[Any]]:
    """The SQL and parameters of the facts part of a search (its `LIMIT ?` not yet bound)."""
    where, params = ["TRUE"], []
    if spec.text:
        pattern = like_pattern(spec.text)
        where.append("(statement ILIKE ? ESCAPE '\\' OR subject ILIKE ? ESCAPE '\\' OR value ILIKE ? ESCAPE '\\'"
                     " OR source_ref ILIKE ? ESCAPE '\\')")
        params += [pattern] * 4
    if spec.subject:
        where.append("(subject = ? OR subject_base = ?)")
        params += [spec.subject, spec.subject]
    if spec.agent:
        where.append("recorded_by = ?")
        params.append(spec.agent)
    if spec.as_of_seq is not None:
        where.append("recorded_seq <= ?")
        params.append(spec.as_of_seq)
        if not spec.include_ended:
            where.append("(ended_seq IS NULL OR ended_seq > ?)")
            params.append(spec.as_of_seq)
    elif not spec.include_ended:
        where.append("current")
    if spec.since_seq is not None:
        where.append("recorded_seq > ?")
        params.append(spec.since_seq)
    return f"SELECT {_FACT_COLUMNS} FROM facts WHERE {' AND '.join(where)} ORDER BY recorded_seq DESC LIMIT ?", params


async def _search_facts(bus: Bus, spec: SearchSpec) -> tuple[list[Fact], bool, int]:
    sql, params = facts_statement(spec)
    result = await _query(bus, sql, params, min_seq=spec.min_seq, limit=spec.limit)
    rows = [_fact(r, spec.as_of_seq) for r in _records(result)[: spec.limit]]
    return rows, len(result.rows) > spec.limit, result.applied_seq


async def _search_recall(bus: Bus, spec: SearchSpec) -> tuple[list[Turn], bool, int]:
    where, params = ["TRUE"], []
    if spec.text:
        where.append("text ILIKE ? ESCAPE '\\'")
        params.append(like_pattern(spec.text))
    if spec.agent:
        where.append("agent = ?")
        params.append(spec.agent)
    if spec.as_of_seq is not None:
        where.append("seq <= ?")
        params.append(spec.as_of_seq)
    if spec.since_seq is not None:
        where.append("seq > ?")
        params.append(spec.since_seq)
    sql = ("SELECT agent, conversation, turn, role, sender, text, turn_at, seq FROM recall "
           f"WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?")
    result = await _query(bus, sql, params, min_seq=spec.min_seq, limit=spec.limit)
    turns = []
    for r in _records(result)[: spec.limit]:
        text, clipped = clip(r["text"] or "")
        turns.append(Turn(agent=r["agent"], conversation=r["conversation"], turn=r["turn"], role=r["role"],
                          sender=r["sender"], text=text, turn_at=_iso(r["turn_at"]), seq=r["seq"], clipped=clipped))
    return turns, len(result.rows) > spec.limit, result.applied_seq


async def _search_blocks(bus: Bus, spec: SearchSpec) -> tuple[list[BlockValue], bool, int]:
    where, params = ["NOT rejected"], []
    if spec.text:
        where.append("(value ILIKE ? ESCAPE '\\' OR label ILIKE ? ESCAPE '\\')")
        params += [like_pattern(spec.text)] * 2
    if spec.as_of_seq is not None:
        where.append("seq <= ? AND (ended_seq IS NULL OR ended_seq > ?)")
        params += [spec.as_of_seq, spec.as_of_seq]
    else:
        where.append("current")
    if spec.since_seq is not None:
        where.append("seq > ?")
        params.append(spec.since_seq)
    if spec.agent:
        where.append("block_id IN (SELECT block_id FROM block_holders WHERE agent = ?)")
        params.append(spec.agent)
    result = await _query(bus, _BLOCK_SQL.format(where=" AND ".join(where)), params, min_seq=spec.min_seq,
                          limit=spec.limit)
    return [_block(r) for r in _records(result)[: spec.limit]], len(result.rows) > spec.limit, result.applied_seq


_BLOCK_SQL = ('SELECT block_id, label, version, value, chars, "limit", actor, seq, written_at FROM blocks '
              "WHERE {where} ORDER BY seq DESC LIMIT ?")


# -- contradictions, what is new ----------------------------------------------------------------

_CONTRADICTION_COLUMNS = (
    "contradiction_id, rule, actor, note, flagged_seq, resolved_seq, open, "
    "fact_a, subject_a, statement_a, value_a, source_a, recorded_by_a, confidence_a, "
    "fact_b, subject_b, statement_b, value_b, source_b, recorded_by_b, confidence_b"
)


async def open_contradictions(
    bus: Bus, subject: str | None, *, as_of_seq: int | None, limit: int, min_seq: int | None
) -> Contradictions:
    """Contradictions open now (or as of `as_of_seq`), about `subject` (its full form or the
    part before `@`) or about anything, newest first."""
    where, params = ["TRUE"], []
    if subject:
        where.append("(? IN (subject_a, subject_b) OR ? IN (split_part(subject_a, '@', 1), split_part(subject_b, '@', 1)))")
        params += [subject, subject]
    if as_of_seq is None:
        where.append("open")
    else:
        where.append("flagged_seq <= ? AND (resolved_seq IS NULL OR resolved_seq > ?)")
        params += [as_of_seq, as_of_seq]
    sql = f"SELECT {_CONTRADICTION_COLUMNS} FROM contradictions WHERE {' AND '.join(where)} ORDER BY flagged_seq DESC LIMIT ?"
    result = await _query(bus, sql, params, min_seq=min_seq, limit=limit)
    found = [_contradiction(r, as_of_seq) for r in _records(result)[:limit]]
    return Contradictions(applied_seq=result.applied_seq, as_of_seq=as_of_seq, subject=subject,
                          contradictions=found, truncated=len(result.rows) > limit)


async def whats_new(bus: Bus, since_seq: int, *, limit: int, min_seq: int | None) -> WhatsNew:
    """Facts recorded and ended, contradictions flagged and block writes after `since_seq`,
    oldest first (so a caller reading in pages continues from the last `*_seq` it saw)."""
    statements = {
        "facts": (f"SELECT {_FACT_COLUMNS} FROM facts WHERE recorded_seq > ? ORDER BY recorded_seq LIMIT ?", [since_seq]),
        "ended": (f"SELECT {_FACT_COLUMNS} FROM facts WHERE ended_seq > ? ORDER BY ended_seq LIMIT ?", [since_seq]),
        "contradictions": (f"SELECT {_CONTRADICTION_COLUMNS} FROM contradictions WHERE flagged_seq > ? "
                           "ORDER BY flagged_seq LIMIT ?", [since_seq]),
        "blocks": ('SELECT block_id, label, version, value, chars, "limit", actor, seq, written_at FROM blocks '
                   "WHERE seq > ? AND NOT rejected ORDER BY seq LIMIT ?", [since_seq]),
    }
    results = await _at_once({name: _query(bus, sql, params, min_seq=min_seq, limit=limit)
                              for name, (sql, params) in statements.items()})
    return WhatsNew(
        applied_seq=min(r.applied_seq for r in results.values()),
        since_seq=since_seq,
        facts=[_fact(r, None) for r in _records(results["facts"])[:limit]],
        ended_facts=[_fact(r, None) for r in _records(results["ended"])[:limit]],
        contradictions=[_contradiction(r, None) for r in _records(results["contradictions"])[:limit]],
        blocks=[_block(r) for r in _records(results["blocks"])[:limit]],
        truncated=any(len(r.rows) > limit for r in results.values()),
    )


# -- facts, agents, blocks, the report ----------------------------------------------------------


async def fact_seq(bus: Bus, fact_id: str, *, min_seq: int | None = None) -> int | None:
    """The sequence at which fact `fact_id` was first recorded, or None if it never was."""
    result = await _query(bus, "SELECT recorded_seq FROM facts WHERE fact_id = ?", [fact_id], min_seq=min_seq, limit=1)
    return int(result.rows[0][0]) if result.rows else None


async def list_agents(bus: Bus, *, limit: int, min_seq: int | None) -> Agents:
    """Agents the log knows, most recently seen first, with their liveness."""
    sql = ("SELECT name, tags, state, lifecycle, replicas, replicas_alive, in_flight, messages_sent, "
           "messages_received, last_seen FROM agents ORDER BY last_seen DESC NULLS LAST, name LIMIT ?")
    result = await _query(bus, sql, [], min_seq=min_seq, limit=limit)
    agents = [
        AgentInfo(name=r["name"], tags=list(r["tags"] or []), state=r["state"], lifecycle=r["lifecycle"],
                  replicas=r["replicas"], replicas_alive=r["replicas_alive"], in_flight=r["in_flight"],
                  messages_sent=r["messages_sent"] or 0, messages_received=r["messages_received"] or 0,
                  last_seen=_iso(r["last_seen"]))
        for r in _records(result)[:limit]
    ]
    return Agents(applied_seq=result.applied_seq, agents=agents, truncated=len(result.rows) > limit)


async def agent_known(bus: Bus, name: str, *, min_seq: int | None = None) -> bool:
    """True if `name` has appeared in the log (sent, was sent to, or had events recorded)."""
    result = await _query(bus, "SELECT 1 FROM agents WHERE name = ?", [name], min_seq=min_seq, limit=1)
    return bool(result.rows)


async def tag_known(bus: Bus, tag: str, *, min_seq: int | None = None) -> bool:
    """True if some agent declared `tag` (its latest `agent.started`)."""
    result = await _query(bus, "SELECT 1 FROM agents WHERE list_contains(tags, ?)", [tag], min_seq=min_seq, limit=1)
    return bool(result.rows)


async def held_blocks(bus: Bus, agent: str, *, limit: int = 50, min_seq: int | None = None) -> list[BlockValue]:
    """The current value of every core block `agent` holds, by label."""
    sql = ('SELECT block_id, label, version, value, chars, "limit", actor, seq, written_at FROM blocks '
           "WHERE current AND block_id IN (SELECT block_id FROM block_holders WHERE agent = ? AND holding) "
           "ORDER BY label LIMIT ?")
    result = await _query(bus, sql, [agent], min_seq=min_seq, limit=limit)
    return [_block(r, clip_at=None) for r in _records(result)[:limit]]


class Report(msgspec.Struct, frozen=True, kw_only=True):
    """The research team's latest daily report, as the writer sent it."""

    text: str
    seq: int
    correlation_id: str | None
    stored_at: str | None


async def latest_report(bus: Bus, *, min_seq: int | None = None) -> Report | None:
    """The last report the writer sent the coordinator, or None before the first day."""
    sql = ("SELECT seq, correlation_id, payload->>'text' AS text, stored_at FROM events "
           "WHERE kind = 'note' AND sender = ? AND recipient = ? ORDER BY seq DESC LIMIT ?")
    result = await _query(bus, sql, [REPORT_SENDER, REPORT_RECIPIENT], min_seq=min_seq, limit=1)
    rows = _records(result)
    if not rows:
        return None
    row = rows[0]
    return Report(text=row["text"] or "", seq=row["seq"], correlation_id=row["correlation_id"],
                  stored_at=_iso(row["stored_at"]))


# -- helpers ------------------------------------------------------------------------------------


def like_pattern(text: str) -> str:
    """`text` as an ILIKE pattern matching it anywhere, its own `%`, `_` and `\\` taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def clip(text: str, limit: int | None = MAX_TEXT_CHARS) -> tuple[str, bool]:
    """`text` cut to `limit` characters (ending in `…`), and whether it was cut."""
    if limit is None or len(text) <= limit:
        return text, False
    return text[: limit - 1] + "…", True


async def _at_once(calls: dict[str, Coroutine[Any, Any, T]]) -> dict[str, T]:
    """Await the calls concurrently. The first failure is raised as itself (the others are
    cancelled), so callers handle a QueryError, not a group of them."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = {name: group.create_task(call) for name, call in calls.items()}
    except BaseExceptionGroup as failed:
        first = failed.exceptions[0]
        if all(isinstance(e, Exception) for e in failed.exceptions):
            raise first from None
        raise
    return {name: task.result() for name, task in tasks.items()}


async def _query(bus: Bus, sql: str, params: Sequence[Any], *, min_seq: int | None, limit: int) -> QueryResult:
    # One row over the limit tells the caller that more matched.
    return await bus.query(sql, [*params, limit + 1] if sql.rstrip().endswith("LIMIT ?") else list(params),
                           min_seq=min_seq, max_rows=limit + 1, timeout_s=QUERY_TIMEOUT_S)


def _records(result: QueryResult) -> list[dict[str, Any]]:
    return [dict(zip(result.columns, row, strict=True)) for row in result.rows]


def _iso(value: Any) -> str | None:
    return None if value is None else str(value)


def _fact(r: dict[str, Any], as_of_seq: int | None) -> Fact:
    statement, clipped = clip(r["statement"] or "")
    status = r["status"] or "active"
    ended = r["ended_seq"]
    if as_of_seq is not None and (ended is None or ended > as_of_seq):
        status = "active"  # it ended later than the point asked about
    return Fact(
        fact_id=r["fact_id"], subject=r["subject"] or "", statement=statement, value=r["value"] or "",
        confidence=r["confidence"], category=r["category"] or "", source_ref=r["source_ref"] or "",
        source_title=r["source_title"] or "", recorded_by=r["recorded_by"] or "", recorded_seq=r["recorded_seq"],
        recorded_at=_iso(r["recorded_at"]), status=status, ended_seq=ended, clipped=clipped,
    )


def _block(r: dict[str, Any], clip_at: int | None = MAX_TEXT_CHARS) -> BlockValue:
    value, clipped = clip(r["value"] or "", clip_at)
    return BlockValue(block_id=r["block_id"], label=r["label"] or "", version=r["version"] or 0, value=value,
                      chars=r["chars"] or 0, limit=r["limit"], actor=r["actor"], seq=r["seq"],
                      written_at=_iso(r["written_at"]), clipped=clipped)


def _claim(r: dict[str, Any], side: str) -> Claim:
    statement, _ = clip(r[f"statement_{side}"] or "")
    return Claim(fact_id=r[f"fact_{side}"] or "", subject=r[f"subject_{side}"] or "", statement=statement,
                 value=r[f"value_{side}"] or "", source=r[f"source_{side}"] or "",
                 recorded_by=r[f"recorded_by_{side}"] or "", confidence=r[f"confidence_{side}"])


def _contradiction(r: dict[str, Any], as_of_seq: int | None) -> Contradiction:
    resolved = r["resolved_seq"]
    is_open = bool(r["open"]) if as_of_seq is None else resolved is None or resolved > as_of_seq
    return Contradiction(
        contradiction_id=r["contradiction_id"], rule=r["rule"] or "", actor=r["actor"] or "",
        note=clip(r["note"] or "")[0], flagged_seq=r["flagged_seq"], a=_claim(r, "a"), b=_claim(r, "b"),
        open=is_open, resolved_seq=resolved,
    )
