"""Agents answering each other without end are stopped: every message a handler sends carries
its inbound message's hops + 1, and a consumer dead-letters a message past its `max_hops` as
`hop_limit` (recorded in the log, so the conversation shows where it stopped). Real nats-server,
the agent runtime in-process."""

from __future__ import annotations

from typing import Any

import pytest

from agents.runtime import Agent, Context, handler
from bus import Bus, BusConfig, ConfigurationError, ConsumerSettings
from conftest import wait_for
from schemas import Envelope
from schemas.payloads import DeadLettered, Note, Ping
from test_agent_runtime import running
from test_deadletter import dead_letters

MAX_HOPS = 5


class Parrot(Agent):
    """Repeats every note to the agent named in it, itself included: an endless conversation."""

    name = "parrot"

    def __init__(self) -> None:
        self.heard: list[int] = []

    @handler
    async def on_note(self, note: Note, ctx: Context) -> None:
        self.heard.append(ctx.envelope.hops)
        await ctx.send(str(note.data["to"]), Note(text=note.text, data=note.data))


async def test_an_agent_answering_itself_stops_at_max_hops(bus_config: BusConfig, bus: Bus) -> None:
    parrot = Parrot()
    async with running(parrot, bus_config, consumer=ConsumerSettings(max_hops=MAX_HOPS)):
        first = await bus.send("parrot", Note(text="polly", data={"to": "parrot"}))
        await wait_for(lambda: _has_letter(bus), timeout_s=20, what="the chain's dead letter")
    assert parrot.heard == list(range(MAX_HOPS + 1))  # hops 0 (from outside) .. max_hops handled
    [letter] = await dead_letters(bus, "parrot")
    dead: DeadLettered = letter.payload
    assert dead.reason == "hop_limit" and f"over max_hops {MAX_HOPS}" in (dead.error or "")
    assert letter.correlation_id == first.envelope.correlation_id
    stopped: Envelope[Any] = bus.codec.decode(dead.original)
    assert stopped.hops == MAX_HOPS + 1 and stopped.correlation_id == first.envelope.correlation_id


async def _has_letter(bus: Bus) -> bool:
    return len(await dead_letters(bus, "parrot")) >= 1


async def test_a_reply_carries_one_hop_more_than_its_request(bus_config: BusConfig, bus: Bus) -> None:
    from fixtures_agents.basic import Echo

    async with running(Echo(), bus_config):
        request = bus.envelope(Ping(text="hi"), to="echo", reply_to=bus.config.name, hops=3)
        assert request.hops == 3
        reply = await bus.request("echo", Ping(text="hi"), timeout_s=10)
    assert reply.hops == 1  # the request came from outside: hops 0


def test_max_hops_is_bounded() -> None:
    with pytest.raises(ConfigurationError, match="max_hops"):
        ConsumerSettings(max_hops=0)

def test_hops_zero_is_left_out_of_the_wire_form(bus_config: BusConfig) -> None:
    """Envelopes from before the field and envelopes that start a chain encode the same."""
    bus = Bus(bus_config)
    assert b"hops" not in bus.codec.encode(bus.envelope(Note(text="x"), to="a"))
    assert b'"hops":2' in bus.codec.encode(bus.envelope(Note(text="x"), to="a", hops=2))
