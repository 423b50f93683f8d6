"""Envelope ids: time-ordered, unique, and derived ids that are pure functions of their inputs."""

from __future__ import annotations

import uuid

from schemas.ids import derived_id, id_time_ms, new_id, stable_id


def test_new_ids_are_unique_sorted_uuid7() -> None:
    """Ids made in sequence sort in creation order, never repeat, and parse as UUIDv7."""
    ids = [new_id() for _ in range(20_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    parsed = uuid.UUID(ids[0])
    assert parsed.version == 7 and str(parsed) == ids[0]


def test_derived_id_is_deterministic_and_keeps_the_parent_time() -> None:
    """derived_id(parent, name) is the same on every call, differs per name, and sorts near its parent."""
    parent = new_id()
    assert derived_id(parent, "step-1") == derived_id(parent, "step-1")
    assert derived_id(parent, "step-1") != derived_id(parent, "step-2")
    assert id_time_ms(derived_id(parent, "x")) == id_time_ms(parent)


def test_stable_id_depends_only_on_its_parts() -> None:
    """stable_id gives one id per (parts), so records written by several writers dedup."""
    assert stable_id("S", 7, "dead") == stable_id("S", 7, "dead")
    assert stable_id("S", 7, "dead") != stable_id("S", 8, "dead")
