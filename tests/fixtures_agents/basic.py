"""Small agents: an echo that answers pings and forwards notes, and one that never starts."""

from __future__ import annotations

import os

from agents.runtime import Agent, Context, handler
from bus.client import Bus
from schemas.payloads import Note, Ping, Pong


class Echo(Agent):
    """Answers Ping with Pong; forwards every Note to the agent named in `note.data["to"]`."""

    name = "echo"
    tags = ("echoes",)

    @handler
    async def on_ping(self, ping: Ping, ctx: Context) -> Pong:
        return Pong(text=ping.text, responder=f"{ctx.agent}:{os.getpid()}")

    @handler
    async def on_note(self, note: Note, ctx: Context) -> None:
        await ctx.send(str(note.data.get("to", "sink")), Note(text=f"echo:{note.text}"))


class NeverStarts(Agent):
    """Fails in on_start every time: a crash loop for the circuit breaker."""

    name = "never-starts"

    async def on_start(self, bus: Bus) -> None:
        raise RuntimeError("this agent cannot start")

    @handler
    async def on_ping(self, ping: Ping, ctx: Context) -> None:
        return None


class Grumpy(Agent):
    """Fails on every note, deep in a helper: its tracebacks are what `bus agent logs` shows."""

    name = "grumpy"

    @handler
    async def on_note(self, note: Note, ctx: Context) -> None:
        _parse_amount(note.text)


def _parse_amount(text: str) -> float:
    return float(text.split("=")[1])  # IndexError without an "="
