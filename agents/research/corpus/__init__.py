"""The research demo's corpus: 40 invented paper abstracts on sodium-ion battery electrolytes,
published over three days (day1.json, day2.json, day3.json).

Each paper has 1-3 key findings. A finding names a `subject` (a normalised key such as
"fec:capacity-retention"; "@qualifier" narrows the conditions) and an `effect` on it
(increases, decreases, no-effect). Later findings may contradict earlier ones (same subject,
different effect: `contradicts`) or refine them (a qualified subject: `refines`). These two
lists are ground truth for checking the agents; `render_paper` never shows them.

    corpus = load_corpus()
    prompt = render_papers(corpus.day(2))
    parse_findings(prompt)   # what a reader of that prompt can extract
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Literal

import msgspec

CORPUS_DIR = Path(__file__).resolve().parent
DAYS = (1, 2, 3)

Effect = Literal["increases", "decreases", "no-effect"]


class CorpusError(ValueError):
    """A corpus file is missing or malformed; the message names the file and the problem."""


class Finding(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: str
    subject: str
    effect: Effect
    statement: str
    contradicts: list[str] = []
    refines: list[str] = []


class Paper(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: str
    day: int
    date: str
    title: str
    authors: list[str]
    venue: str
    abstract: str
    findings: list[Finding]


class DayFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    day: int
    date: str
    field: str
    papers: list[Paper]


class Corpus(msgspec.Struct, frozen=True, kw_only=True, dict=True):
    """All papers, in day order."""

    field: str
    papers: list[Paper]

    def day(self, day: int) -> list[Paper]:
        """The papers published on `day` (1, 2 or 3)."""
        return [p for p in self.papers if p.day == day]

    @cached_property
    def findings(self) -> dict[str, Finding]:
        """Every finding by id."""
        return {f.id: f for p in self.papers for f in p.findings}

    def paper_of(self, finding_id: str) -> Paper:
        """The paper holding a finding. Raises KeyError."""
        return next(p for p in self.papers if any(f.id == finding_id for f in p.findings))

    def contradictions(self) -> list[tuple[str, str]]:
        """(later finding, earlier finding it contradicts), in corpus order."""
        return [(f.id, other) for p in self.papers for f in p.findings for other in f.contradicts]

    def refinements(self) -> list[tuple[str, str]]:
        """(later finding, earlier finding it refines), in corpus order."""
        return [(f.id, other) for p in self.papers for f in p.findings for other in f.refines]


def load_corpus(directory: Path = CORPUS_DIR) -> Corpus:
    """Load day1..day3.json from `directory`. Raises CorpusError."""
    papers: list[Paper] = []
    field = ""
    for day in DAYS:
        path = directory / f"day{day}.json"
        try:
            doc = msgspec.json.decode(path.read_bytes(), type=DayFile)
        except OSError as exc:
            raise CorpusError(f"cannot read {path}: {exc}") from exc
        except msgspec.DecodeError as exc:
            raise CorpusError(f"{path} is not a valid corpus day file: {exc}") from exc
        if doc.day != day or any(p.day != day for p in doc.papers):
            raise CorpusError(f"{path}: every paper must be from day {day}")
        field = field or doc.field
        papers.extend(doc.papers)
    return Corpus(field=field, papers=papers)


# -- the text the agents read ---------------------------------------------------------------------


def render_paper(paper: Paper) -> str:
    """A paper as the agents read it: header, abstract, and one line per key finding."""
    lines = [
        f"### {paper.id} — {paper.title}",
        f"Authors: {', '.join(paper.authors)}. {paper.venue}, {paper.date}.",
        f"Abstract: {paper.abstract}",
        "Key findings:",
    ]
    lines += [f"- {f.id} | subject: {f.subject} | effect: {f.effect} | {f.statement}" for f in paper.findings]
    return "\n".join(lines)


def render_papers(papers: Iterable[Paper]) -> str:
    """Several papers separated by blank lines."""
    return "\n\n".join(render_paper(p) for p in papers)


class RenderedFinding(msgspec.Struct, frozen=True, kw_only=True):
    """A finding as read back from rendered text."""

    paper_id: str
    title: str
    finding_id: str
    subject: str
    effect: str
    statement: str


_PAPER = re.compile(r"^### (?P<id>\S+) — (?P<title>.+)$")
_FINDING = re.compile(r"^- (?P<id>\S+) \| subject: (?P<subject>\S+) \| effect: (?P<effect>\S+) \| (?P<statement>.+)$")


def parse_findings(text: str) -> list[RenderedFinding]:
    """Every finding line in `text` produced by `render_paper`, with its paper."""
    out: list[RenderedFinding] = []
    paper_id = title = ""
    for line in text.splitlines():
        line = line.strip()
        if m := _PAPER.match(line):
            paper_id, title = m["id"], m["title"]
        elif (m := _FINDING.match(line)) and paper_id:
            out.append(
                RenderedFinding(
                    paper_id=paper_id,
                    title=title,
                    finding_id=m["id"],
                    subject=m["subject"],
                    effect=m["effect"],
                    statement=m["statement"],
                )
            )
    return out
