"""The research corpus: shape, unique ids, and contradictions/refinements that are real and
consistently referenced (the ground truth the demo is checked against)."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest

from agents.research.corpus import CORPUS_DIR, CorpusError, load_corpus, parse_findings, render_paper, render_papers


def test_forty_papers_over_three_days_with_one_to_three_findings() -> None:
    """About 40 papers, each day 12-15, each with an id, title, authors, date, abstract and
    1-3 findings; every paper on a day carries that day's date."""
    corpus = load_corpus()
    assert len(corpus.papers) == 40
    for day in (1, 2, 3):
        papers = corpus.day(day)
        assert 12 <= len(papers) <= 15
        assert len({p.date for p in papers}) == 1
    dates = [corpus.day(d)[0].date for d in (1, 2, 3)]
    assert dates == sorted(dates) and len(set(dates)) == 3
    for paper in corpus.papers:
        assert paper.title and paper.authors and paper.venue and len(paper.abstract) > 150
        assert 1 <= len(paper.findings) <= 3
        assert all(f.id.startswith(paper.id + ".f") for f in paper.findings)


def test_ids_are_unique() -> None:
    """Paper ids and finding ids are unique across the corpus."""
    corpus = load_corpus()
    paper_ids = [p.id for p in corpus.papers]
    finding_ids = [f.id for p in corpus.papers for f in p.findings]
    assert len(set(paper_ids)) == len(paper_ids)
    assert len(set(finding_ids)) == len(finding_ids) == len(corpus.findings)


def test_contradictions_are_present_and_reference_earlier_findings() -> None:
    """Days 2 and 3 each contradict earlier findings (at least 3 each); every reference names an
    earlier day's finding on the same subject with a different effect."""
    corpus = load_corpus()
    pairs = corpus.contradictions()
    by_day = {d: [p for p in pairs if corpus.paper_of(p[0]).day == d] for d in (1, 2, 3)}
    assert not by_day[1] and len(by_day[2]) >= 3 and len(by_day[3]) >= 3
    for later, earlier in pairs:
        new, old = corpus.findings[later], corpus.findings[earlier]
        assert corpus.paper_of(earlier).day < corpus.paper_of(later).day
        assert new.subject == old.subject and new.effect != old.effect
    # A day-3 finding that contradicts a day-2 finding which contradicted day 1: a chain.
    assert any(corpus.paper_of(e).day == 2 and corpus.findings[e].contradicts for _, e in by_day[3])


def test_every_disagreement_in_the_corpus_is_declared() -> None:
    """Any two findings on one subject with different effects are declared as a contradiction
    (so the declared list is complete ground truth); agreeing findings are not."""
    corpus = load_corpus()
    declared = {frozenset(p) for p in corpus.contradictions()}
    findings = list(corpus.findings.values())
    disagreeing = {
        frozenset((a.id, b.id))
        for a, b in itertools.combinations(findings, 2)
        if a.subject == b.subject and a.effect != b.effect
    }
    assert disagreeing == declared
    assert any(a.subject == b.subject and a.effect == b.effect for a, b in itertools.combinations(findings, 2))


def test_refinements_narrow_an_earlier_subject() -> None:
    """Refinements exist; each names earlier findings whose subject it qualifies with '@'."""
    corpus = load_corpus()
    refinements = corpus.refinements()
    assert len(refinements) >= 4
    for later, earlier in refinements:
        assert corpus.findings[later].subject.startswith(corpus.findings[earlier].subject + "@")
        assert corpus.paper_of(earlier).day < corpus.paper_of(later).day


def test_rendered_papers_parse_back_without_the_ground_truth() -> None:
    """The text agents read holds every finding (id, subject, effect, statement) and parses back
    exactly, but never the contradicts/refines answers."""
    corpus = load_corpus()
    text = render_papers(corpus.papers)
    parsed = parse_findings(text)
    assert [(f.finding_id, f.subject, f.effect, f.statement) for f in parsed] == [
        (f.id, f.subject, f.effect, f.statement) for p in corpus.papers for f in p.findings
    ]
    assert "contradicts" not in text and "refines" not in text
    assert render_paper(corpus.papers[0]).startswith("### p01 — ")


def test_malformed_corpus_file_is_a_clear_error(tmp_path: Path) -> None:
    """A day file with a bad field fails to load with the file named; a missing file too."""
    for day in (1, 2, 3):
        shutil.copy(CORPUS_DIR / f"day{day}.json", tmp_path / f"day{day}.json")
    doc = json.loads((tmp_path / "day2.json").read_text())
    doc["papers"][0]["findings"][0]["effect"] = "sideways"
    (tmp_path / "day2.json").write_text(json.dumps(doc))
    with pytest.raises(CorpusError, match="day2.json"):
        load_corpus(tmp_path)
    (tmp_path / "day3.json").unlink()
    with pytest.raises(CorpusError, match="day"):
        load_corpus(tmp_path)
