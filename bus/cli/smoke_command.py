"""`bus smoke`: one real run of the bus, printed step by step as it happens.

It starts a nats-server in a temporary directory (or uses --url), runs two agents' consumers in
this process ("alice" and "bob", both tagged "team"), sends to each inbox, broadcasts to the tag
(both get it), asks bob a request and prints the reply, then stops everything in order. Every
step shows the stream sequence and how long it took; any step that does not complete within
--timeout fails the run (exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bus.cli.common import CliError, out, probe_server
from bus.client import Bus
from bus.config import BusConfig, check_name
from bus.errors import BusError
from bus.server import ANY_PORT, EmbeddedServer, ServerSettings
from schemas import Delivery, Envelope
from schemas.payloads import Note, Notice, Ping, Pong

AGENTS = ("alice", "bob")
TAG = "team"


def register(sub: argparse._SubParsersAction) -> None:
    smoke = sub.add_parser(
        "smoke", help="a real end-to-end run: server, two agents, send, broadcast, request/reply",
        description="Start a server in a temporary directory (or use --url), run the consumers of two "
        "agents in this process, send to each, broadcast to both, request/reply, and stop. Exit 0 "
        "when every step completed.",
    )
    smoke.add_argument("--url", default=None, help="use this NATS server instead of starting one")
    smoke.add_argument(
        "--namespace", default="smoke", help="namespace of the run (default %(default)s, kept apart from real agents)"
    )
    smoke.add_argument("--timeout", type=float, default=10.0, help="seconds each step may take (default %(default)s)")
    smoke.set_defaults(func=run_smoke)


class SmokeFailed(BusError):
    """A step of the smoke run did not complete in time."""


class _Arrivals:
    """Which agent got which envelope: a future per (agent, envelope id), from either side."""

    def __init__(self) -> None:
        self._futures: dict[tuple[str, str], asyncio.Future[tuple[Delivery, float]]] = {}

    def _future(self, agent: str, envelope_id: str) -> asyncio.Future[tuple[Delivery, float]]:
        key = (agent, envelope_id)
        if key not in self._futures:
            self._futures[key] = asyncio.get_running_loop().create_future()
        return self._futures[key]

    def arrived(self, agent: str, envelope: Envelope[Any], delivery: Delivery) -> None:
        future = self._future(agent, envelope.id)
        if not future.done():
            future.set_result((delivery, time.perf_counter()))

    async def wait(self, agent: str, envelope_id: str, timeout_s: float, what: str) -> tuple[Delivery, float]:
        try:
            return await asyncio.wait_for(asyncio.shield(self._future(agent, envelope_id)), timeout_s)
        except asyncio.TimeoutError:
            raise SmokeFailed(f"{what}: {agent} did not get it within {timeout_s}s") from None


class _Steps:
    """Prints one line per step with the time since the run started."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def show(self, name: str, text: str) -> None:
        out(f"[{(time.perf_counter() - self.started) * 1000:8.1f} ms] {name:<10} {text}")


async def run_smoke(args: argparse.Namespace) -> int:
    """Run the smoke scenario. Returns 0 when every step completed, 1 when one failed."""
    check_name(args.namespace, "namespace")
    steps = _Steps()
    try:
        async with contextlib.AsyncExitStack() as stack:
            config = await _server(args, stack, steps)
            t = time.perf_counter()
            bus = await stack.enter_async_context(Bus(config))
            steps.show("connect", f"bus connected as {config.name!r}, namespace {config.namespace!r} ({_ms(t)})")
            await _scenario(bus, stack, steps, args.timeout)
            t = time.perf_counter()
            out("stopping: consumers (drain and settle), bus connection, server ...")
            await stack.aclose()
            steps.show("stopped", f"everything stopped cleanly ({_ms(t)})")
    except SmokeFailed as exc:
        out(f"smoke FAILED: {exc}")
        return 1
    out("smoke passed: send, broadcast and request/reply all went through the durable log")
    return 0


async def _server(args: argparse.Namespace, stack: contextlib.AsyncExitStack, steps: _Steps) -> BusConfig:
    """Start a temporary server (or check --url) and return the bus config to use."""
    if args.url is not None:
        await probe_server(args.url)
        steps.show("server", f"using {args.url}")
        return BusConfig(
            url=args.url, namespace=args.namespace, name="smoke", monitor_url=os.environ.get("BUS_MONITOR_URL") or None
        )
    t = time.perf_counter()
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="continuum-smoke-")))
    settings = ServerSettings(store_dir=tmp / "nats", port=ANY_PORT, monitor_port=ANY_PORT)
    try:
        server = await stack.enter_async_context(EmbeddedServer(settings))
    except BusError as exc:
        raise CliError(f"could not start a temporary nats-server: {exc}") from exc
    steps.show("server", f"nats-server on {server.url}, store {settings.store_dir} (fsync on every write) ({_ms(t)})")
    return BusConfig(url=server.url, namespace=args.namespace, name="smoke", monitor_url=server.settings.monitor_url)


async def _scenario(bus: Bus, stack: contextlib.AsyncExitStack, steps: _Steps, timeout_s: float) -> None:
    arrivals = _Arrivals()

    def handler_for(agent: str) -> Any:
        async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
            arrivals.arrived(agent, envelope, delivery)
            if envelope.reply_to is not None:
                await bus.reply(envelope, Pong(text=f"{agent} is here", responder=agent))

        return handle

    t = time.perf_counter()
    for agent in AGENTS:
        await stack.enter_async_context(bus.consumer(agent, handler_for(agent), tags=[TAG]))
    steps.show("consumers", f"{' and '.join(AGENTS)} consuming their inboxes and #{TAG} ({_ms(t)})")

    for agent in AGENTS:
        t = time.perf_counter()
        sent = await bus.send(agent, Note(text=f"hello {agent}"))
        delivery, at = await arrivals.wait(agent, sent.envelope.id, timeout_s, f"send to {agent}")
        steps.show(
            "send", f"{bus.config.name} → {agent}: note stored at seq {sent.ack.seq}, handled by {agent} "
            f"(attempt {delivery.attempt}) {_ms(t, at)} after the send",
        )

    t = time.perf_counter()
    sent = await bus.broadcast(TAG, Notice(text="hello team", topic="smoke"))
    handled = [await arrivals.wait(agent, sent.envelope.id, timeout_s, f"broadcast to #{TAG}") for agent in AGENTS]
    by = ", ".join(f"{agent} {_ms(t, at)}" for agent, (_, at) in zip(AGENTS, handled, strict=True))
    steps.show("broadcast", f"{bus.config.name} → #{TAG}: notice stored at seq {sent.ack.seq}, handled by {by}")

    t = time.perf_counter()
    asked = AGENTS[-1]
    try:
        reply = await bus.request(asked, Ping(text="are you there?"), timeout_s=timeout_s)
    except BusError as exc:
        raise SmokeFailed(f"request to {asked}: {type(exc).__name__}: {exc}") from exc
    elapsed = _ms(t)
    request_id = reply.causation_id or ""
    request_delivery, _ = await arrivals.wait(asked, request_id, timeout_s, f"request to {asked}")
    reply_seq = await _seq_of(bus, bus.subjects.reply(bus.config.name, request_id, asked))
    if not isinstance(reply.payload, Pong):
        raise SmokeFailed(f"request to {asked}: expected a pong, got {reply.kind}")
    steps.show(
        "request", f"{bus.config.name} → {asked}: ping stored at seq {request_delivery.stream_seq}, "
        f"reply {reply.kind} {reply.payload.text!r} stored at seq {reply_seq}, round trip {elapsed}",
    )
    steps.show("log", f"{await bus.last_seq()} envelopes in {bus.subjects.stream} so far "
               "(the consumers record their delivery reports as they settle)")


async def _seq_of(bus: Bus, subject: str) -> int | None:
    stored = await bus.transport.direct_get(bus.subjects.stream, {"last_by_subj": subject})
    return None if stored is None else stored.seq


def _ms(start: float, end: float | None = None) -> str:
    return f"{((end if end is not None else time.perf_counter()) - start) * 1000:.1f} ms"
