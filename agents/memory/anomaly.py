"""What a fold could not apply, and why. A fold never raises on an event from the log: it
keeps the event out of working memory and reports an `Anomaly`, so a bad or stale event is
visible instead of crashing the agent or being silently merged."""

from __future__ import annotations

from typing import Literal

import msgspec

AnomalyKind = Literal[
    "stale_write",       # a block write based on an old version: the lost update it would cause is refused
    "version_gap",       # a block write skipped versions (events missing); applied, newest value wins
    "over_limit",        # a block value longer than the block's limit; not applied
    "unknown_block",     # a write to a block never created
    "label_taken",       # a second held block with the same label; not applied
    "conflicting_create",  # a block id created twice with different content
    "turn_gap",          # a conversation turn number skipped; applied
    "unknown_fact",      # a supersession/retraction/contradiction naming an unknown fact
    "fact_state",        # a change to a fact that is no longer active; recorded, status unchanged
]


class Anomaly(msgspec.Struct, frozen=True, kw_only=True):
    """One event a fold refused or applied with a caveat."""

    kind: AnomalyKind
    event_kind: str
    detail: str
    seq: int = 0
