"""The hostile corpus (tests/hostile_corpus.py) sent raw to a running agent process and folded
by the projection service: both stay up, every message is accounted for exactly as the corpus
says, dead letters fit (large originals referred to by size and hash), and afterwards the agent
still answers a request and the service still answers queries."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from agents.supervisor import AgentSpec, EventRecorder, RestartPolicy, Supervisor, SupervisorSettings
from bus import Bus, BusConfig, RetryableError
from bus.config import ConsumerSettings, RetryPolicy
from bus.deadletter import carried_limit, loose_envelope
from bus.server import ANY_PORT, EmbeddedServer, ServerSettings
from projections.config import ProjectionSettings
from projections.service import ProjectionService
from schemas import Codec, DecodeError
from schemas.registry import kind_of_raw
from schemas.payloads import DeadLettered, DeliveryReport, Note, Ping, Pong
from conftest import wait_for
from fixtures_agents.helpers import read_log
from hostile_corpus import CASES, HostileCase

QUICK = RestartPolicy(backoff_initial_s=0.05, backoff_max_s=0.2, max_crashes=20, window_s=60.0)


@asynccontextmanager
async def greeter(bus: Bus, config: BusConfig) -> AsyncIterator[Supervisor]:
    """The example greeter agent as a supervised OS process, ready."""
    spec = AgentSpec(target="agents.examples.greeter:Greeter", name="greeter", bus=config)
    recorder = EventRecorder(bus)
    supervisor = Supervisor(spec, SupervisorSettings(restart=QUICK), recorder=recorder)
    async with asyncio.TaskGroup() as tasks:
        recording = tasks.create_task(recorder.run())
        async with supervisor.running():
            await supervisor.wait_ready(30)
            yield supervisor
        await recorder.flush(5.0)
        recording.cancel()


async def outcomes(bus: Bus, seqs: set[int]) -> dict[int, str]:
    """How the greeter settled each of `seqs` so far: handled, expired or dead:<reason>."""
    reasons = {
        letter.payload.original_seq: letter.payload.reason
        for _, letter in await read_log(bus, "default.dead.greeter")
    }
    found: dict[int, str] = {}
    for _, env in await read_log(bus, "default.event.greeter.delivery.report"):
        for s in env.payload.settlements if isinstance(env.payload, DeliveryReport) else ():
            if s.stream_seq not in seqs:
                continue
            if s.outcome == "dead_lettered":
                assert s.attempt == 1, f"seq {s.stream_seq} was retried before it was dead-lettered"
                if s.stream_seq in reasons:
                    found[s.stream_seq] = f"dead:{reasons[s.stream_seq]}"
            elif s.outcome in ("handled", "expired"):
                found[s.stream_seq] = s.outcome
            else:
                found.setdefault(s.stream_seq, s.outcome)
    return found


async def test_hostile_corpus_leaves_agent_and_projections_up_and_accounts_for_every_message(
    bus_config: BusConfig, bus: Bus, tmp_path: Path
) -> None:
    """Every corpus message ends the way the corpus says, on its first delivery; the agent
    process never exits (no restart), still answers a ping; the projection service folds every
    record (an events row each, with an error exactly for what is not an envelope) and answers."""
    settings = ProjectionSettings(db_path=str(tmp_path / "views.duckdb"))
    async with ProjectionService(bus, settings), greeter(bus, bus_config) as supervisor:
        sent: dict[int, tuple[HostileCase, bytes]] = {}
        for case in CASES:
            data = case.build()
            ack = await bus.js.publish("default.inbox.greeter.tester", data, timeout=30)
            sent[ack.seq] = (case, data)

        async def settled() -> bool:
            return len(await outcomes(bus, set(sent))) == len(sent)

        await wait_for(settled, timeout_s=90, interval_s=0.2, what="every hostile message settled")
        got = await outcomes(bus, set(sent))
        wrong = {case.name: (case.expect, got[seq]) for seq, (case, _) in sent.items() if got[seq] != case.expect}
        assert not wrong, f"settled otherwise than expected (expected, got): {wrong}"

        reply = await bus.request("greeter", Ping(text="still there?"), timeout_s=20)
        assert isinstance(reply.payload, Pong) and reply.payload.text == "hello, still there?"
        replica = supervisor.status().replicas[0]
        assert replica.state == "running" and replica.restarts == 0, replica

        await check_dead_letters(bus, sent)
        await check_projections(bus, sent)


async def check_dead_letters(bus: Bus, sent: dict[int, tuple[HostileCase, bytes]]) -> None:
    """Each dead letter names its original's size and hash, and carries the bytes exactly
    when they fit."""
    limit = carried_limit(bus.max_payload)
    letters = {env.payload.original_seq: env.payload for _, env in await read_log(bus, "default.dead.greeter")
               if isinstance(env.payload, DeadLettered)}
    for seq, (case, data) in sent.items():
        if not case.expect.startswith("dead:"):
            assert seq not in letters, case.name
            continue
        letter = letters[seq]
        assert letter.original_size == len(data), case.name
        assert letter.original_sha256 == hashlib.sha256(data).hexdigest(), case.name
        assert letter.carries_original == (len(data) <= limit), case.name
        assert letter.original == (data if len(data) <= limit else b""), case.name
        assert letter.error and len(letter.error) <= 2000, case.name


async def check_projections(bus: Bus, sent: dict[int, tuple[HostileCase, bytes]]) -> None:
    seqs = sorted(sent)
    last = max(seqs)
    rows = (await bus.query(
        "select seq, error is not null as refused from events where seq between ? and ? order by seq",
        [seqs[0], last], min_seq=last, timeout_s=30,
    )).records()
    refused = {row["seq"]: row["refused"] for row in rows}
    assert set(seqs) <= set(refused), "some records have no events row"
    for seq, (case, data) in sent.items():
        # The projections keep a payload raw (bad UTF-8 in it replaced): only what is not an
        # envelope at all gets an error row.
        assert refused[seq] == (loose_envelope(data) is None), (case.name, refused[seq])
    dead = (await bus.query(
        "select original_seq, reason, original_size, original is null as referred from dead_letters "
        "where agent = 'greeter'", min_seq=await bus.last_seq(), timeout_s=30,
    )).records()
    by_seq: dict[int, dict[str, Any]] = {row["original_seq"]: row for row in dead}
    limit = carried_limit(bus.max_payload)
    for seq, (case, data) in sent.items():
        if case.expect.startswith("dead:"):
            row = by_seq[seq]
            assert (f"dead:{row['reason']}", row["original_size"]) == (case.expect, len(data)), case.name
            assert row["referred"] == (len(data) > limit), case.name


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_corpus_expectations_match_the_codec(case: HostileCase) -> None:
    """The corpus's expected outcome is what the codec says of the bytes (fast, no server):
    a dead letter's reason comes from the decode error, handled/expired from a clean decode."""
    codec = Codec()
    data = case.build()
    try:
        envelope = codec.decode(data)
    except DecodeError as exc:
        loose = loose_envelope(data)
        if loose is None:
            reason = exc.problem
        else:
            kind = kind_of_raw(loose.payload)
            reason = "unknown_kind" if kind is None or codec.registry.type_for(kind) is None else "invalid"
        assert case.expect == f"dead:{reason}"
    else:
        assert case.expect == ("expired" if envelope.is_expired(datetime.now(UTC)) else "handled")


async def test_on_a_server_with_a_small_max_payload_long_errors_still_settle(tmp_path: Path) -> None:
    """On a server whose max_payload (64 KB) is far below nats.conf's, a flush of 100
    settlements with 2,000-character errors (~220 KB as one report) is recorded in parts that
    fit: every delivery's settlement is in the log, and the engine keeps consuming."""
    conf = tmp_path / "small.conf"
    conf.write_text("host: 127.0.0.1\nmax_payload: 65536\njetstream { sync_interval: always }\n")
    server = EmbeddedServer(ServerSettings(store_dir=tmp_path / "nats", port=ANY_PORT, monitor_port=ANY_PORT,
                                           config_file=conf))
    await server.start()
    try:
        config = BusConfig(url=server.url, monitor_url=server.settings.monitor_url, name="tester",
                           consumer=ConsumerSettings(concurrency=100, prefetch=0, report_interval_s=0.5,
                                                     retry=RetryPolicy(backoff_s=(60.0,), max_deliver=5)))
        async with Bus(config) as bus:
            sent = [(await bus.send("worker", Note(text=str(i)))).ack.seq for i in range(100)]

            async def fail(envelope: Any, delivery: Any) -> None:
                raise RetryableError("x" * 3000)

            async with bus.consumer("worker", fail):
                async def all_reported() -> bool:
                    reports = [env.payload for _, env in await read_log(bus, "default.event.worker.delivery.report")]
                    seen = {s.stream_seq for r in reports for s in r.settlements if s.outcome == "retried"}
                    return set(sent) <= seen

                await wait_for(all_reported, timeout_s=30, interval_s=0.2, what="every settlement recorded")
            reports = [env.payload for _, env in await read_log(bus, "default.event.worker.delivery.report")]
            assert len(reports) > 1 and max(len(r.settlements) for r in reports) < 100
    finally:
        await server.stop()
