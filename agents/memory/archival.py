"""Archival memory: typed facts with sources, a text index over them, and contradictions.

Facts are never deleted. A fact is *active* until a later event supersedes or retracts it,
naming the rule and the actor; a contradiction keeps both claims and stays open until one of
its facts is superseded or retracted with its `contradiction_id`.

Ids are content-derived: the same agent recording the same statement about the same subject
from the same source gets the same `fact_id`, so a retried or duplicated insert is one fact,
never two (the hash-dedup race of other memory stores cannot happen: the id *is* the dedup key,
and the fold ignores a second copy).

Search is plain text: words of the query against words of subject, value and statement, each
word weighted by its rarity (idf), newest first among equals.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import re
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from typing import Literal

import msgspec

from agents.memory.anomaly import Anomaly
from agents.memory.errors import ContradictionExists, FactExists, FactNotFound, FactStateError
from schemas.payloads.memory import (
    Citation,
    Claim,
    ContradictionFlagged,
    FactRecorded,
    FactRetracted,
    FactSuperseded,
)

FactEvent = FactRecorded | FactSuperseded | FactRetracted | ContradictionFlagged
FactStatus = Literal["active", "superseded", "retracted"]

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    {"a", "an", "the", "of", "in", "on", "at", "to", "and", "or", "is", "are", "was", "by", "for", "with"}
)


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP}


def _short_id(prefix: str, *parts: str) -> str:
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()
    return f"{prefix}{digest[:12]}"


def fact_id_for(recorded_by: str, subject: str, statement: str, source_ref: str) -> str:
    """The content-derived id of a fact: 'f' + 12 hex digits."""
    return _short_id("f", recorded_by, subject, statement, source_ref)


def contradiction_id_for(fact_a: str, fact_b: str, rule: str) -> str:
    """The id of a contradiction between two facts under `rule` (order of the pair ignored)."""
    low, high = sorted((fact_a, fact_b))
    return _short_id("c", low, high, rule)


def subject_matches(subject: str, wanted: str) -> bool:
    """True if `subject` is `wanted` or a qualified form of it ("wanted@qualifier")."""
    return subject == wanted or subject.startswith(wanted + "@")


class FactState:
    """A fact and what happened to it since."""

    __slots__ = (
        "fact", "status", "ended_by", "ended_rule", "ended_actor",
        "recorded_seq", "ended_seq", "contradictions", "order",
    )

    def __init__(self, fact: FactRecorded, seq: int, order: int) -> None:
        self.fact = fact
        self.status: FactStatus = "active"
        self.ended_by: str | None = None  # the superseding fact id
        self.ended_rule: str | None = None
        self.ended_actor: str | None = None
        self.recorded_seq = seq
        self.ended_seq: int | None = None
        self.contradictions: list[str] = []
        self.order = order

    @property
    def fact_id(self) -> str:
        return self.fact.fact_id

    def claim(self) -> Claim:
        """The fact as a claim snapshot for a contradiction record."""
        f = self.fact
        return Claim(
            fact_id=f.fact_id,
            subject=f.subject,
            statement=f.statement,
            source=f.source.ref,
            recorded_by=f.recorded_by,
            value=f.value,
            confidence=f.confidence,
        )


class ContradictionState:
    """A flagged contradiction and whether it was resolved (by which event's fact)."""

    __slots__ = ("event", "resolved_by")

    def __init__(self, event: ContradictionFlagged) -> None:
        self.event = event
        self.resolved_by: str | None = None

    @property
    def open(self) -> bool:
        return self.resolved_by is None


class FactStats(msgspec.Struct, frozen=True, kw_only=True):
    total: int
    active: int
    superseded: int
    retracted: int
    contradictions: int
    open_contradictions: int


class FactIndex:
    """Every fact this agent has seen (recorded by anyone), searchable."""

    def __init__(self) -> None:
        self._facts: dict[str, FactState] = {}
        self._postings: dict[str, set[str]] = defaultdict(set)
        self._contradictions: dict[str, ContradictionState] = {}
        self._counts = {"active": 0, "superseded": 0, "retracted": 0}

    def __len__(self) -> int:
        return len(self._facts)

    def get(self, fact_id: str) -> FactState:
        """The fact `fact_id`. Raises FactNotFound."""
        state = self._facts.get(fact_id)
        if state is None:
            raise FactNotFound(f"no fact with id {fact_id!r}")
        return state

    def contradiction(self, contradiction_id: str) -> ContradictionState | None:
        return self._contradictions.get(contradiction_id)

    def contradictions(self, *, open_only: bool = True) -> list[ContradictionState]:
        """Flagged contradictions, oldest first."""
        return [c for c in self._contradictions.values() if c.open or not open_only]

    def stats(self) -> FactStats:
        open_count = sum(1 for c in self._contradictions.values() if c.open)
        return FactStats(
            total=len(self._facts),
            active=self._counts["active"],
            superseded=self._counts["superseded"],
            retracted=self._counts["retracted"],
            contradictions=len(self._contradictions),
            open_contradictions=open_count,
        )

    # -- deciding -----------------------------------------------------------------------------

    def record(
        self,
        *,
        subject: str,
        statement: str,
        source: Citation,
        confidence: float,
        recorded_by: str,
        category: str = "claim",
        value: str = "",
        valid_from: datetime | None = None,
        valid_to: datetime | None = None,
        tags: Iterable[str] = (),
    ) -> FactRecorded:
        """The event recording a new fact.

        Raises FactExists (same content already recorded; `.fact_id` names it) or ValueError
        (empty subject/statement/source, confidence outside 0..1, valid_to before valid_from).
        """
        subject, statement = subject.strip(), statement.strip()
        if not subject or not statement or not source.ref.strip():
            raise ValueError("a fact needs a subject, a statement and a source reference")
        if not 0.0 <= confidence <= 1.0:
            raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
        if valid_from is not None and valid_to is not None and valid_to < valid_from:
            raise ValueError("valid_to is before valid_from")
        fact_id = fact_id_for(recorded_by, subject, statement, source.ref)
        if fact_id in self._facts:
            raise FactExists(f"this fact is already recorded as {fact_id}", fact_id=fact_id)
        return FactRecorded(
            fact_id=fact_id,
            subject=subject,
            statement=statement,
            source=source,
            confidence=confidence,
            recorded_by=recorded_by,
            category=category,
            value=value.strip(),
            valid_from=valid_from,
            valid_to=valid_to,
            tags=list(tags),
        )

    def supersede(
        self,
        fact_id: str,
        *,
        by: str,
        rule: str,
        actor: str,
        reason: str = "",
        contradiction_id: str | None = None,
        valid_to: datetime | None = None,
    ) -> FactSuperseded:
        """The event superseding `fact_id` by `by`. Raises FactNotFound, FactStateError."""
        old, new = self.get(fact_id), self.get(by)
        if fact_id == by:
            raise FactStateError("a fact cannot supersede itself")
        if old.status != "active":
            raise FactStateError(f"fact {fact_id} is already {old.status}")
        if new.status != "active":
            raise FactStateError(f"fact {by} is {new.status}; only an active fact can supersede another")
        self._check_contradiction(contradiction_id, fact_id)
        return FactSuperseded(
            fact_id=fact_id,
            by=by,
            rule=rule,
            actor=actor,
            reason=reason,
            contradiction_id=contradiction_id,
            valid_to=valid_to,
        )

    def retract(
        self, fact_id: str, *, rule: str, actor: str, reason: str = "", contradiction_id: str | None = None
    ) -> FactRetracted:
        """The event retracting `fact_id`. Raises FactNotFound, FactStateError."""
        state = self.get(fact_id)
        if state.status != "active":
            raise FactStateError(f"fact {fact_id} is already {state.status}")
        self._check_contradiction(contradiction_id, fact_id)
        return FactRetracted(
            fact_id=fact_id, rule=rule, actor=actor, reason=reason, contradiction_id=contradiction_id
        )

    def flag(self, fact_a: str, fact_b: str, *, rule: str, actor: str, note: str = "") -> ContradictionFlagged:
        """The event flagging that two facts contradict each other.

        Raises FactNotFound, FactStateError (same fact twice), ContradictionExists.
        """
        a, b = self.get(fact_a), self.get(fact_b)
        if fact_a == fact_b:
            raise FactStateError("a fact cannot contradict itself")
        contradiction_id = contradiction_id_for(fact_a, fact_b, rule)
        if contradiction_id in self._contradictions:
            raise ContradictionExists(
                f"already flagged as {contradiction_id}", contradiction_id=contradiction_id
            )
        return ContradictionFlagged(
            contradiction_id=contradiction_id,
            claim_a=a.claim(),
            claim_b=b.claim(),
            rule=rule,
            actor=actor,
            note=note,
        )

    def _check_contradiction(self, contradiction_id: str | None, fact_id: str) -> None:
        if contradiction_id is None:
            return
        state = self._contradictions.get(contradiction_id)
        if state is None:
            raise FactNotFound(f"no contradiction with id {contradiction_id!r}")
        if fact_id not in (state.event.claim_a.fact_id, state.event.claim_b.fact_id):
            raise FactStateError(f"fact {fact_id} is not part of contradiction {contradiction_id}")

    # -- folding ------------------------------------------------------------------------------

    def apply(self, event: FactEvent, seq: int = 0) -> Anomaly | None:
        """Fold one archival event. Never raises; returns an Anomaly for an unknown fact or an
        impossible change (the event is then kept out of the state)."""
        kind = type(event).__struct_config__.tag
        match event:
            case FactRecorded(fact_id=fact_id):
                if fact_id in self._facts:
                    return None  # the same fact again: idempotent
                state = FactState(event, seq, len(self._facts))
                self._facts[fact_id] = state
                self._counts["active"] += 1
                for word in _words(f"{event.subject} {event.value} {event.statement}") | _subject_words(event.subject):
                    self._postings[word].add(fact_id)
                return None
            case FactSuperseded(fact_id=fact_id) | FactRetracted(fact_id=fact_id):
                state = self._facts.get(fact_id)
                if state is None:
                    return Anomaly(kind="unknown_fact", event_kind=kind, detail=f"fact {fact_id!r}", seq=seq)
                if state.status != "active":
                    return Anomaly(
                        kind="fact_state", event_kind=kind, detail=f"fact {fact_id} is already {state.status}", seq=seq
                    )
                new_status: FactStatus = "superseded" if isinstance(event, FactSuperseded) else "retracted"
                self._counts["active"] -= 1
                self._counts[new_status] += 1
                state.status = new_status
                state.ended_by = event.by if isinstance(event, FactSuperseded) else None
                state.ended_rule = event.rule
                state.ended_actor = event.actor
                state.ended_seq = seq
                if event.contradiction_id and event.contradiction_id in self._contradictions:
                    contradiction = self._contradictions[event.contradiction_id]
                    if contradiction.open:
                        contradiction.resolved_by = fact_id
                return None
            case ContradictionFlagged(contradiction_id=cid):
                if cid in self._contradictions:
                    return None
                self._contradictions[cid] = ContradictionState(event)
                missing = [c.fact_id for c in (event.claim_a, event.claim_b) if c.fact_id not in self._facts]
                for claim in (event.claim_a, event.claim_b):
                    if claim.fact_id in self._facts:
                        self._facts[claim.fact_id].contradictions.append(cid)
                if missing:
                    # Kept (both claims are in the event itself), but the facts are not known here.
                    return Anomaly(kind="unknown_fact", event_kind=kind, detail=f"facts {missing}", seq=seq)
                return None
        return None

    # -- searching ----------------------------------------------------------------------------

    def search(
        self,
        query: str = "",
        *,
        subject: str | None = None,
        category: str | None = None,
        include_inactive: bool = False,
        limit: int = 10,
    ) -> list[FactState]:
        """Facts best matching `query`, filtered by subject (exact or qualified "subject@..."),
        category and status; newest first among equal scores. An empty query lists newest first."""
        words = _words(query)
        total = len(self._facts) or 1
        scores: dict[str, float] = defaultdict(float)
        if words:
            for word in words:
                posting = self._postings.get(word)
                if not posting:
                    continue
                idf = math.log(1.0 + total / len(posting))
                for fact_id in posting:
                    scores[fact_id] += idf
            candidates: Iterable[str] = scores.keys()
        elif subject is not None:
            candidates = self._postings.get(_subject_key(subject), ())
        else:
            candidates = self._facts.keys()
        facts = self._facts

        def ranked() -> Iterable[tuple[float, int, FactState]]:
            for fact_id in candidates:
                state = facts[fact_id]
                if subject is not None and not subject_matches(state.fact.subject, subject):
                    continue
                if category is not None and state.fact.category != category:
                    continue
                if not include_inactive and state.status != "active":
                    continue
                yield scores.get(fact_id, 0.0), state.order, state

        return [hit[2] for hit in heapq.nlargest(max(0, limit), ranked(), key=lambda h: (h[0], h[1]))]


def _subject_key(subject: str) -> str:
    # A pseudo-word that indexes each fact under its unqualified subject, for subject filters.
    return "\x00subject:" + subject.split("@", 1)[0]


def _subject_words(subject: str) -> set[str]:
    return {_subject_key(subject)}
