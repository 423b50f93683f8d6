"""Archival facts: content ids that make duplicates impossible, history that is never deleted,
contradictions kept as data, and text search."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from agents.memory import (
    AgentMemory,
    ContradictionExists,
    FactExists,
    FactNotFound,
    FactStateError,
    fact_id_for,
)
from schemas.payloads.memory import Citation, FactRetracted, FactSuperseded


def _fact(memory: AgentMemory, subject: str, statement: str, ref: str, value: str = "", **kw):
    event = memory.facts.record(
        subject=subject, statement=statement, source=Citation(ref=ref), confidence=0.7, recorded_by="reader",
        value=value, **kw,
    )
    memory.apply(event)
    return event


def test_same_fact_twice_is_one_fact() -> None:
    """The id derives from recorder, subject, statement and source: recording the same fact
    again raises FactExists naming it, and a duplicated event folds to one fact."""
    memory = AgentMemory("reader")
    event = _fact(memory, "fec:retention", "FEC helps.", "p01.f1", "increases")
    assert event.fact_id == fact_id_for("reader", "fec:retention", "FEC helps.", "p01.f1")
    with pytest.raises(FactExists) as info:
        memory.facts.record(subject="fec:retention", statement="FEC helps.", source=Citation(ref="p01.f1"),
                            confidence=0.9, recorded_by="reader")
    assert info.value.fact_id == event.fact_id
    memory.apply(event)
    assert len(memory.facts) == 1 and not memory.anomalies


def test_invalid_facts_are_refused() -> None:
    """Empty fields, confidence outside 0..1 and an inverted validity interval are ValueErrors."""
    memory = AgentMemory("reader")
    with pytest.raises(ValueError):
        memory.facts.record(subject=" ", statement="x", source=Citation(ref="s"), confidence=0.5, recorded_by="r")
    with pytest.raises(ValueError, match="confidence"):
        memory.facts.record(subject="s", statement="x", source=Citation(ref="s"), confidence=1.5, recorded_by="r")
    with pytest.raises(ValueError, match="valid_to"):
        memory.facts.record(
            subject="s", statement="x", source=Citation(ref="s"), confidence=0.5, recorded_by="r",
            valid_from=datetime(2026, 3, 2, tzinfo=timezone.utc), valid_to=datetime(2026, 3, 1, tzinfo=timezone.utc),
        )


def test_superseded_and_retracted_facts_stay_in_history() -> None:
    """Superseding or retracting changes a fact's status (with rule and actor), never removes it:
    default search hides it, include_inactive shows it, and the counts say so."""
    memory = AgentMemory("critic")
    old = _fact(memory, "fec:retention", "FEC helps retention.", "p01.f1", "increases")
    new = _fact(memory, "fec:retention", "FEC does not change retention.", "p17.f1", "no-effect")
    wrong = _fact(memory, "vc:efficiency", "VC helps efficiency.", "p12.f1", "increases")
    superseded = memory.facts.supersede(old.fact_id, by=new.fact_id, rule="newer-controlled-study", actor="critic")
    assert isinstance(superseded, FactSuperseded)
    memory.apply(superseded)
    retracted = memory.facts.retract(wrong.fact_id, rule="source-withdrawn", actor="lead", reason="erratum")
    assert isinstance(retracted, FactRetracted)
    memory.apply(retracted)

    assert [s.fact_id for s in memory.facts.search("retention")] == [new.fact_id]
    everything = {s.fact_id: s for s in memory.facts.search("retention efficiency", include_inactive=True)}
    assert everything[old.fact_id].status == "superseded" and everything[old.fact_id].ended_by == new.fact_id
    assert everything[old.fact_id].ended_rule == "newer-controlled-study"
    assert everything[wrong.fact_id].status == "retracted" and everything[wrong.fact_id].ended_actor == "lead"
    stats = memory.facts.stats()
    assert (stats.total, stats.active, stats.superseded, stats.retracted) == (3, 1, 1, 1)
    with pytest.raises(FactStateError, match="already superseded"):
        memory.facts.retract(old.fact_id, rule="r", actor="critic")


def test_contradiction_keeps_both_claims_until_resolved() -> None:
    """Flagging records both claims as they stood, with rule and actor; flagging the pair again
    is refused; superseding one fact naming the contradiction resolves it."""
    memory = AgentMemory("critic")
    a = _fact(memory, "fec:retention", "FEC helps.", "p01.f1", "increases")
    b = _fact(memory, "fec:retention", "FEC does nothing.", "p17.f1", "no-effect")
    flagged = memory.facts.flag(a.fact_id, b.fact_id, rule="same-subject-different-effect", actor="critic")
    claim_a = flagged.claim_a
    assert (claim_a.statement, claim_a.value, claim_a.source) == ("FEC helps.", "increases", "p01.f1")
    assert (flagged.claim_b.statement, flagged.claim_b.value) == ("FEC does nothing.", "no-effect")
    memory.apply(flagged)
    with pytest.raises(ContradictionExists):
        memory.facts.flag(b.fact_id, a.fact_id, rule="same-subject-different-effect", actor="critic")
    assert memory.facts.stats().open_contradictions == 1
    memory.apply(memory.facts.supersede(a.fact_id, by=b.fact_id, rule="r", actor="lead",
                                        contradiction_id=flagged.contradiction_id))
    state = memory.facts.contradiction(flagged.contradiction_id)
    assert state is not None and not state.open and state.resolved_by == a.fact_id
    assert memory.facts.stats().open_contradictions == 0


def test_decisions_on_unknown_or_unrelated_facts_are_refused() -> None:
    """Unknown ids are FactNotFound; a fact cannot supersede itself or contradict itself; a
    contradiction id must involve the fact it resolves."""
    memory = AgentMemory("critic")
    a = _fact(memory, "s", "A.", "r1", "up")
    b = _fact(memory, "s", "B.", "r2", "down")
    c = _fact(memory, "t", "C.", "r3")
    with pytest.raises(FactNotFound):
        memory.facts.supersede("f000000000000", by=a.fact_id, rule="r", actor="x")
    with pytest.raises(FactStateError):
        memory.facts.supersede(a.fact_id, by=a.fact_id, rule="r", actor="x")
    with pytest.raises(FactStateError):
        memory.facts.flag(a.fact_id, a.fact_id, rule="r", actor="x")
    flagged = memory.facts.flag(a.fact_id, b.fact_id, rule="r", actor="x")
    memory.apply(flagged)
    with pytest.raises(FactStateError, match="not part of"):
        memory.facts.retract(c.fact_id, rule="r", actor="x", contradiction_id=flagged.contradiction_id)


def test_fold_reports_changes_to_unknown_or_ended_facts() -> None:
    """Events about unknown facts or facts no longer active are anomalies and change nothing."""
    memory = AgentMemory("critic")
    a = _fact(memory, "s", "A.", "r1")
    memory.apply(FactRetracted(fact_id="f-missing", rule="r", actor="x"))
    memory.apply(FactRetracted(fact_id=a.fact_id, rule="r", actor="x"))
    memory.apply(FactRetracted(fact_id=a.fact_id, rule="r2", actor="y"))
    assert [x.kind for x in memory.anomalies] == ["unknown_fact", "fact_state"]
    assert memory.facts.get(a.fact_id).ended_rule == "r"


def test_search_ranks_rare_words_first_and_filters() -> None:
    """A rare query word outranks a common one; subject filters include '@'-qualified subjects;
    category filters apply; an empty query lists newest first."""
    memory = AgentMemory("reader")
    for i in range(5):
        _fact(memory, f"common:{i}", f"sodium electrolyte study {i}", f"d{i}")
    rare = _fact(memory, "fec:retention", "sodium fluoroethylene additive", "p01.f1", category="finding")
    qualified = _fact(memory, "fec:retention@45C", "hot cells", "p31.f1", category="finding")
    _fact(memory, "fecx:other", "unrelated", "x1", category="method")
    assert memory.facts.search("sodium fluoroethylene")[0].fact_id == rare.fact_id
    assert {s.fact_id for s in memory.facts.search(subject="fec:retention")} == {rare.fact_id, qualified.fact_id}
    assert [s.fact_id for s in memory.facts.search(subject="fec:retention@45C")] == [qualified.fact_id]
    assert {s.fact.category for s in memory.facts.search(category="method")} == {"method"}
    assert memory.facts.search(limit=2)[0].fact.subject == "fecx:other"
    assert memory.facts.search("nothingmatches") == []
