"""Forgetting a data subject: erase its key, then record the act as an event.

    result = await forget_agent(bus, "alice", why="GDPR request #42", actor="cli")

The unit is an agent's private memory (bus.privacy.sealing.PRIVATE_KINDS under key
`agent.<name>`): once its key is erased, every record sealed under it is ciphertext no one can
open, in the stream store, its replicas, the archive's Parquet files and any copy of them; the
log's structure (sequences, subjects, ids, correlation, the integrity chains) is untouched.

The erase comes first, then the `privacy.forgotten` event (id derived from the key and the
generations erased, so a retried forget records it once); the projection service folds that
event by deleting the opened rows it holds for that agent (projections.views._forget), and
then rewrites its file (projections.compact) so freed blocks keep none of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from bus.config import check_name
from bus.privacy.sealing import key_id
from schemas import stable_id, utcnow
from schemas.payloads.privacy import Forgotten

if TYPE_CHECKING:
    from bus.client import Bus

UNITS = ("agent",)


class ForgetResult(msgspec.Struct, frozen=True, kw_only=True):
    """What one forget did: the key, the generations erased (empty: there was none, e.g. a
    forget run again), and the sequence of the event that records it."""

    unit: str
    subject: str
    key: str
    kids: list[str]
    seq: int


async def forget_agent(bus: Bus, agent: str, *, why: str, actor: str) -> ForgetResult:
    """Erase `agent`'s key of private records and record a `privacy.forgotten` event on the
    agent's event subject. Raises ConfigurationError (no reason given, a bad name),
    PermissionDenied (only the admin may erase keys), BusUnavailable."""
    from bus.errors import ConfigurationError

    check_name(agent, "agent name")
    if not why.strip():
        raise ConfigurationError("a forget needs a reason (--why): it is recorded with the act")
    key = key_id(agent)
    kids = await bus.keys.erase(key)
    event = Forgotten(unit="agent", subject=agent, key=key, why=why, actor=actor, at=utcnow(), kids=kids)
    # A retry of the same forget (nothing erased the second time) is a new act only if it erased
    # something; one that erased nothing records again under its own id (it is still asked for).
    event_id = stable_id("privacy.forgotten", bus.subjects.ns, key, *kids) if kids else None
    fields = {"id": event_id} if event_id else {}
    sent = await bus.record(agent, event, sender=actor, **fields)
    return ForgetResult(unit="agent", subject=agent, key=key, kids=kids, seq=sent.ack.seq)
