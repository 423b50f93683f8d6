"""A synthetic, deterministic log for benchmarks and tests: conversations between agents,
broadcasts, recorded events (some fenced), delivery reports, dead letters and expiries, in the
proportions a busy bus shows. And a fast way to append it: JetStream atomic batches.

    items = list(synthetic_log(bus, 10_000, seed=1))
    last_seq = await append_batches(bus, items)

Only benchmarks and tests use this module; the projection service never imports it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, NamedTuple

import msgspec

from schemas import encode, new_id, utcnow
from schemas.payloads import (
    AgentHeartbeat,
    AgentStarted,
    DeadLettered,
    DeliveryExpired,
    DeliveryReport,
    Note,
    Notice,
    Settlement,
    TaskCompleted,
    TaskRequested,
)

if TYPE_CHECKING:
    from bus import Bus

_AGENTS = ("planner", "researcher", "writer", "critic", "archivist", "scout", "editor", "runner")
_TAGS = ("team", "ops", "research")


class LogItem(NamedTuple):
    """One message to append: subject, encoded envelope, and its dedup id."""

    subject: str
    data: bytes
    msg_id: str


def synthetic_log(bus: Bus, count: int, *, seed: int = 0, first_seq: int = 1) -> Iterator[LogItem]:
    """`count` items to append to an empty log starting at `first_seq`. Reports, dead letters and
    fenced chains refer to stream sequences, which is why the log must be appended in order and
    alone (nothing else publishing meanwhile)."""
    rng = random.Random(seed)
    subjects = bus.subjects
    seq = first_seq - 1
    pending: list[tuple[int, str, str]] = []  # (seq, envelope id, recipient) awaiting settlement
    last_event: dict[str, int] = {}
    started: set[str] = set()
    produced = 0

    def emit(subject: str, envelope: object) -> LogItem:
        nonlocal seq, produced
        seq += 1
        produced += 1
        return LogItem(subject, encode(envelope), envelope.id)  # type: ignore[attr-defined]

    while produced < count:
        roll = rng.random()
        agent = rng.choice(_AGENTS)
        if agent not in started:
            started.add(agent)
            env = bus.envelope(AgentStarted(agent=agent, pid=1000 + len(started), tags=sorted(rng.sample(_TAGS, 2))), sender=agent)
            yield emit(subjects.event(agent, env.kind), env)
            last_event[agent] = seq
            continue
        if roll < 0.50:
            to = rng.choice([a for a in _AGENTS if a != agent])
            payload = TaskRequested(title=f"task {produced}", input={"detail": "x" * rng.randrange(10, 120)}) if roll < 0.3 else Note(text=f"note {produced}")
            expires = 30.0 if rng.random() < 0.05 else None
            env = bus.envelope(payload, to=to, sender=agent, expires_in_s=expires)
            item = emit(subjects.inbox(to, agent), env)
            pending.append((seq, env.id, to))
            yield item
        elif roll < 0.58:
            env = bus.envelope(Notice(text=f"notice {produced}", topic="status"), tag=rng.choice(_TAGS), sender=agent)
            yield emit(subjects.group(env.tag, agent), env)  # type: ignore[arg-type]
        elif roll < 0.78:
            prev = last_event.get(agent, 0)
            fenced = rng.random() < 0.5
            payload = AgentHeartbeat(agent=agent, pid=1000, handled=produced) if not fenced else TaskCompleted(task_id=new_id(), output={"done": produced})
            headers = {"Bus-Prev-Seq": str(prev)} if fenced else {}
            env = bus.envelope(payload, sender=agent, headers=headers)
            yield emit(subjects.event(agent, env.kind), env)
            last_event[agent] = seq
        elif pending:
            take = pending[: rng.randrange(1, 40)]
            del pending[: len(take)]
            by_agent: dict[str, list[Settlement]] = {}
            for target, envelope_id, to in take:
                fate = rng.random()
                if fate < 0.04:
                    env = bus.envelope(
                        DeadLettered(
                            reason="exhausted", agent=to, consumer=f"{to}__inbox", original_subject=subjects.inbox(to, agent),
                            original_seq=target, original=b'{"not":"kept"}', deliveries=5, original_id=envelope_id, error="boom",
                        ),
                        sender=to,
                    )
                    yield emit(subjects.dead(to), env)
                    continue
                if fate < 0.06:
                    env = bus.envelope(
                        DeliveryExpired(agent=to, original_id=envelope_id, original_kind="note", original_seq=target,
                                        expired_at=utcnow() - timedelta(seconds=1)),
                        sender=to,
                    )
                    yield emit(subjects.event(to, env.kind), env)
                    last_event[to] = seq
                    continue
                attempts = 2 if fate < 0.15 else 1
                for attempt in range(1, attempts + 1):
                    outcome = "handled" if attempt == attempts else "retried"
                    by_agent.setdefault(to, []).append(Settlement(
                        stream_seq=target, attempt=attempt, outcome=outcome, envelope_id=envelope_id,
                        handler_ms=round(rng.uniform(0.1, 50.0), 3), error=None if outcome == "handled" else "transient",
                    ))
            for to, settlements in sorted(by_agent.items()):
                if produced >= count:
                    break
                env = bus.envelope(DeliveryReport(agent=to, consumer=f"{to}__inbox", settlements=settlements), sender=to)
                yield emit(subjects.event(to, env.kind), env)
                last_event[to] = seq


async def append_batches(bus: Bus, items: Sequence[LogItem], *, batch: int = 1000, in_flight: int = 4) -> int:
    """Append `items` in order as JetStream atomic batches (one fsync per batch, ~40k/s here);
    returns the last stream sequence. Batches are committed one after another (a batch's first
    message waits for the previous commit), so the order in the log is the order of `items`."""
    transport = bus.transport
    last = 0
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        batch_id = new_id().replace("-", "")
        for index, item in enumerate(chunk, 1):
            headers = {"Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(index), "Nats-Msg-Id": item.msg_id}
            if index == len(chunk):
                headers["Nats-Batch-Commit"] = "1"
                reply = await transport.request(item.subject, item.data, headers=headers, timeout_s=30)
                ack = msgspec.json.decode(reply.data)
                if "error" in ack:
                    raise RuntimeError(f"atomic batch rejected: {ack['error']}")
                last = int(ack["seq"])
            elif index == 1:
                reply = await transport.request(item.subject, item.data, headers=headers, timeout_s=30)
                if reply.data:
                    raise RuntimeError(f"atomic batch refused: {reply.data[:200]!r}")
            else:
                await transport.publish(item.subject, item.data, headers=headers)
        await asyncio.sleep(0)
    return last
