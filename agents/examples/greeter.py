"""A minimal agent: answers pings, and counts the words of every note in a recorded step."""

from __future__ import annotations

from agents.runtime import Agent, Context, handler
from schemas.payloads import Note, Notice, Ping, Pong


class Greeter(Agent):
    """Answers `Ping` requests with `Pong`; for each `Note`, counts its words once (a step) and
    reports the count to the note's sender; logs broadcasts to the `team` tag."""

    name = "greeter"
    tags = ("team",)

    @handler
    async def on_ping(self, ping: Ping, ctx: Context) -> Pong:
        return Pong(text=f"hello, {ping.text or 'there'}", responder=ctx.agent)

    @handler
    async def on_note(self, note: Note, ctx: Context) -> None:
        words = await ctx.step("count words", lambda: len(note.text.split()), type=int)
        await ctx.send(ctx.envelope.sender, Note(text=f"{words} words", data={"words": words}))

    @handler
    async def on_notice(self, notice: Notice, ctx: Context) -> None:
        await ctx.step("acknowledge", lambda: f"seen: {notice.text}", type=str)
