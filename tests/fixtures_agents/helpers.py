"""Test helpers for reading the log back: envelopes on a subject filter, per-subject counts,
synthetic deliveries."""

from __future__ import annotations

import json
from typing import Any

from bus.client import Bus
from schemas import Delivery, Envelope, utcnow


async def read_log(bus: Bus, subject_filter: str) -> list[tuple[str, Envelope[Any]]]:
    """Every (subject, envelope) stored on `subject_filter`, in stream order (direct gets)."""
    out: list[tuple[str, Envelope[Any]]] = []
    seq = 1
    api = f"$JS.API.DIRECT.GET.{bus.subjects.stream}"
    while True:
        msg = await bus.transport.request(api, json.dumps({"seq": seq, "next_by_subj": subject_filter}).encode(), timeout_s=5)
        headers = msg.headers or {}
        if headers.get("Status"):
            return out
        out.append((headers["Nats-Subject"], await bus.open_record(msg.data)))  # private records opened (admin)
        seq = int(headers["Nats-Sequence"]) + 1


async def payloads(bus: Bus, subject_filter: str, kind: type | None = None) -> list[Any]:
    """The payloads stored on `subject_filter` (of type `kind` only, when given)."""
    found = [env.payload for _, env in await read_log(bus, subject_filter)]
    return [p for p in found if kind is None or isinstance(p, kind)]


async def subject_counts(bus: Bus, subject_filter: str) -> dict[str, int]:
    """How many messages each subject matching `subject_filter` holds."""
    info = await bus.js.stream_info(bus.subjects.stream, subjects_filter=subject_filter)
    return dict(info.state.subjects or {})


def delivery(attempt: int = 1, seq: int = 1) -> Delivery:
    """A delivery as the consumer engine would describe it (for driving a Context directly)."""
    return Delivery(
        stream="CONTINUUM_DEFAULT", consumer="test__inbox", subject="default.inbox.test.tester",
        stream_seq=seq, consumer_seq=seq, attempt=attempt, pending=0, published_at=utcnow(),
    )
