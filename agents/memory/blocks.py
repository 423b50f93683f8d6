"""Core memory: labelled blocks, always in the agent's context, each with a size limit.

Two halves, as in any event-sourced aggregate:

- *decide* (`create`, `append`, `replace`, `rethink`, `attach`, `detach`): check a write
  against the current state and return the event to record, or raise (limit, unknown label,
  read-only, ambiguous edit). Nothing changes until the event is applied.
- *fold* (`apply`): change the state from an event read back from the log. It never raises:
  a stale write (a version that is not current + 1, with a different value) is refused and
  reported as an `Anomaly`, so two concurrent writers can never silently lose an update.

Every write event carries the full new value and version, so applying one event is enough to
know the block's value at that version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import msgspec

from agents.memory.anomaly import Anomaly
from agents.memory.errors import (
    BlockEditError,
    BlockExists,
    BlockLimitExceeded,
    BlockNotFound,
    BlockReadOnly,
)
from schemas.payloads.memory import (
    BlockAppended,
    BlockAttached,
    BlockCreated,
    BlockDetached,
    BlockReplaced,
    BlockSet,
)

BlockEvent = BlockCreated | BlockSet | BlockAppended | BlockReplaced | BlockAttached | BlockDetached

# Hard cap on any block's limit: a block is pinned in every call, so it is a cost multiplier.
MAX_BLOCK_LIMIT = 20_000


class Block(msgspec.Struct, frozen=True, kw_only=True):
    """A block as it stands."""

    block_id: str
    label: str
    value: str
    limit: int
    description: str
    holders: tuple[str, ...]
    read_only: bool
    version: int
    updated_by: str

    @property
    def shared(self) -> bool:
        return len(self.holders) > 1


def _fingerprint(value: str) -> str:
    return hashlib.blake2b(value.encode(), digest_size=12).hexdigest()


class BlockStore:
    """The blocks an agent knows, and the ones it holds (shown in its context)."""

    def __init__(self, agent: str) -> None:
        self.agent = agent
        self._blocks: dict[str, Block] = {}
        # block_id -> {version: fingerprint of the value at that version}: tells a redelivered
        # duplicate (same version, same value) from a conflicting stale write.
        self._history: dict[str, dict[int, str]] = {}

    # -- reading ------------------------------------------------------------------------------

    def held(self) -> list[Block]:
        """Blocks this agent holds, in creation order (stable, so the prompt prefix caches)."""
        return [b for b in self._blocks.values() if self.agent in b.holders]

    def __iter__(self) -> Iterator[Block]:
        return iter(self.held())

    def __len__(self) -> int:
        return len(self.held())

    def get(self, label: str) -> Block:
        """The held block labelled `label`. Raises BlockNotFound."""
        for block in self._blocks.values():
            if block.label == label and self.agent in block.holders:
                return block
        labels = ", ".join(sorted(b.label for b in self.held())) or "none"
        raise BlockNotFound(f"no core memory block labelled {label!r} (blocks: {labels})")

    def by_id(self, block_id: str) -> Block | None:
        """Any known block by id (held or not)."""
        return self._blocks.get(block_id)

    def versions(self) -> dict[str, int]:
        """{label: version} of the held blocks."""
        return {b.label: b.version for b in self.held()}

    # -- deciding -----------------------------------------------------------------------------

    def create(
        self,
        label: str,
        *,
        limit: int,
        actor: str,
        value: str = "",
        description: str = "",
        holders: list[str] | None = None,
        block_id: str | None = None,
        read_only: bool = False,
    ) -> BlockCreated:
        """The event creating a block (held by `holders`, default this agent).

        Raises BlockExists (label held already, or id taken), BlockLimitExceeded, ValueError for
        a limit outside 1..MAX_BLOCK_LIMIT.
        """
        if not 1 <= limit <= MAX_BLOCK_LIMIT:
            raise ValueError(f"block limit must be 1..{MAX_BLOCK_LIMIT} characters, got {limit}")
        holders = list(holders) if holders is not None else [self.agent]
        block_id = block_id or f"{self.agent}/{label}"
        if block_id in self._blocks:
            raise BlockExists(f"block id {block_id!r} already exists")
        if self.agent in holders and any(b.label == label for b in self.held()):
            raise BlockExists(f"a block labelled {label!r} is already held")
        _check_limit(label, value, limit)
        return BlockCreated(
            block_id=block_id,
            label=label,
            limit=limit,
            actor=actor,
            value=value,
            description=description,
            holders=holders,
            read_only=read_only,
        )

    def append(self, label: str, text: str, *, actor: str) -> BlockAppended:
        """The event appending `text` on a new line. Raises BlockNotFound, BlockReadOnly,
        BlockLimitExceeded."""
        block = self._writable(label)
        value = f"{block.value}\n{text}" if block.value else text
        _check_limit(label, value, block.limit)
        return BlockAppended(block_id=block.block_id, text=text, value=value, version=block.version + 1, actor=actor)

    def replace(self, label: str, old: str, new: str, *, actor: str) -> BlockReplaced:
        """The event replacing the single occurrence of `old` by `new`.

        Raises BlockNotFound, BlockReadOnly, BlockEditError (old empty, absent or repeated),
        BlockLimitExceeded.
        """
        block = self._writable(label)
        if not old:
            raise BlockEditError("the text to replace is empty; use core_memory_append to add text")
        count = block.value.count(old)
        if count == 0:
            raise BlockEditError(f"the text to replace does not occur in block {label!r}; copy it exactly")
        if count > 1:
            raise BlockEditError(
                f"the text to replace occurs {count} times in block {label!r}; include more of it to make it unique"
            )
        value = block.value.replace(old, new, 1)
        _check_limit(label, value, block.limit)
        return BlockReplaced(
            block_id=block.block_id, old=old, new=new, value=value, version=block.version + 1, actor=actor
        )

    def rethink(self, label: str, value: str, *, actor: str, reason: str = "") -> BlockSet:
        """The event rewriting the whole block. Raises BlockNotFound, BlockReadOnly,
        BlockLimitExceeded."""
        block = self._writable(label)
        _check_limit(label, value, block.limit)
        return BlockSet(block_id=block.block_id, value=value, version=block.version + 1, actor=actor, reason=reason)

    def attach(self, block_id: str, agent: str, *, actor: str) -> BlockAttached:
        """The event making `agent` a holder. Raises BlockNotFound for an unknown id."""
        if block_id not in self._blocks:
            raise BlockNotFound(f"no block with id {block_id!r}")
        return BlockAttached(block_id=block_id, agent=agent, actor=actor)

    def detach(self, block_id: str, agent: str, *, actor: str) -> BlockDetached:
        """The event removing `agent` from the holders. Raises BlockNotFound."""
        if block_id not in self._blocks:
            raise BlockNotFound(f"no block with id {block_id!r}")
        return BlockDetached(block_id=block_id, agent=agent, actor=actor)

    def _writable(self, label: str) -> Block:
        block = self.get(label)
        if block.read_only:
            raise BlockReadOnly(f"block {label!r} is read-only")
        return block

    # -- folding ------------------------------------------------------------------------------

    def apply(self, event: BlockEvent, seq: int = 0) -> Anomaly | None:
        """Fold one block event. Returns an Anomaly when it was refused or applied with a caveat."""
        kind = type(event).__struct_config__.tag
        match event:
            case BlockCreated():
                return self._apply_created(event, kind, seq)
            case BlockAttached(block_id=block_id, agent=agent) | BlockDetached(block_id=block_id, agent=agent):
                block = self._blocks.get(block_id)
                if block is None:
                    return Anomaly(kind="unknown_block", event_kind=kind, detail=f"block {block_id!r}", seq=seq)
                holders = [h for h in block.holders if h != agent]
                if isinstance(event, BlockAttached):
                    if agent == self.agent and any(b.label == block.label for b in self.held()):
                        return Anomaly(kind="label_taken", event_kind=kind, detail=f"label {block.label!r}", seq=seq)
                    holders.append(agent)
                self._blocks[block_id] = msgspec.structs.replace(block, holders=tuple(holders))
                return None
            case BlockSet() | BlockAppended() | BlockReplaced():
                return self._apply_write(event, kind, seq)
        return None

    def _apply_created(self, event: BlockCreated, kind: str, seq: int) -> Anomaly | None:
        existing = self._blocks.get(event.block_id)
        if existing is not None:
            if self._history[event.block_id].get(1) == _fingerprint(event.value) and existing.label == event.label:
                return None  # redelivered duplicate
            return Anomaly(kind="conflicting_create", event_kind=kind, detail=f"block {event.block_id!r}", seq=seq)
        if len(event.value) > event.limit:
            return Anomaly(
                kind="over_limit",
                event_kind=kind,
                detail=f"block {event.label!r}: {len(event.value)} > {event.limit} chars",
                seq=seq,
            )
        if self.agent in event.holders and any(b.label == event.label for b in self.held()):
            return Anomaly(kind="label_taken", event_kind=kind, detail=f"label {event.label!r}", seq=seq)
        self._blocks[event.block_id] = Block(
            block_id=event.block_id,
            label=event.label,
            value=event.value,
            limit=event.limit,
            description=event.description,
            holders=tuple(event.holders),
            read_only=event.read_only,
            version=event.version,
            updated_by=event.actor,
        )
        self._history[event.block_id] = {event.version: _fingerprint(event.value)}
        return None

    def _apply_write(self, event: BlockSet | BlockAppended | BlockReplaced, kind: str, seq: int) -> Anomaly | None:
        block = self._blocks.get(event.block_id)
        if block is None:
            return Anomaly(kind="unknown_block", event_kind=kind, detail=f"block {event.block_id!r}", seq=seq)
        history = self._history[event.block_id]
        fingerprint = _fingerprint(event.value)
        if event.version <= block.version:
            if history.get(event.version) == fingerprint:
                return None  # redelivered duplicate
            return Anomaly(
                kind="stale_write",
                event_kind=kind,
                detail=(
                    f"block {block.label!r}: write by {event.actor} at version {event.version} "
                    f"conflicts with version {block.version}; not applied"
                ),
                seq=seq,
            )
        if len(event.value) > block.limit:
            return Anomaly(
                kind="over_limit",
                event_kind=kind,
                detail=f"block {block.label!r}: {len(event.value)} > {block.limit} chars; not applied",
                seq=seq,
            )
        anomaly = None
        if event.version != block.version + 1:
            anomaly = Anomaly(
                kind="version_gap",
                event_kind=kind,
                detail=f"block {block.label!r}: version {block.version} -> {event.version}",
                seq=seq,
            )
        self._blocks[event.block_id] = msgspec.structs.replace(
            block, value=event.value, version=event.version, updated_by=event.actor
        )
        history[event.version] = fingerprint
        return anomaly


def _check_limit(label: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise BlockLimitExceeded(
            f"block {label!r} would hold {len(value)} characters; its limit is {limit}. "
            "Condense it with core_memory_rethink, or move detail to archival memory.",
            label=label,
            limit=limit,
            size=len(value),
        )
