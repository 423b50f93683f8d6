"""Request/reply through consumer engines against a real nats-server: answers, requests that
wait for their responder, clean timeouts, and failures reported at once."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from typing import Any

import pytest

from bus import Bus, BusConfig, ConsumerSettings, PermanentError, RemoteError, RequestTimeout, RetryPolicy
from conftest import wait_for
from schemas import Delivery, Envelope
from schemas.payloads import Ping, Pong

SETTINGS = ConsumerSettings(
    report_interval_s=0.01, drain_timeout_s=2.0, retry=RetryPolicy(backoff_s=(0.05,), max_deliver=3)
)


def responder(bus: Bus):  # type: ignore[no-untyped-def]
    async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
        assert isinstance(envelope.payload, Ping)
        await bus.reply(envelope, Pong(text=envelope.payload.text, responder="echo"))

    return handle


def server_subscriptions(bus_config: BusConfig) -> int:
    """Subscriptions the server holds for this bus's connection (from its monitoring port)."""
    assert bus_config.monitor_url is not None
    with urllib.request.urlopen(f"{bus_config.monitor_url}/connz?subs=1", timeout=2) as resp:  # noqa: S310
        conns = json.loads(resp.read())["connections"]
    return sum(c.get("subscriptions", 0) for c in conns if c.get("name") == f"continuum:{bus_config.name}")


async def test_request_returns_the_reply(bus: Bus) -> None:
    """request() returns the typed reply a handler sends with reply(); both are in the log."""
    async with bus.consumer("echo", responder(bus), settings=SETTINGS):
        reply = await bus.request("echo", Ping(text="hi"), timeout_s=5)
    assert isinstance(reply.payload, Pong)
    assert reply.payload.text == "hi" and reply.payload.responder == "echo"
    assert reply.causation_id is not None
    stored = await bus.js.get_msg(bus.subjects.stream, subject=bus.subjects.reply("tester", reply.causation_id, "echo"))
    assert bus.codec.decode(stored.data).id == reply.id


async def test_request_sent_before_the_responder_starts_is_answered(bus: Bus) -> None:
    """A request published before the responder's consumer exists is answered once it starts,
    within the requester's timeout."""
    async with asyncio.TaskGroup() as tg:
        pending = tg.create_task(bus.request("sleeper", Ping(text="early"), timeout_s=10))

        async def request_stored() -> bool:
            info = await bus.js.stream_info(bus.subjects.stream, subjects_filter="default.inbox.sleeper.*")
            return bool(info.state.messages)

        await wait_for(request_stored, what="the request in the log")
        assert not pending.done()
        async with bus.consumer("sleeper", responder(bus), settings=SETTINGS):
            reply = await pending
    assert reply.payload.text == "early"


async def test_timeout_raises_cleanly(bus: Bus, bus_config: BusConfig) -> None:
    """With nobody answering, request() raises RequestTimeout after its timeout and leaves no
    subscription behind."""
    before = await asyncio.to_thread(server_subscriptions, bus_config)
    assert before >= 1, "the bus connection is found on the server (its request inbox at least)"
    started = time.monotonic()
    with pytest.raises(RequestTimeout) as info:
        await bus.request("nobody", Ping(), timeout_s=0.3)
    assert 0.3 <= time.monotonic() - started < 3
    assert info.value.request_id
    await bus.transport.flush()
    assert await asyncio.to_thread(server_subscriptions, bus_config) == before


async def test_permanently_failing_handler_fails_the_request_at_once(bus: Bus) -> None:
    """A request whose handler fails permanently is answered with RequestFailed before it is
    dead-lettered: the requester gets RemoteError at once, not a timeout."""

    async def refuse(envelope: Envelope[Any], delivery: Delivery) -> None:
        raise PermanentError("this agent cannot ping")

    async with bus.consumer("grumpy", refuse, settings=SETTINGS):
        started = time.monotonic()
        with pytest.raises(RemoteError) as info:
            await bus.request("grumpy", Ping(), timeout_s=10)
    assert time.monotonic() - started < 5
    assert "this agent cannot ping" in str(info.value)
    assert info.value.error_type == "permanent"


async def test_exhausted_retries_fail_the_request(bus: Bus) -> None:
    """A request whose handler keeps failing gets RemoteError once max_deliver is used up."""
    attempts: list[int] = []

    async def flaky(envelope: Envelope[Any], delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        raise RuntimeError("backend down")

    async with bus.consumer("flaky", flaky, settings=SETTINGS):
        with pytest.raises(RemoteError, match="backend down") as info:
            await bus.request("flaky", Ping(), timeout_s=10)
    assert attempts == [1, 2, 3]
    assert info.value.error_type == "exhausted"
