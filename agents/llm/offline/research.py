"""The research team, played offline: rules for the researcher, synthesiser, writer and reviewer
roles (and the reader, critic and lead of the smaller in-process team).

Each rule reads the request the way a model would (papers rendered by
`agents.research.corpus.render_papers` in the task, fact lines rendered by
`agents.memory.render.render_fact` in tool results) and moves one step through its loop:

reader (tools: archival_insert, core_memory_append)
    1. one archival_insert per key finding (subject, effect as value, finding id as source)
    2. a progress line in its "notes" block, when it has one and it fits
    3. a closing summary
critic (tools: archival_search, flag_contradiction, send_message)
    1. one archival_search per subject in the task's findings (unqualified: refinements show too)
    2. flag_contradiction for each pair of active facts on the same subject whose values
       differ, one of them from today's papers (rule "same-subject-different-effect")
    3. send_message of the review to the agent named by "Report to: <name>", if any
    4. a closing summary (the review)
lead (tools: core_memory_rethink, broadcast)
    1. core_memory_rethink of its "digest" block with the review it was sent
    2. broadcast a one-line notice to "Team tag: <tag>", if any
    3. a closing summary

researcher: the reader's rules.
synthesiser (tools: archival_search, flag_contradiction, core_memory_rethink)
    1-2. the critic's search and flags
    3. core_memory_rethink of its "digest" block (shared with the writer and reviewer) with the
       synthesis, when it has one
    4. a closing synthesis: contradictions and refinements, one line each
writer (tools: core_memory_append)
    1. a line in its "log" block, when it has one and it fits
    2. the report: one claim line per finding in the task ("- subject: effect. statement [ref]"),
       then the synthesis lines; or, given corrections, the report with the corrected claims.
       On day 2 its first draft reverses one finding's direction (a realistic slip), so the
       reviewer's correction loop shows in the demo
reviewer (tools: archival_search)
    1. one archival_search per subject claimed in the report
    2. the review: every claim checked against the fact recorded from its cited source (same
       effect, same statement); one "- correction [ref] ..." line per claim that does not hold

Role names are configurable; a request from any other role is left to the next policy.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from agents.llm.offline.view import Decision, RequestView, ToolCall
from agents.memory.render import FactLine, parse_fact_lines
from agents.research.corpus import parse_findings

CONTRADICTION_RULE = "same-subject-different-effect"
# The day whose first draft the offline writer gets wrong (one direction reversed); see _writer.
SLIP_DAY = "2"
_REVERSED = {"increases": "decreases", "decreases": "increases"}
NOTE_LABELS = ("notes", "progress", "log")
DIGEST_LABEL = "digest"
READER_CONFIDENCE = 0.7


class ResearchPolicy:
    """Rules for the research team's roles."""

    def __init__(
        self,
        *,
        reader_roles: Iterable[str] = ("reader", "researcher"),
        critic_roles: Iterable[str] = ("critic",),
        lead_roles: Iterable[str] = ("lead", "editor"),
        synthesiser_roles: Iterable[str] = ("synthesiser", "synthesizer"),
        writer_roles: Iterable[str] = ("writer",),
        reviewer_roles: Iterable[str] = ("reviewer",),
    ) -> None:
        self.reader_roles = frozenset(reader_roles)
        self.critic_roles = frozenset(critic_roles)
        self.lead_roles = frozenset(lead_roles)
        self.synthesiser_roles = frozenset(synthesiser_roles)
        self.writer_roles = frozenset(writer_roles)
        self.reviewer_roles = frozenset(reviewer_roles)

    def decide(self, view: RequestView) -> Decision | None:
        role = view.role
        if role in self.reader_roles:
            return _reader(view)
        if role in self.critic_roles:
            return _critic(view)
        if role in self.lead_roles:
            return _lead(view)
        if role in self.synthesiser_roles:
            return _synthesiser(view)
        if role in self.writer_roles:
            return _writer(view)
        if role in self.reviewer_roles:
            return _reviewer(view)
        return None


# -- reader ---------------------------------------------------------------------------------------


def _reader(view: RequestView) -> Decision | None:
    findings = parse_findings(view.task_text)
    if not findings:
        return None
    papers = sorted({f.paper_id for f in findings})
    called = view.names_called
    if "archival_insert" not in called and "archival_insert" in view.tools:
        calls = [
            ToolCall(
                "archival_insert",
                {
                    "subject": f.subject,
                    "statement": f.statement,
                    "source": f.finding_id,
                    "source_title": f.title,
                    "value": f.effect,
                    "category": "finding",
                    "confidence": READER_CONFIDENCE,
                },
            )
            for f in findings
        ]
        return Decision(text=f"Recording {len(findings)} findings from {len(papers)} papers.", calls=calls)
    inserted = [r for _, r in view.called("archival_insert") if r is not None]
    new = sum(1 for r in inserted if not r.is_error and r.content.startswith("recorded fact"))
    known = sum(1 for r in inserted if not r.is_error and r.content.startswith("already recorded"))
    failed = sum(1 for r in inserted if r.is_error)
    summary = f"read {_span(papers)}: {new} new findings, {known} already known"
    if failed:
        summary += f", {failed} failed"
    label = next((label for label in NOTE_LABELS if label in view.blocks), None)
    if "core_memory_append" not in called and "core_memory_append" in view.tools and label is not None:
        block = view.blocks[label]
        if block.chars + len(summary) + 1 <= block.limit:
            return Decision(calls=[ToolCall("core_memory_append", {"label": label, "text": summary})])
    return Decision(text=f"Done: {summary}.")


# -- critic ---------------------------------------------------------------------------------------


def _critic(view: RequestView) -> Decision | None:
    findings = parse_findings(view.task_text)
    if not findings:
        return None
    checked = _check_against_memory(view, findings)
    if isinstance(checked, Decision):
        return checked
    facts, pairs = checked
    report = _review(findings, pairs, facts)
    to = view.directive("Report to")
    if "send_message" not in view.names_called and "send_message" in view.tools and to:
        return Decision(calls=[ToolCall("send_message", {"to": to, "text": report})])
    return Decision(text=report)


def _check_against_memory(
    view: RequestView, findings: list
) -> Decision | tuple[dict[str, FactLine], list[tuple[FactLine, FactLine]]]:
    """Search archival memory for the findings' subjects, then flag each contradiction with an
    earlier fact (one tool round each); once both are done, the facts seen and the pairs."""
    called = view.names_called
    subjects = list(dict.fromkeys(f.subject for f in findings))
    # Search the unqualified subject: it also returns the "@qualified" forms, so refinements show.
    bases = list(dict.fromkeys(s.split("@", 1)[0] for s in subjects))
    if "archival_search" not in called and "archival_search" in view.tools:
        calls = [ToolCall("archival_search", {"subject": s, "limit": 50}) for s in bases]
        return Decision(text=f"Checking {len(bases)} subjects against what we know.", calls=calls)
    facts = _facts_from(view.called("archival_search"))
    pairs = _conflicts(facts, subjects, {f.finding_id for f in findings})
    if "flag_contradiction" not in called and "flag_contradiction" in view.tools and pairs:
        calls = [
            ToolCall(
                "flag_contradiction",
                {
                    "fact_a": old.fact_id,
                    "fact_b": new.fact_id,
                    "rule": CONTRADICTION_RULE,
                    "note": f"{old.source} reports {old.value}; {new.source} reports {new.value} on {new.subject}",
                },
            )
            for old, new in pairs
        ]
        return Decision(calls=calls)
    return facts, pairs


def _facts_from(searches: list) -> dict[str, FactLine]:
    facts: dict[str, FactLine] = {}
    for _, result in searches:
        if result is not None and not result.is_error:
            for line in parse_fact_lines(result.content):
                facts.setdefault(line.fact_id, line)
    return facts


def _conflicts(facts: dict[str, FactLine], subjects: list[str], today: set[str]) -> list[tuple[FactLine, FactLine]]:
    """(earlier, today's) pairs of active facts on one exact subject with different values."""
    pairs: list[tuple[FactLine, FactLine]] = []
    active = [f for f in facts.values() if f.status.startswith("active") and f.value]
    for subject in subjects:
        on_subject = sorted((f for f in active if f.subject == subject), key=lambda f: f.source)
        new = [f for f in on_subject if f.source in today]
        old = [f for f in on_subject if f.source not in today]
        for n in new:
            pairs += [(o, n) for o in old if o.value != n.value]
        # Two of today's findings disagreeing with each other are a contradiction too.
        pairs += [(a, b) for i, a in enumerate(new) for b in new[i + 1 :] if a.value != b.value]
    return pairs


def _review(findings: list, pairs: list[tuple[FactLine, FactLine]], facts: dict[str, FactLine]) -> str:
    papers = sorted({f.paper_id for f in findings})
    lines = [f"Review of {_span(papers)}: {len(pairs)} contradictions with what we knew."]
    lines += [
        f"- contradiction on {new.subject}: {old.source} ({old.value}) vs {new.source} ({new.value})"
        for old, new in pairs
    ]
    base = {f.subject.split("@", 1)[0]: f for f in facts.values() if f.source not in {x.finding_id for x in findings}}
    refinements = [f for f in findings if "@" in f.subject and f.subject.split("@", 1)[0] in base]
    lines += [
        f"- refinement of {f.subject.split('@', 1)[0]}: {f.finding_id} ({f.effect} under {f.subject.split('@', 1)[1]})"
        for f in refinements
    ]
    return "\n".join(lines)


# -- synthesiser ----------------------------------------------------------------------------------


def _synthesiser(view: RequestView) -> Decision | None:
    findings = parse_findings(view.task_text)
    if not findings:
        return None
    checked = _check_against_memory(view, findings)
    if isinstance(checked, Decision):
        return checked
    facts, pairs = checked
    called = view.names_called
    synthesis = _review(findings, pairs, facts).replace("Review of", "Synthesis of", 1)
    block = view.blocks.get(DIGEST_LABEL)
    if "core_memory_rethink" not in called and "core_memory_rethink" in view.tools and block is not None:
        digest = _fit(synthesis, block.limit)
        return Decision(calls=[ToolCall("core_memory_rethink", {"label": DIGEST_LABEL, "value": digest,
                                                               "reason": "new findings integrated"})])
    return Decision(text=synthesis)


# -- writer ---------------------------------------------------------------------------------------

WRITER_LOG_LABEL = "log"
_DAY = re.compile(r"\bday (\d+)\b", re.IGNORECASE)
_CLAIM = re.compile(r"^- (?P<subject>\S+): (?P<effect>[\w-]+)\. (?P<statement>.+) \[(?P<ref>[^\]\s]+)\]$")
_CORRECTION = re.compile(
    r"^- correction \[(?P<ref>[^\]\s]+)\] subject=(?P<subject>\S+) effect=(?P<effect>[\w-]+): (?P<statement>.+)$"
)


def claim_line(subject: str, effect: str, statement: str, ref: str) -> str:
    """One claim of a report, in the form the reviewer checks."""
    return f"- {subject}: {effect}. {' '.join(statement.split())} [{ref}]"


def parse_claims(text: str) -> list[dict[str, str]]:
    """The claim lines of a report: subject, effect, statement, ref."""
    return [m.groupdict() for line in text.splitlines() if (m := _CLAIM.match(line.strip()))]


def parse_corrections(text: str) -> list[dict[str, str]]:
    """The correction lines of a review: ref, subject, effect, statement."""
    return [m.groupdict() for line in text.splitlines() if (m := _CORRECTION.match(line.strip()))]


def _writer(view: RequestView) -> Decision | None:
    task = view.task_text
    corrections = parse_corrections(task)
    if corrections:
        return Decision(text=_revise(task, corrections))
    findings = parse_findings(task)
    if not findings:
        return None
    day = _DAY.search(task)
    label = f"day {day.group(1)}" if day else "today"
    papers = sorted({f.paper_id for f in findings})
    note = f"{label}: reported {len(findings)} new findings from {len(papers)} papers"
    block = view.blocks.get(WRITER_LOG_LABEL)
    if ("core_memory_append" not in view.names_called and "core_memory_append" in view.tools
            and block is not None and block.chars + len(note) + 1 <= block.limit):
        return Decision(calls=[ToolCall("core_memory_append", {"label": WRITER_LOG_LABEL, "text": note})])
    lines = [f"Report for {label}: {len(findings)} new findings from {_span(papers)}", "", "New findings:"]
    claims = [claim_line(f.subject, f.effect, f.statement, f.finding_id) for f in findings]
    if day is not None and day.group(1) == SLIP_DAY:
        # The offline writer slips once, as a model does: on day 2 its first draft reports one
        # finding's direction reversed. The reviewer's check against the cited source catches
        # it, and the corrected report is what reaches the coordinator: the loop shows.
        slip = next((k for k, f in enumerate(findings) if f.effect in _REVERSED), None)
        if slip is not None:
            f = findings[slip]
            claims[slip] = claim_line(f.subject, _REVERSED[f.effect], f.statement, f.finding_id)
    lines += claims
    synthesis = [line.strip() for line in task.splitlines()
                 if line.strip().startswith(("- contradiction on", "- refinement of"))]
    contradictions = [line for line in synthesis if line.startswith("- contradiction")]
    refinements = [line for line in synthesis if line.startswith("- refinement")]
    lines += ["", f"Contradictions with earlier findings: {len(contradictions)}", *contradictions]
    if refinements:
        lines += ["", "Refinements:", *refinements]
    return Decision(text="\n".join(lines))


def _revise(task: str, corrections: list[dict[str, str]]) -> str:
    by_ref = {c["ref"]: c for c in corrections}
    report = task.split("Report:", 1)[-1].split("Corrections:", 1)[0].strip("\n")
    out = []
    for line in report.splitlines():
        m = _CLAIM.match(line.strip())
        fix = by_ref.get(m["ref"]) if m else None
        out.append(claim_line(fix["subject"], fix["effect"], fix["statement"], fix["ref"]) if fix else line)
    return "\n".join(out).strip()


# -- reviewer -------------------------------------------------------------------------------------


def _reviewer(view: RequestView) -> Decision | None:
    claims = parse_claims(view.task_text)
    if not claims:
        return None
    bases = list(dict.fromkeys(c["subject"].split("@", 1)[0] for c in claims))
    if "archival_search" not in view.names_called and "archival_search" in view.tools:
        calls = [ToolCall("archival_search", {"subject": s, "limit": 50, "include_inactive": True}) for s in bases]
        return Decision(text=f"Checking {len(claims)} claims against their sources.", calls=calls)
    by_source: dict[str, FactLine] = {}
    for fact in _facts_from(view.called("archival_search")).values():
        by_source.setdefault(fact.source, fact)
    problems = []
    for claim in claims:
        fact = by_source.get(claim["ref"])
        if fact is None:
            problems.append(f"- unsupported [{claim['ref']}]: no recorded fact cites this source")
        elif fact.value != claim["effect"] or " ".join(fact.statement.split()) != " ".join(claim["statement"].split()):
            problems.append(
                f"- correction [{claim['ref']}] subject={fact.subject} effect={fact.value}: {fact.statement}"
            )
    head = (f"Review: {len(claims)} claims checked against their cited sources; "
            f"{len(problems)} need correcting.")
    return Decision(text="\n".join([head, *problems]))


# -- lead -----------------------------------------------------------------------------------------


def _lead(view: RequestView) -> Decision | None:
    task = view.task_text.strip()
    if not task:
        return None
    called = view.names_called
    items = [line.strip() for line in task.splitlines() if line.strip().startswith("- ")]
    heading = next((line.strip() for line in task.splitlines() if line.strip()), "")
    heading = heading.removeprefix("[from ").split("] ", 1)[-1] if heading.startswith("[from ") else heading
    block = view.blocks.get(DIGEST_LABEL)
    if "core_memory_rethink" not in called and "core_memory_rethink" in view.tools and block is not None:
        digest = _fit("\n".join([f"Latest review: {heading}", *items]), block.limit)
        return Decision(calls=[ToolCall("core_memory_rethink", {"label": DIGEST_LABEL, "value": digest,
                                                               "reason": "new review received"})])
    contradictions = sum(1 for i in items if i.startswith("- contradiction"))
    tag = view.directive("Team tag")
    notice = f"Digest updated: {contradictions} new contradictions. {heading}"
    if "broadcast" not in called and "broadcast" in view.tools and tag:
        return Decision(calls=[ToolCall("broadcast", {"tag": tag, "text": notice})])
    return Decision(text=notice)


def _fit(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: max(0, limit - 1)] + "…"


def _span(papers: list[str]) -> str:
    if not papers:
        return "no papers"
    return papers[0] if len(papers) == 1 else f"{papers[0]}–{papers[-1]} ({len(papers)} papers)"
