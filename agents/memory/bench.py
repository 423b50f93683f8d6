"""`bus bench` section: memory folds and the context compiler, for a realistic agent.

The agent: 20 core blocks (600-1,800 characters each), 500 conversation turns (user text,
assistant text with tool calls, tool results), 10,000 archival facts (scaled by `env.scale`),
a 32k-token budget and the 11 memory tools. No server is needed: this is pure CPU work, run on
a worker thread so the event loop stays free.

Figures (medians):
    context_compile_ms          compile with an eviction (500 turns do not fit the budget)
    context_compile_steady_ms   compile after that eviction was applied (the common case)
    context_compile_cold_ms     first compile (with its eviction) after a rebuild: no caches warm
    memory_rebuild_ms           fold every event of the agent into a fresh AgentMemory
    archival_search_ms          one archival_search over the facts
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from agents.memory.context import ContextCompiler, ContextConfig
from agents.memory.state import AgentMemory
from agents.memory.tools import MemoryTools
from schemas.payloads.llm import TextBlock, ToolResultBlock, ToolUseBlock
from schemas.payloads.memory import Citation

if TYPE_CHECKING:
    from bus.bench import BenchEnv

AGENT = "bench-agent"
BLOCKS = 20
TURNS = 500
FACTS = 10_000
START = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)

_DOMAIN = (
    "electrolyte salt additive anode cathode interphase capacity retention impedance sodium carbonate ether "
    "fluoride cycle voltage gas water temperature dendrite conductivity separator polymer concentration"
).split()
# A 5,000-word vocabulary drawn with Zipf-like frequencies, so postings have a realistic spread.
_WORDS = _DOMAIN + [f"term{i}" for i in range(5000)]
_WEIGHTS = [1.0 / (rank + 1) for rank in range(len(_WORDS))]


async def run(env: BenchEnv) -> dict[str, float]:
    """Measure and return the figures listed in the module docstring."""
    return await asyncio.to_thread(_measure, env.n(FACTS), max(1, env.repeats))


def _measure(fact_count: int, repeats: int) -> dict[str, float]:
    events = build_events(fact_count)
    memory = AgentMemory.rebuild(AGENT, events)
    tools = MemoryTools().specs()
    compiler = ContextCompiler(
        ContextConfig(model="claude-sonnet-5-5", agent=AGENT, role="reader", system_prompt=_text(random.Random(1), 300))
    )
    now = START + timedelta(days=1)
    compiled = compiler.compile(memory, tools=tools, now=now)
    if not compiled.evictions:
        raise RuntimeError("bench agent should overflow its budget once; adjust the sizes")

    with_eviction = _median_ms(lambda: compiler.compile(memory, tools=tools, now=now), rounds=20 * repeats)
    for event in compiled.evictions:
        memory.apply(event)
    steady = _median_ms(lambda: compiler.compile(memory, tools=tools, now=now), rounds=20 * repeats)
    rebuild = _median_ms(lambda: AgentMemory.rebuild(AGENT, events), rounds=repeats)
    cold = []
    for _ in range(repeats):
        fresh = AgentMemory.rebuild(AGENT, events)
        fresh_compiler = ContextCompiler(compiler.config)
        cold.append(_median_ms(lambda: fresh_compiler.compile(fresh, tools=tools, now=now), rounds=1))
    queries = [" ".join(random.Random(i).choices(_WORDS, weights=_WEIGHTS, k=2)) for i in range(50)]
    search = _median_ms(lambda: [memory.facts.search(q, limit=10) for q in queries], rounds=repeats) / len(queries)
    return {
        "context_compile_ms": round(with_eviction, 3),
        "context_compile_steady_ms": round(steady, 3),
        "context_compile_cold_ms": round(statistics.median(cold), 3),
        "memory_rebuild_ms": round(rebuild, 1),
        "archival_search_ms": round(search, 3),
    }


def _median_ms(fn: Callable[[], object], *, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(samples)


def _text(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    size = 0
    while size < chars:
        words = rng.choices(_WORDS, weights=_WEIGHTS, k=8)
        out.extend(words)
        size += sum(len(w) + 1 for w in words)
    return " ".join(out)


def build_events(fact_count: int = FACTS, *, turns: int = TURNS, blocks: int = BLOCKS) -> list[Any]:
    """The events of the realistic bench agent, in log order (deterministic)."""
    rng = random.Random(7)
    memory = AgentMemory(AGENT)
    events: list[Any] = []

    def keep(event: Any) -> None:
        memory.apply(event)
        events.append(event)

    for i in range(blocks):
        keep(memory.blocks.create(f"block_{i:02d}", limit=2000, actor=AGENT, value=_text(rng, rng.randint(600, 1800))))
    for i in range(fact_count):
        keep(
            memory.facts.record(
                subject=f"{rng.choice(_DOMAIN)}:{rng.choice(_DOMAIN)}-{i % 200}",
                statement=_text(rng, 150),
                source=Citation(ref=f"doc{i // 3}.f{i % 3}"),
                confidence=round(rng.uniform(0.4, 0.95), 2),
                recorded_by=AGENT,
                value=rng.choice(("increases", "decreases", "no-effect")),
            )
        )
    at = START
    n = 0
    while n < turns:
        at += timedelta(seconds=30)
        cycle = n % 4
        if cycle == 0:
            keep(memory.recall.record("user", at=at, text=_text(rng, 300), sender="peer"))
        elif cycle == 1:
            calls = [
                ToolUseBlock(id=f"toolu_{n}_{k}", name="archival_search", input={"query": _text(rng, 40)})
                for k in range(2)
            ]
            keep(memory.recall.record("assistant", at=at, content=[TextBlock(text=_text(rng, 120)), *calls]))
        elif cycle == 2:
            results = [ToolResultBlock(tool_use_id=f"toolu_{n - 1}_{k}", content=_text(rng, 300)) for k in range(2)]
            keep(memory.recall.record("user", at=at, content=results))
        else:
            keep(memory.recall.record("assistant", at=at, text=_text(rng, 400)))
        n += 1
    return events
