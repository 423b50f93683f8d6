"""Dead letters against a real nats-server: permanent errors, exhausted retries, undecodable
bytes and unknown kinds, a process that dies on every attempt, and one record per message."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import msgspec
from nats.js.errors import NotFoundError

from bus import Bus, BusConfig, ConsumerSettings, PermanentError, RetryPolicy
from bus.deadletter import dead_letter_id, write_dead_letter
from bus.server import REPO_ROOT
from conftest import wait_for
from schemas import Delivery, Envelope, new_id
from schemas.payloads import DeadLettered, Note


def fast(**overrides: Any) -> ConsumerSettings:
    fields: dict[str, Any] = {
        "report_interval_s": 0.01,
        "drain_timeout_s": 2.0,
        "retry": RetryPolicy(backoff_s=(0.05,), max_deliver=3),
    }
    fields.update(overrides)
    return ConsumerSettings(**fields)


async def dead_letters(bus: Bus, agent: str) -> list[Envelope[Any]]:
    """The dead letters stored for `agent`, in stream order."""
    out: list[Envelope[Any]] = []
    seq = 1
    while True:
        try:
            msg = await bus.js.get_msg(
                bus.subjects.stream, seq=seq, subject=bus.subjects.dead(agent), next=True
            )
        except NotFoundError:
            return out
        out.append(bus.codec.decode(msg.data))
        seq = msg.seq + 1


def has_dead_letters(bus: Bus, agent: str, count: int):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return len(await dead_letters(bus, agent)) >= count

    return check


async def fully_acked(bus: Bus, consumer: str) -> bool:
    info = await bus.js.consumer_info(bus.subjects.stream, consumer)
    return info.num_ack_pending == 0 and info.num_pending == 0


async def stored_bytes(bus: Bus, seq: int) -> bytes:
    return (await bus.js.get_msg(bus.subjects.stream, seq=seq)).data or b""


def metric(bus: Bus, name: str, **labels: str) -> float:
    return bus.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_permanent_error_is_dead_lettered_at_once(bus: Bus) -> None:
    """A PermanentError terminates the message on its first attempt and stores a dead letter
    with the reason, the error and the exact original bytes."""
    attempts: list[int] = []

    async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        raise PermanentError("cannot parse the task")

    sent = await bus.send("judge", Note(text="bad"))
    async with bus.consumer("judge", handle, settings=fast()):
        await wait_for(has_dead_letters(bus, "judge", 1), what="a dead letter")
        await wait_for(lambda: fully_acked(bus, "judge__inbox"), what="terminated")
    assert attempts == [1]
    [letter] = await dead_letters(bus, "judge")
    dead = letter.payload
    assert isinstance(dead, DeadLettered)
    assert dead.reason == "permanent" and dead.error == "PermanentError: cannot parse the task"
    assert dead.original == await stored_bytes(bus, sent.ack.seq)
    assert (dead.original_seq, dead.original_id, dead.original_kind) == (sent.ack.seq, sent.envelope.id, "note")
    assert dead.consumer == "judge__inbox" and dead.deliveries == 1
    assert letter.id == dead_letter_id(bus.subjects.stream, sent.ack.seq)
    assert letter.causation_id == sent.envelope.id
    assert metric(bus, "continuum_dead_lettered_total", consumer="judge__inbox", reason="permanent") == 1


async def test_last_failed_attempt_is_dead_lettered_with_its_error(bus: Bus) -> None:
    """A handler failing on every attempt is retried until max_deliver, then dead-lettered with
    the last error; the server does not redeliver it again."""
    attempts: list[int] = []

    async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        raise ValueError(f"broken on attempt {delivery.attempt}")

    await bus.send("flaky", Note(text="x"))
    async with bus.consumer("flaky", handle, settings=fast()):
        await wait_for(has_dead_letters(bus, "flaky", 1), what="a dead letter")
        await wait_for(lambda: fully_acked(bus, "flaky__inbox"), what="terminated")
    assert attempts == [1, 2, 3]
    [letter] = await dead_letters(bus, "flaky")
    assert letter.payload.reason == "exhausted"
    assert letter.payload.error == "ValueError: broken on attempt 3"
    assert letter.payload.deliveries == 3


async def test_undecodable_bytes_and_unknown_kinds_are_dead_lettered(bus: Bus) -> None:
    """Bytes that are not an envelope, and envelopes of a kind this process does not know, are
    terminated without reaching the handler; each dead letter keeps the original bytes; the
    engine goes on with the next message."""
    junk = b"\xff\xfe not an envelope"
    mystery = (
        b'{"id":"%s","sender":"tester","to":"sorter","created_at":"2026-01-01T00:00:00Z",'
        b'"payload":{"kind":"mystery.kind","x":1}}' % new_id().encode()
    )
    invalid = (
        b'{"id":"%s","sender":"tester","to":"sorter","created_at":"2026-01-01T00:00:00Z",'
        b'"payload":{"kind":"note","text":42}}' % new_id().encode()
    )
    seqs = []
    for i, data in enumerate((junk, mystery, invalid)):
        reply = await bus.transport.request("default.inbox.sorter.tester", data, headers={"Nats-Msg-Id": f"raw-{i}"})
        seqs.append(msgspec.json.decode(reply.data)["seq"])
    await bus.send("sorter", Note(text="valid"))
    texts: list[str] = []

    async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
        texts.append(envelope.payload.text)

    async with bus.consumer("sorter", handle, settings=fast()):
        await wait_for(lambda: texts == ["valid"], what="the valid message")
        await wait_for(has_dead_letters(bus, "sorter", 3), what="three dead letters")
        await wait_for(lambda: fully_acked(bus, "sorter__inbox"), what="all settled")
    letters = {d.payload.original_seq: d.payload for d in await dead_letters(bus, "sorter")}
    assert [letters[s].original for s in seqs] == [junk, mystery, invalid]
    assert [letters[s].reason for s in seqs] == ["undecodable", "unknown_kind", "invalid"]
    assert letters[seqs[0]].original_id is None
    assert letters[seqs[1]].original_kind == "mystery.kind"
    assert all(letters[s].deliveries == 1 for s in seqs)


async def test_dead_letter_is_stored_once_whoever_writes_it(bus: Bus) -> None:
    """Two writers (engine and advisory watcher) of the same message's dead letter store one
    record: its id is derived from stream and sequence."""
    sent = await bus.send("twice", Note(text="x"))
    for reason in ("exhausted", "max_deliveries"):
        await write_dead_letter(
            bus, agent="twice", consumer="twice__inbox", stream=bus.subjects.stream,
            stream_seq=sent.ack.seq, subject="default.inbox.twice.tester",
            original=await stored_bytes(bus, sent.ack.seq), reason=reason, deliveries=3,
            error="boom", envelope=sent.envelope,
        )
    letters = await dead_letters(bus, "twice")
    assert len(letters) == 1 and letters[0].payload.reason == "exhausted"


_POISONED_AGENT = '''
import asyncio, os, sys
from bus import Bus, BusConfig, ConsumerSettings, RetryPolicy

async def main(url: str, credentials: str) -> None:
    async def handle(envelope, delivery):
        os._exit(3)  # the poison kills the whole process, before any settlement

    settings = ConsumerSettings(
        concurrency=1, prefetch=0, ack_wait_s=1.0, report_interval_s=0.01,
        retry=RetryPolicy(backoff_s=(0.05,), max_deliver=3),
    )
    async with Bus(BusConfig(url=url, name="victim", credentials=credentials)) as bus:
        async with bus.consumer("victim", handle, settings=settings):
            await asyncio.sleep(60)
    sys.exit(1)  # never handed the poison

asyncio.run(main(sys.argv[1], sys.argv[2]))
'''


async def test_process_dying_on_every_attempt_is_dead_lettered(
    bus: Bus, bus_config: BusConfig, tmp_path: Path
) -> None:
    """A message that kills its process on every delivery is dead-lettered once max_deliver is
    exhausted: the server's MAX_DELIVERIES advisory is kept, and the next healthy engine writes
    the dead letter (original bytes, deliveries) and goes on with the next message."""
    script = tmp_path / "poisoned_agent.py"
    script.write_text(_POISONED_AGENT)
    poison = await bus.send("victim", Note(text="poison"))
    for attempt in range(1, 4):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), bus_config.url, str(bus_config.credentials), cwd=REPO_ROOT,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 3, (
            f"attempt {attempt}: child exited {proc.returncode}: {stderr.decode()[-2000:]}"
        )
    texts: list[str] = []

    async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
        texts.append(envelope.payload.text)

    settings = fast(concurrency=1, prefetch=0, ack_wait_s=1.0)
    async with bus.consumer("victim", handle, settings=settings):
        await bus.send("victim", Note(text="next"))
        await wait_for(has_dead_letters(bus, "victim", 1), timeout_s=15, what="the dead letter")
        await wait_for(lambda: texts == ["next"], what="the next message")
    [letter] = await dead_letters(bus, "victim")
    dead = letter.payload
    assert dead.reason == "max_deliveries" and dead.deliveries == 3
    assert dead.original == await stored_bytes(bus, poison.ack.seq)
    assert (dead.original_seq, dead.original_id) == (poison.ack.seq, poison.envelope.id)
    assert dead.consumer == "victim__inbox" and dead.original_subject == "default.inbox.victim.tester"
    assert letter.id == dead_letter_id(bus.subjects.stream, poison.ack.seq)
    assert metric(bus, "continuum_dead_lettered_total", consumer="victim__inbox", reason="max_deliveries") == 1
