"""The research team: four LLM agents, each its own process, handing one day's work along.

    coordinator ──day──▶ researcher ──new findings──▶ synthesiser ──synthesis──▶ writer
                                                                                  │  ▲
                                                          report to coordinator ◀─┤  │ corrections
                                                                                  ▼  │
                                                                                reviewer

researcher   reads the day's papers, records each finding as a fact (subject, effect, source,
             confidence); passes on only the findings that were new
synthesiser  checks the new findings against every earlier fact, flags contradictions (both
             claims kept), and rewrites the team's shared "digest" block
writer       writes the day's report, one cited claim per new finding plus the contradictions
reviewer     checks every claim against the fact recorded from its cited source and sends
             corrections back; the writer revises and sends the final report to the coordinator

Messages are `Note`s whose `data` says the stage and the day; every one carries the day run's
correlation id. A day with nothing new goes researcher → synthesiser → writer → coordinator
without further model calls and says so.

Retention (RETENTION): a conversation idle for half a day is summarised and closed, so each day
starts a fresh context window with the earlier days as a summary (the demo's night moves the
clock on a day and asks each agent to sweep).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import msgspec

from agents.llm.offline.research import parse_corrections
from agents.llm_agent import BlockSpec, LLMAgent
from agents.memory.retention import RetentionPolicy
from agents.research.corpus import Paper, load_corpus, render_papers
from agents.runtime import Context
from schemas.payloads.memory import ContradictionFlagged, FactRecorded
from schemas.payloads.messaging import Note

TEAM = ("researcher", "synthesiser", "writer", "reviewer")
COORDINATOR = "coordinator"
TEAM_TAG = "research"
DIGEST = BlockSpec(
    label="digest", limit=3000, block_id="research/digest", holders=("synthesiser", "writer", "reviewer"),
    description="The team's running synthesis: the latest day's contradictions and refinements.",
)
RETENTION = RetentionPolicy(idle_ttl=timedelta(hours=12), sweep_every=timedelta(minutes=10))


def _data(note: Note, **more: Any) -> dict[str, Any]:
    return {**note.data, **more}


class Researcher(LLMAgent):
    name = "researcher"
    tags = (TEAM_TAG,)
    role = "researcher"
    retention = RETENTION
    system_prompt = (
        "You are the team's researcher. Read the day's papers and record every key finding as a "
        "fact with archival_insert: a normalised subject, the effect as value (increases, "
        "decreases, no-effect), the finding id as source, and your confidence. Keep a short "
        "progress line in your notes block."
    )
    tool_names = ("archival_insert", "archival_search", "core_memory_append")
    core_blocks = (BlockSpec(label="notes", limit=2000),)

    async def respond(self, note: Note, ctx: Context) -> None:
        day = int(note.data["day"])
        papers = load_corpus().day(day)
        task = (f"Read the papers of day {day} and record their key findings.\n\n" + render_papers(papers))
        result = await self.converse(ctx, task)
        # From the log, not from this attempt's tool results: a fact stored by an attempt that
        # died before recording its step is still this message's finding.
        new = [e.source.ref for e in self.log.caused_by(ctx.envelope.id, FactRecorded)]
        total = sum(len(p.findings) for p in papers)
        fresh = _only(papers, set(new))
        if fresh:
            text = f"New findings of day {day} ({len(new)} of {total}):\n\n" + render_papers(fresh)
        else:
            text = f"Nothing new on day {day}: all {total} findings of {len(papers)} papers were already recorded."
        await ctx.send("synthesiser", Note(text=text, data=_data(
            note, stage="findings", new=new, known=total - len(new), papers=len(papers), summary=result.text,
        )))


class Synthesiser(LLMAgent):
    name = "synthesiser"
    tags = (TEAM_TAG,)
    role = "synthesiser"
    retention = RETENTION
    system_prompt = (
        "You are the team's synthesiser. Integrate new findings with what the team already knows: "
        "search archival memory for each subject, flag every contradiction with an earlier fact "
        "(never delete either claim), note refinements, and keep the shared digest block current."
    )
    tool_names = ("archival_search", "flag_contradiction", "core_memory_rethink")
    core_blocks = (DIGEST,)

    async def respond(self, note: Note, ctx: Context) -> None:
        if not note.data.get("new"):
            await ctx.send("writer", Note(text=note.text, data=_data(note, stage="synthesis", contradictions=[])))
            return
        day = note.data["day"]
        result = await self.converse(ctx, f"Integrate the new findings of day {day}.\n\n{note.text}")
        flagged = [e.contradiction_id for e in self.log.caused_by(ctx.envelope.id, ContradictionFlagged)]
        text = f"{note.text}\n\nSynthesis:\n{result.text}"
        await ctx.send("writer", Note(text=text, data=_data(note, stage="synthesis", contradictions=flagged)))


class Writer(LLMAgent):
    name = "writer"
    tags = (TEAM_TAG,)
    role = "writer"
    retention = RETENTION
    system_prompt = (
        "You are the team's writer. Write the day's report: only what is new, one line per claim "
        "in the form '- subject: effect. statement [source id]', then the contradictions with "
        "earlier findings. Every claim cites its source. Apply the reviewer's corrections exactly."
    )
    tool_names = ("archival_search", "core_memory_append")
    core_blocks = (BlockSpec(label="log", limit=2000), DIGEST)

    async def respond(self, note: Note, ctx: Context) -> None:
        day = note.data["day"]
        stage = note.data.get("stage")
        if stage == "synthesis" and not note.data.get("new"):
            await self._publish(ctx, note, note.text, corrections=0)
        elif stage == "synthesis":
            result = await self.converse(ctx, f"Write the report of day {day}.\n\n{note.text}")
            await ctx.send("reviewer", Note(text=result.text, data=_data(note, stage="draft")))
        elif stage == "review":
            report = str(note.data.get("report", ""))
            corrections = parse_corrections(note.text)
            if corrections:
                task = f"Revise the report of day {day}.\n\nReport:\n{report}\n\nCorrections:\n{note.text}"
                report = (await self.converse(ctx, task)).text
            await self._publish(ctx, note, report, corrections=len(corrections))

    async def _publish(self, ctx: Context, note: Note, report: str, *, corrections: int) -> None:
        data = _data(note, stage="report", corrections=corrections)
        data.pop("report", None)
        await ctx.send(COORDINATOR, Note(text=report, data=data))


class Reviewer(LLMAgent):
    name = "reviewer"
    tags = (TEAM_TAG,)
    role = "reviewer"
    retention = RETENTION
    system_prompt = (
        "You are the team's reviewer. Check every claim of the report against the fact recorded "
        "from its cited source (archival_search). For each claim that does not hold, write one "
        "line '- correction [source id] subject=<subject> effect=<effect>: <the source's statement>'."
    )
    tool_names = ("archival_search",)
    core_blocks = (DIGEST,)

    async def respond(self, note: Note, ctx: Context) -> None:
        day = note.data["day"]
        result = await self.converse(ctx, f"Review the report of day {day}.\n\n{note.text}")
        await ctx.send("writer", Note(text=result.text, data=_data(note, stage="review", report=note.text)))


def _only(papers: list[Paper], refs: set[str]) -> list[Paper]:
    """The papers holding any of `refs`, each with only those findings."""
    out = []
    for paper in papers:
        findings = [f for f in paper.findings if f.id in refs]
        if findings:
            out.append(msgspec.structs.replace(paper, findings=findings))
    return out


AGENT_CLASSES = {"researcher": Researcher, "synthesiser": Synthesiser, "writer": Writer, "reviewer": Reviewer}


def target(name: str) -> str:
    """The `module:Class` of a team member, for the supervisor."""
    return f"{__name__}:{AGENT_CLASSES[name].__name__}"
