"""`bus bench` privacy section: what sealing private records costs (bus.privacy).

    private_record_per_s            recall turns (~250 characters of text) recorded through
                                    `Bus.record` by 2000 concurrent tasks for 40 agents, sealed
                                    under each agent's key (AES-256-GCM) as they are published
    private_record_unsealed_per_s   the same with `seal_private=False`, interleaved round by round
    private_seal_ratio              the two, sealed / unsealed
    open_per_s                      sealed payloads opened as the projection service opens them
                                    (decode the `sealed` JSON, AES-GCM decrypt), one thread

One fresh fsync-always server; medians over `env.repeats`.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from datetime import UTC, datetime

import msgspec

from bus.bench import BenchEnv
from bus.client import Bus
from bus.config import BusConfig
from bus.privacy.sealing import key_id, open_payload, seal
from schemas.payloads import Sealed, TurnRecorded

_TASKS = 2000
_AGENTS = 40
_TEXT = "a private turn of an agent's conversation, sealed under its key; " * 4


def _turn(agent: int, turn: int) -> TurnRecorded:
    return TurnRecorded(agent=f"agent{agent}", turn=turn, role="user", at=datetime.now(UTC), text=_TEXT[:250])


async def record_rate(bus: Bus, count: int) -> float:
    """Turns recorded by `_TASKS` concurrent tasks; returns records/s."""
    tasks = min(_TASKS, count)
    per_task, extra = divmod(count, tasks)

    async def recorder(index: int, n: int) -> None:
        agent = index % _AGENTS
        for turn in range(n):
            await bus.record(f"agent{agent}", _turn(agent, turn))

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for i in range(tasks):
            group.create_task(recorder(i, per_task + (1 if i < extra else 0)))
    return count / (time.perf_counter() - started)


async def open_rate(bus: Bus, count: int) -> float:
    """Sealed payloads (as stored) opened per second, the projection service's per-record work."""
    entry = await bus.keys.for_writing(key_id("agent0"))
    envelopes = [bus.envelope(_turn(0, i), sender="agent0") for i in range(count)]
    sealed = [(e.id, msgspec.json.encode(seal(e, key_id("agent0"), entry).payload)) for e in envelopes]
    decoder = msgspec.json.Decoder(Sealed)
    started = time.perf_counter()
    for envelope_id, payload in sealed:
        open_payload(envelope_id, decoder.decode(payload), entry)
    return count / (time.perf_counter() - started)


async def run(env: BenchEnv) -> dict[str, float]:
    """Sealed vs unsealed private records, interleaved, on one server."""
    count = env.n(100_000)
    sealed: list[float] = []
    plain: list[float] = []
    opened: list[float] = []
    async with env.server("privacy") as server:
        config = BusConfig(url=server.url, monitor_url=server.settings.monitor_url, name="bench")
        async with Bus(config) as sealing, Bus(msgspec.structs.replace(config, seal_private=False)) as unsealed:
            await record_rate(sealing, min(count, 5_000))  # warm-up; makes the 40 keys
            await record_rate(unsealed, min(count, 5_000))
            for _ in range(max(1, env.repeats)):
                sealed.append(await record_rate(sealing, count))
                plain.append(await record_rate(unsealed, count))
                opened.append(await open_rate(sealing, count))
    figures = {
        "private_record_per_s": round(statistics.median(sealed)),
        "private_record_unsealed_per_s": round(statistics.median(plain)),
        "open_per_s": round(statistics.median(opened)),
    }
    figures["private_seal_ratio"] = round(figures["private_record_per_s"] / figures["private_record_unsealed_per_s"], 3)
    return figures
