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
from typing import TYPE_CHECKING

import msgspec
import pyarrow as pa
import pyarrow.compute as pc

from bus.errors import PermissionDenied
from bus.privacy.sealing import CannotOpen, agent_of_key, open_payload
from projections.batch import Batch
from schemas.payloads.privacy import Sealed

if TYPE_CHECKING:
    from bus.privacy.keyring import Keyring

log = logging.getLogger("continuum.projections.opening")

SEALED = "sealed"
FORGOTTEN = "privacy.forgotten"
_sealed = msgspec.json.Decoder(Sealed)
_stub = msgspec.json.Encoder()


class _Stub(msgspec.Struct):
    """What a view keeps of a record it cannot open (field order: as DuckDB's json_object)."""

    kind: str
    of: str
    key: str


def stub(of: str, key: str) -> str:
    """The payload text kept for an unopenable sealed record."""
    return _stub.encode(_Stub(kind=SEALED, of=of, key=key)).decode()


class Opener:
    """Opens the sealed records of batches with the keys `keys` holds or loads."""

    def __init__(self, keys: Keyring) -> None:
        self._keys = keys

    async def open(self, batch: Batch) -> Batch:
        """`batch` with its sealed records opened where their keys exist (see the module
        docstring). Raises BusUnavailable (the key store did not answer: try again)."""
        if batch.has_kind(FORGOTTEN):
            self._drop_forgotten(batch)
        if not batch.has_kind(SEALED):
            return batch
        table = batch.table
        mask = pc.fill_null(pc.equal(table.column("kind").combine_chunks(), SEALED), False)
        rows = pc.indices_nonzero(mask).to_pylist()
        if not rows:
            return batch
        ids = table.column("id").take(rows).to_pylist()
        payloads = table.column("payload").take(rows).to_pylist()
        kinds: list[str] = []
        texts: list[str] = []
        for envelope_id, payload in zip(ids, payloads):
            kind, text = await self._opened(envelope_id, payload)
            kinds.append(kind)
            texts.append(text)
        kind_col = pc.replace_with_mask(table.column("kind").combine_chunks(), mask, pa.array(kinds, pa.string()))
        payload_col = pc.replace_with_mask(
            table.column("payload").combine_chunks(), mask, pa.array(texts, table.schema.field("payload").type)
        )
        table = table.set_column(table.schema.get_field_index("kind"), "kind", kind_col)
        table = table.set_column(table.schema.get_field_index("payload"), "payload", payload_col)
        new_kinds = None if batch.kinds is None else frozenset(batch.kinds - {SEALED} | set(kinds))
        return dataclasses.replace(batch, table=table, kinds=new_kinds)

    async def _opened(self, envelope_id: str | None, payload: str | None) -> tuple[str, str]:
        """(kind, payload text) of one sealed row: opened, or the stub."""
        if payload is None or envelope_id is None:
            return SEALED, payload or ""
        try:
            sealed = _sealed.decode(payload)
        except msgspec.DecodeError:
            return SEALED, payload  # not a well-formed sealed payload: kept as it is
        try:
            entry = await self._keys.load(sealed.key)
        except PermissionDenied:
            entry = None
        if entry is not None:
            try:
                return sealed.of, open_payload(envelope_id, sealed, entry).decode()
            except (CannotOpen, UnicodeDecodeError):
                pass
        return SEALED, stub(sealed.of, sealed.key)

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
