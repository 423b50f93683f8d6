"""The key store of private records: one NATS KV bucket per namespace, read and written here.

    keys = Keyring(transport, subjects)
    entry = await keys.for_writing("agent.alice")   # the agent's key, made on its first private record
    entry = await keys.load("agent.alice")          # None: never made, or forgotten
    kids = await keys.erase("agent.alice")          # the admin's `bus forget`: the server erases it

The bucket is a JetStream stream (`KV_<bucket>`, subjects `$KV.<bucket>.<key>`, one value per
key, direct gets) replicated like the log. Reads are direct gets whose API subject names the key
(`$JS.API.DIRECT.GET.KV_<bucket>.$KV.<bucket>.agent.alice`), so the server's permissions can give
an agent its own key and nothing else; a key is made with `Nats-Expected-Last-Subject-Sequence`
(0, or the forget marker's sequence), so two writers making the same key at once agree on one.

Erasing asks the server to delete the key's message with erasure (`$JS.API.STREAM.MSG.DELETE`
without `no_erase`: nats-server overwrites the stored bytes), then leaves a marker (a KV purge
record, `KV-Operation: PURGE`) so readers know the key was forgotten rather than never made.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import msgspec
from nats.js import api as js_api

from bus.errors import BusUnavailable, ConcurrencyConflict, ConfigurationError
from bus.privacy.sealing import KeyEntry, new_key
from bus.subjects import Subjects

if TYPE_CHECKING:
    from bus.transport import Transport

log = logging.getLogger("continuum.privacy")

_OPERATION = "KV-Operation"
# A KV purge marker: the key existed and was removed (here: forgotten).
_PURGED = ("PURGE", "DEL")
_entry = msgspec.json.Decoder(KeyEntry)
_encoder = msgspec.json.Encoder()
# Rounds of erase-then-mark when a writer keeps making the key again in between.
_ERASE_ROUNDS = 5


class _PubAck(msgspec.Struct):
    seq: int = 0
    error: dict | None = None


def key_bucket_config(subjects: Subjects, replicas: int = 1, placement: js_api.Placement | None = None) -> js_api.StreamConfig:
    """The key store's stream, in NATS KV's layout (`nats kv` tools read it): one value per key,
    direct gets, purge markers allowed; message deletion allowed (the erase of a forget: only
    the admin's credential may ask for it)."""
    return js_api.StreamConfig(
        name=subjects.keys_stream,
        description="Continuum keys of private records",
        subjects=[f"$KV.{subjects.keys_bucket}.>"],
        retention=js_api.RetentionPolicy.LIMITS,
        storage=js_api.StorageType.FILE,
        max_msgs_per_subject=1,
        discard=js_api.DiscardPolicy.NEW,
        num_replicas=replicas,
        placement=placement,
        allow_direct=True,
        allow_rollup_hdrs=True,
        deny_delete=False,
        deny_purge=False,
        duplicate_window=120.0,
    )


class Keyring:
    """Keys of private records this process has read or made, cached (a key never changes:
    a forget erases it, and a key made later is another generation, `kid`)."""

    def __init__(self, transport: Transport, subjects: Subjects) -> None:
        self._transport = transport
        self._subjects = subjects
        self._cache: dict[str, KeyEntry] = {}

    def cached(self, key: str) -> KeyEntry | None:
        """The key this process holds for `key`, without I/O (None: not loaded)."""
        return self._cache.get(key)

    def drop(self, key: str) -> None:
        """Forget the cached key (after a forget: records sealed under it must stay unread)."""
        self._cache.pop(key, None)

    async def load(self, key: str) -> KeyEntry | None:
        """The key's current generation, or None (never made, or forgotten). Raises
        PermissionDenied (another agent's key), BusUnavailable."""
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        entry, _ = await self._read(key)
        if entry is not None:
            self._cache[key] = entry
        return entry

    async def for_writing(self, key: str) -> KeyEntry:
        """The key to seal new records with: the current generation, or a new one made now.
        Raises PermissionDenied, BusUnavailable, ConfigurationError (no key store)."""
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        for _ in range(_ERASE_ROUNDS):
            entry, last_seq = await self._read(key)
            if entry is not None:
                self._cache[key] = entry
                return entry
            made = new_key()
            try:
                await self._put(key, _encoder.encode(made), expected_last_seq=last_seq)
            except ConcurrencyConflict:
                continue  # another writer made it first: read theirs
            self._cache[key] = made
            return made
        raise BusUnavailable(f"the key {key} keeps changing while it is made; try again")

    async def erase(self, key: str) -> list[str]:
        """Erase every generation of `key` from the key store (the server overwrites the stored
        bytes) and leave a forget marker. Returns the generations erased (empty: it had none).
        Admin only. Raises PermissionDenied, BusUnavailable."""
        self._cache.pop(key, None)
        erased: list[str] = []
        for _ in range(_ERASE_ROUNDS):
            stored = await self._transport.direct_get_last(self._subjects.keys_stream, self._subjects.key_subject(key))
            if stored is not None and stored.headers.get(_OPERATION) not in _PURGED:
                try:
                    erased.append(_entry.decode(stored.data).kid)
                except msgspec.ValidationError:
                    erased.append("?")
                await self._erase_message(stored.seq)
            elif stored is not None:
                await self._erase_message(stored.seq)  # an older marker: replaced below
            try:
                await self._put(key, b"", expected_last_seq=0, headers={_OPERATION: "PURGE"})
            except ConcurrencyConflict:
                continue  # a writer made the key again in between: erase that one too
            return erased
        raise BusUnavailable(f"the key {key} keeps being made again while it is erased; stop its writer and retry")

    async def _read(self, key: str) -> tuple[KeyEntry | None, int]:
        """(the key's generation or None, the sequence of what is stored on it: 0 for nothing)."""
        try:
            stored = await self._transport.direct_get_last(self._subjects.keys_stream, self._subjects.key_subject(key))
        except BusUnavailable as exc:
            if "no responders" in str(exc).lower():
                raise ConfigurationError(
                    f"the key store {self._subjects.keys_bucket} does not exist (an admin's `bus` command creates it)"
                ) from exc
            raise
        if stored is None:
            return None, 0
        if stored.headers.get(_OPERATION) in _PURGED or not stored.data:
            return None, stored.seq
        try:
            return _entry.decode(stored.data), stored.seq
        except msgspec.ValidationError as exc:
            raise ConfigurationError(f"the key store holds something that is not a key under {key}: {exc}") from exc

    async def _put(self, key: str, data: bytes, *, expected_last_seq: int, headers: dict[str, str] | None = None) -> int:
        subject = self._subjects.key_subject(key)
        answer = await self._transport.request(
            subject, data, timeout_s=5.0,
            headers={"Nats-Expected-Last-Subject-Sequence": str(expected_last_seq), **(headers or {})},
        )
        ack = msgspec.json.decode(answer.data, type=_PubAck)
        if ack.error:
            if ack.error.get("err_code") == 10071:  # wrong last sequence
                raise ConcurrencyConflict(f"{key} changed meanwhile", expected=expected_last_seq, actual=None)
            raise BusUnavailable(f"the key store refused {key}: {ack.error.get('description', ack.error)}")
        return ack.seq

    async def _erase_message(self, seq: int) -> None:
        stream = self._subjects.keys_stream
        answer = await self._transport.request(
            f"$JS.API.STREAM.MSG.DELETE.{stream}", _encoder.encode({"seq": seq}), timeout_s=5.0
        )
        reply = msgspec.json.decode(answer.data)
        if not reply.get("success"):
            error = reply.get("error") or {}
            if error.get("err_code") == 10057:  # no message at that sequence: gone already
                return
            raise BusUnavailable(f"the key store did not erase seq {seq}: {error.get('description', reply)}")
