"""`bus bench` section: memory writes and memory searches through the log and the views.

Set-up: a fresh server, a log of `env.n(1_000_000)` memory events (90% conversation turns of 40
agents with Zipf-distributed words, 10% archival facts), and the projection service
(`bus projections run`) in its own process, as deployed, folding every view. The section talks
to it only over the bus, as an agent does (agents never import projections).

Figures (median over `env.repeats` rounds):
    memory_write_p50_ms / memory_write_p99_ms
        a fact or a block write recorded with `bus.record`, until a `min_seq` query sees it
        (publish + fsync + the fold of every view + the query round trip); target p99 <= 20 ms
    baseline_record_visible_p50_ms / _p99_ms
        the same for a `note` event (no memory view has work for it), measured interleaved:
        the floor the projection pipeline sets for any write
    recall_query_p50_ms / recall_query_p95_ms
        one agent's recall searched by a word (ILIKE), newest 20 turns; target p95 <= 150 ms
    recall_query_all_agents_p95_ms   the same search over every agent's turns
    archival_query_p95_ms            one agent's current facts searched by a word
    memory_log_events, memory_fold_catch_up_s   the log size, and how long the service took
        to fold it from sequence 1
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bus import Bus, BusConfig
from bus.errors import BusUnavailable, QueryError
from schemas.payloads import Note
from schemas.payloads.memory import (
    BlockCreated,
    BlockSet,
    Citation,
    FactRecorded,
    TurnRecorded,
)

if TYPE_CHECKING:
    from bus.bench import BenchEnv

LOG_EVENTS = 1_000_000
AGENTS = 40
WRITES_PER_ROUND = 200
QUERIES_PER_ROUND = 100
START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
DOMAIN_WORDS = ["electrolyte", "salt", "additive", "anode", "cathode", "interphase", "capacity", "retention", "impedance", "sodium", "carbonate", "ether", "fluoride", "cycle", "voltage", "gas", "water", "temperature", "dendrite", "conductivity", "separator", "polymer", "concentration"]
_WORDS = DOMAIN_WORDS + [f"term{i}" for i in range(5000)]
_WEIGHTS = [1.0 / (rank + 1) for rank in range(len(_WORDS))]
# Searched words: common, middling and rare, so result sizes vary as in use.
QUERY_WORDS = ["sodium", "impedance", "dendrite", "term40", "term400", "term3000"]


async def run(env: BenchEnv) -> dict[str, float]:
    """Measure and return the figures in the module docstring."""
    events = env.n(LOG_EVENTS)
    async with env.server("memory-views") as server:
        config = BusConfig(url=server.url, monitor_url=server.settings.monitor_url, name="bench")
        async with Bus(config) as bus:
            last = await fill_memory_log(bus, events)
            started = time.perf_counter()
            async with projection_service(server.url, env.workdir / f"memory-views-{server.settings.port}"):
                await wait_applied(bus, last, timeout_s=900.0)
                catch_up = time.perf_counter() - started
                rounds = [await _round(bus, index) for index in range(max(1, env.repeats))]
    figures = {key: round(statistics.median(r[key] for r in rounds), 2) for key in rounds[0]}
    figures.update(memory_log_events=float(events), memory_fold_catch_up_s=round(catch_up, 1))
    return figures


# -- the log ----------------------------------------------------------------------------------


async def fill_memory_log(bus: Bus, count: int) -> int:
    """Record `count` turns and facts (concurrently, so the publisher group-commits them);
    returns the last sequence."""
    rng = random.Random(7)
    turns = [0] * AGENTS
    last = 0
    chunk = 2000
    for start in range(0, count, chunk):
        payloads: list[tuple[str, Any]] = []
        for index in range(start, min(count, start + chunk)):
            agent = rng.randrange(AGENTS)
            name = f"agent{agent}"
            if rng.random() < 0.9:
                turns[agent] += 1
                payloads.append((name, TurnRecorded(
                    agent=name, turn=turns[agent], role="user" if turns[agent] % 2 else "assistant",
                    at=START + timedelta(seconds=index), text=_sentence(rng, 12, 30))))
            else:
                payloads.append((name, FactRecorded(
                    fact_id=f"f{index}", subject=f"{rng.choice(DOMAIN_WORDS)}:{rng.choice(DOMAIN_WORDS)}",
                    statement=_sentence(rng, 8, 20), source=Citation(ref=f"paper:{index % 997}"),
                    confidence=round(rng.uniform(0.3, 0.95), 2), recorded_by=name)))
        sent = await _gather([bus.record(name, payload) for name, payload in payloads])
        last = max(last, max(s.ack.seq for s in sent))
    return last


def _sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choices(_WORDS, _WEIGHTS, k=rng.randrange(low, high)))


async def _gather(calls: list[Awaitable[Any]]) -> list[Any]:
    tasks: list[asyncio.Task[Any]] = []
    async with asyncio.TaskGroup() as group:
        for call in calls:
            tasks.append(group.create_task(call))  # type: ignore[arg-type]
    return [task.result() for task in tasks]


# -- the projection service, in its own process ------------------------------------------------


@asynccontextmanager
async def projection_service(url: str, home: Path) -> AsyncIterator[None]:
    """`bus projections run` against `url`, stopped (SIGTERM, then SIGKILL after 30 s) on exit."""
    home.mkdir(parents=True, exist_ok=True)
    log = (home / "projections.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bus.cli.main", "projections", "run", "--url", url, "--home", str(home),
        "--db", str(home / "views.duckdb"), stdout=log, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        yield
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 30.0)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()


async def wait_applied(bus: Bus, seq: int, *, timeout_s: float) -> None:
    """Until the service answers with every view applied up to `seq`. Raises TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await bus.query("SELECT 1", min_seq=seq, timeout_s=5.0)
            return
        except (BusUnavailable, QueryError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the projection service did not reach seq {seq} within {timeout_s}s") from None
            await asyncio.sleep(0.2)  # a service still starting or catching up: poll again


# -- one round --------------------------------------------------------------------------------


async def _round(bus: Bus, index: int) -> dict[str, float]:
    block = f"bench-block-{index}"
    await bus.record("writer", BlockCreated(block_id=block, label="plan", limit=2000, actor="writer"))
    writes: list[float] = []
    baseline: list[float] = []  # the same path for an event no memory view folds
    for n in range(WRITES_PER_ROUND):
        if n % 2:
            payload: Any = BlockSet(block_id=block, value=f"plan, revision {n}", version=n // 2 + 2, actor="writer")
            check, key = "SELECT version FROM blocks WHERE block_id = ? AND current", block
        else:
            payload = FactRecorded(fact_id=f"w{index}-{n}", subject="bench:write", statement=f"written {n}",
                                   source=Citation(ref="bench"), confidence=0.5, recorded_by="writer")
            check, key = "SELECT fact_id FROM facts WHERE fact_id = ?", payload.fact_id

        async def write_and_read(payload: Any = payload, check: str = check, key: str = key) -> None:
            sent = await bus.record("writer", payload)
            result = await bus.query(check, [key], min_seq=sent.ack.seq)
            if not result.rows:
                raise RuntimeError(f"write at seq {sent.ack.seq} not visible at its own min_seq")

        writes.append(await timed_ms(write_and_read()))
        baseline.append(await timed_ms(_note_and_read(bus, n)))

    rng = random.Random(index)
    recall = "SELECT agent, conversation, turn, role, text, turn_at FROM recall WHERE {agent} text ILIKE ? ORDER BY seq DESC LIMIT 20"
    archival = "SELECT fact_id, statement, source_ref FROM facts WHERE recorded_by = ? AND current AND statement ILIKE ? LIMIT 20"
    one_agent, all_agents, facts = [], [], []
    for _ in range(QUERIES_PER_ROUND):
        agent, word = f"agent{rng.randrange(AGENTS)}", f"%{rng.choice(QUERY_WORDS)}%"
        one_agent.append(await timed_ms(bus.query(recall.replace("{agent}", "agent = ? AND"), [agent, word])))
        all_agents.append(await timed_ms(bus.query(recall.replace("{agent}", ""), [word])))
        facts.append(await timed_ms(bus.query(archival, [agent, word])))
    return {
        "memory_write_p50_ms": percentile(writes, 50), "memory_write_p99_ms": percentile(writes, 99),
        "baseline_record_visible_p50_ms": percentile(baseline, 50), "baseline_record_visible_p99_ms": percentile(baseline, 99),
        "recall_query_p50_ms": percentile(one_agent, 50), "recall_query_p95_ms": percentile(one_agent, 95),
        "recall_query_all_agents_p95_ms": percentile(all_agents, 95), "archival_query_p95_ms": percentile(facts, 95),
    }


async def _note_and_read(bus: Bus, n: int) -> None:
    sent = await bus.record("writer", Note(text=f"baseline {n}"))
    await bus.query("SELECT seq FROM events WHERE seq = ?", [sent.ack.seq], min_seq=sent.ack.seq)


async def timed_ms(call: Awaitable[Any]) -> float:
    """Milliseconds until `call` (a coroutine not yet started) completes."""
    started = time.perf_counter()
    await call
    return (time.perf_counter() - started) * 1000


def percentile(samples: list[float], p: int) -> float:
    """The nearest-rank `p`th percentile of `samples` (not empty)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]
