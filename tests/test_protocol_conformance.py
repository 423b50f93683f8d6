"""An agent written from schemas/PROTOCOL.md alone (raw JSON over plain nats-py; nothing of
Continuum imported for its side of the protocol) joins the bus: it answers a Python requester,
its settlements and heartbeats reach the views, and `bus agent ps` lists it. Real nats-server,
real projection service, the real CLI."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js import api

from bus import Bus
from conftest import seed_of, wait_for
from projections.config import ProjectionSettings
from projections.service import ProjectionService
from schemas import derived_id
from schemas.payloads import Note, Ping, Pong
from test_cli import cli_env, run_bus, server_env  # noqa: F401  (fixtures)

NS = "default"
NAME = "poly"


@pytest.fixture
async def service(bus: Bus, tmp_path: Path) -> AsyncIterator[ProjectionService]:
    async with ProjectionService(bus, ProjectionSettings(db_path=str(tmp_path / "views.duckdb"))) as svc:
        yield svc


# -- the agent, from the page: §2 envelopes, §3 publishing, §4-5 consuming and settling, §6
# replies, §8 heartbeats ------------------------------------------------------------------------


def uuid7() -> str:
    ms = time.time_ns() // 1_000_000
    value = ms << 80 | 0x7 << 76 | secrets.randbits(12) << 64 | 0b10 << 62 | secrets.randbits(62)
    return str(uuid.UUID(int=value))


def spec_derived_id(parent: str, name: str) -> str:
    digest = int.from_bytes(hashlib.sha256(f"{parent}\x00{name}".encode()).digest()[:10], "big")
    ms = uuid.UUID(parent).int >> 80
    value = ms << 80 | 0x7 << 76 | (digest >> 68 & 0xFFF) << 64 | 0b10 << 62 | (digest & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class PolyglotAgent:
    def __init__(self, url: str, seed: str | None = None) -> None:
        self.url = url
        self.seed = seed  # the nkey seed it connects with (authorization is on)
        self.handled: list[str] = []
        self.started = time.monotonic()

    async def publish(self, js: Any, subject: str, envelope: dict[str, Any]) -> int:
        ack = await js.publish(subject, json.dumps(envelope).encode(), headers={"Nats-Msg-Id": envelope["id"]})
        return ack.seq

    def envelope(self, payload: dict[str, Any], **fields: Any) -> dict[str, Any]:
        envelope_id = fields.pop("id", None) or uuid7()
        return {"id": envelope_id, "sender": NAME, "payload": payload, "created_at": now(),
                "correlation_id": fields.pop("correlation_id", envelope_id), **fields}

    async def record(self, js: Any, kind: str, fields: dict[str, Any]) -> None:
        await self.publish(js, f"{NS}.event.{NAME}.{kind}", self.envelope({"kind": kind, "agent": NAME, **fields}))

    async def run(self, stop: asyncio.Event) -> None:
        nc = await nats.connect(self.url, **({"nkeys_seed_str": self.seed} if self.seed else {}))
        try:
            js = nc.jetstream()
            sub = await js.pull_subscribe(
                f"{NS}.inbox.{NAME}.*", durable=f"{NAME}__inbox", stream=f"CONTINUUM_{NS.upper()}",
                config=api.ConsumerConfig(
                    ack_policy=api.AckPolicy.EXPLICIT, ack_wait=30, max_deliver=5, max_ack_pending=20000,
                    deliver_policy=api.DeliverPolicy.ALL,
                ),
            )
            await self.record(js, "agent.started", {"replica": 0, "pid": os.getpid(), "kinds": ["ping", "note"]})
            beats = asyncio.create_task(self.beat(js, stop))
            try:
                while not stop.is_set():
                    try:
                        msgs = await sub.fetch(batch=10, timeout=0.5)
                    except (nats.errors.TimeoutError, TimeoutError):  # nats-py raises either
                        continue
                    settlements = [await self.handle(js, msg) for msg in msgs]
                    # §5: the report first, then the acks.
                    await self.record(js, "delivery.report", {"consumer": f"{NAME}__inbox", "settlements": settlements})
                    for msg in msgs:
                        await msg.ack()
            finally:
                stop.set()
                await beats  # it ends on `stop` within one interval
        finally:
            await nc.close()

    async def handle(self, js: Any, msg: Any) -> dict[str, Any]:
        started = time.perf_counter()
        request = json.loads(msg.data)
        payload = request["payload"]
        if payload["kind"] == "ping" and request.get("reply_to"):
            reply = self.envelope(
                {"kind": "pong", "text": payload.get("text", ""), "responder": "node-ish"},
                id=spec_derived_id(request["id"], "reply"), to=request["reply_to"],
                correlation_id=request["correlation_id"], causation_id=request["id"],
                hops=request.get("hops", 0) + 1,
            )
            await self.publish(js, f"{NS}.reply.{request['reply_to']}.{request['id']}.{NAME}", reply)
        self.handled.append(request["id"])
        return {"stream_seq": msg.metadata.sequence.stream, "attempt": msg.metadata.num_delivered,
                "outcome": "handled", "envelope_id": request["id"], "kind": payload["kind"],
                "handler_ms": round((time.perf_counter() - started) * 1000, 3)}

    async def beat(self, js: Any, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.record(js, "agent.heartbeat", {
                "replica": 0, "pid": os.getpid(), "state": "running", "in_flight": 0,
                "handled": len(self.handled), "failed": 0, "uptime_s": time.monotonic() - self.started,
                "interval_s": 1.0,
            })
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass


# -- the checks --------------------------------------------------------------------------------


def test_the_pages_derived_id_is_the_runtimes() -> None:
    parent = uuid7()
    assert spec_derived_id(parent, "reply") == derived_id(parent, "reply")


async def test_an_agent_written_from_the_page_joins_the_bus(
    tmp_path, server_env, bus: Bus, service: ProjectionService,
) -> None:
    agent = PolyglotAgent(server_env["BUS_URL"], seed_of(server_env["BUS_CREDS"]))
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(agent.run(stop))
        try:
            reply = await bus.request(NAME, Ping(text="are you there"), timeout_s=15)
            assert isinstance(reply.payload, Pong) and reply.payload.text == "are you there"
            assert reply.sender == NAME and reply.hops == 1
            note = await bus.send(NAME, Note(text="file this"))
            await wait_for(lambda: note.envelope.id in agent.handled, timeout_s=15, what="the note handled")

            async def settled() -> bool:
                rows = (await bus.query(
                    "SELECT status, handled_by FROM messages WHERE id = ?", [note.envelope.id], min_seq=0,
                )).records()
                return rows == [{"status": "handled", "handled_by": [NAME]}]

            await wait_for(settled, timeout_s=15, what="the note shown handled by poly in the views")
            request_row = (await bus.query("SELECT status, handled_by FROM messages WHERE kind = 'ping'")).records()
            assert request_row == [{"status": "handled", "handled_by": [NAME]}]

            async def alive() -> bool:
                rows = (await bus.query(
                    "SELECT replicas_alive FROM agents WHERE name = ?", [NAME], min_seq=0,
                )).records()
                return bool(rows) and rows[0]["replicas_alive"] == 1

            await wait_for(alive, timeout_s=15, what="poly alive in the agents view")
            listed = await run_bus("agent", "ps", env=server_env, cwd=tmp_path)
            assert listed.code == 0, listed.stderr
            [row] = [line for line in listed.stdout.splitlines() if line.startswith(NAME)]
            assert row.split()[:4] == [NAME, "0", str(os.getpid()), "running"] and "(elsewhere)" in row
        finally:
            stop.set()
