"""Opening sealed private records (bus.privacy) in a batch before the views fold it.

The fold is pure and synchronous; keys come from the key store over the bus. So between decoding
and folding, `Opener.open(batch)` (async) loads the keys the batch's sealed records need (one
direct get per key, then cached) and rewrites those rows: `kind` becomes the hidden kind and
`payload` the hidden payload's JSON, so every view folds them as if they had never been sealed.

A record whose key is gone (forgotten) or never existed stays `kind = 'sealed'` (no view but
`events` takes it) with a stub payload naming what it hides and whose key it needs, not the
ciphertext: exactly what the fold of the forget event leaves in `events` for the records it
opened before (projections.views._forget), so a rebuild after a forget equals the live views.

A batch holding a forget event drops the forgotten keys first: a record sealed under the old key
that comes after the forget (an agent still running with it in memory) stays unopened, as in a
rebuild, where the key no longer exists at all.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
import pyarrow as pa
import pyarrow.compute as pc

from bus.errors import PermissionDenied
from bus.privacy.sealing import CannotOpen, KeyEntry, agent_of_key, open_payload
from projections.batch import Batch
from schemas.payloads.privacy import Sealed

if TYPE_CHECKING:
    from bus.privacy.keyring import Keyring

log = logging.getLogger("continuum.projections.opening")

SEALED = "sealed"
FORGOTTEN = "privacy.forgotten"
_sealed = msgspec.json.Decoder(Sealed)
_stub = msgspec.json.Encoder()
# Runs a function with its arguments on another thread: (function, *args) -> awaitable result.
Offload = Callable[..., Awaitable[Any]]


class _Stub(msgspec.Struct):
    """What a view keeps of a record it cannot open (field order: as DuckDB's json_object)."""

    kind: str
    of: str
    key: str


def stub(of: str, key: str) -> str:
    """The payload text kept for an unopenable sealed record."""
    return _stub.encode(_Stub(kind=SEALED, of=of, key=key)).decode()


class _Found(msgspec.Struct):
    """The sealed rows of a batch: their indices, envelope ids and sealed payloads (None: not a
    well-formed sealed payload), and the keys they need."""

    mask: Any
    rows: list[int]
    ids: list[str | None]
    sealed: list[Sealed | None]
    keys: set[str]


class Opener:
    """Opens the sealed records of batches with the keys `keys` holds or loads.

    The per-record work (parsing, decrypting: ~4 µs a record) runs where `offload` runs it (the
    runner's decode thread for large batches), never on the event loop; only the keys' reads
    are awaited there."""

    def __init__(self, keys: Keyring) -> None:
        self._keys = keys

    async def open(self, batch: Batch, offload: Offload | None = None) -> Batch:
        """`batch` with its sealed records opened where their keys exist (see the module
        docstring). Raises BusUnavailable (the key store did not answer: try again)."""
        if batch.has_kind(FORGOTTEN):
            self._drop_forgotten(batch)
        if not batch.has_kind(SEALED):
            return batch
        found = await offload(self.find, batch) if offload is not None else self.find(batch)
        if found is None:
            return batch
        entries: dict[str, KeyEntry | None] = {}
        for key in found.keys:
            try:
                entries[key] = await self._keys.load(key)
            except PermissionDenied:
                entries[key] = None
        if offload is not None:
            return await offload(self.apply, batch, found, entries)
        return self.apply(batch, found, entries)

    def find(self, batch: Batch) -> _Found | None:
        """The batch's sealed rows (None: none)."""
        table = batch.table
        mask = pc.fill_null(pc.equal(table.column("kind").combine_chunks(), SEALED), False)
        rows = pc.indices_nonzero(mask).to_pylist()
        if not rows:
            return None
        ids = table.column("id").take(rows).to_pylist()
        sealed: list[Sealed | None] = []
        for payload in table.column("payload").take(rows).to_pylist():
            try:
                sealed.append(_sealed.decode(payload) if payload is not None else None)
            except msgspec.DecodeError:
                sealed.append(None)  # not a well-formed sealed payload: kept as it is
        return _Found(mask=mask, rows=rows, ids=ids, sealed=sealed, keys={s.key for s in sealed if s is not None})

    def apply(self, batch: Batch, found: _Found, entries: dict[str, KeyEntry | None]) -> Batch:
        """`batch` with `found`'s rows opened with `entries` (a stub where a key is missing)."""
        table = batch.table
        originals = table.column("payload").take(found.rows).to_pylist()
        kinds: list[str] = []
        texts: list[str | None] = []
        for envelope_id, sealed, original in zip(found.ids, found.sealed, originals):
            kind, text = _opened(envelope_id, sealed, entries.get(sealed.key) if sealed is not None else None, original)
            kinds.append(kind)
            texts.append(text)
        kind_col = pc.replace_with_mask(table.column("kind").combine_chunks(), found.mask, pa.array(kinds, pa.string()))
        payload_col = pc.replace_with_mask(
            table.column("payload").combine_chunks(), found.mask, pa.array(texts, table.schema.field("payload").type)
        )
        table = table.set_column(table.schema.get_field_index("kind"), "kind", kind_col)
        table = table.set_column(table.schema.get_field_index("payload"), "payload", payload_col)
        new_kinds = None if batch.kinds is None else frozenset(batch.kinds - {SEALED} | set(kinds))
        return dataclasses.replace(batch, table=table, kinds=new_kinds)

    def _drop_forgotten(self, batch: Batch) -> None:
        table = batch.table
        mask = pc.fill_null(pc.equal(table.column("kind").combine_chunks(), FORGOTTEN), False)
        for payload in table.column("payload").combine_chunks().filter(mask).to_pylist():
            try:
                key = msgspec.json.decode(payload or "{}").get("key")
            except msgspec.DecodeError:
                continue
            if isinstance(key, str) and agent_of_key(key) is not None:
                self._keys.drop(key)


def _opened(envelope_id: str | None, sealed: Sealed | None, entry: KeyEntry | None, original: str | None) -> tuple[str, str | None]:
    """(kind, payload text) of one sealed row: opened, the stub, or (not a sealed payload) as it was."""
    if sealed is None or envelope_id is None:
        return SEALED, original
    if entry is not None:
        try:
            return sealed.of, open_payload(envelope_id, sealed, entry).decode()
        except (CannotOpen, UnicodeDecodeError):
            pass
    return SEALED, stub(sealed.of, sealed.key)
