"""A NATS Object Store bucket on the bus's own transport, in the layout of ADR-20, so `nats object`
and every NATS client's object store read what is written here.

    store = await ObjectStore.open(transport, "CONTINUUM_ARCHIVE_DEFAULT", like=subjects.stream)
    info = await store.put("seg-….parquet", data, metadata={"continuum.chain_sha256": chain})
    info = await store.info("seg-….parquet")           # None: no such object (or deleted)
    async for chunk in store.chunks(info): ...          # digest and size checked at the end
    data = await store.read("seg-….parquet")           # the same, whole
    for info in await store.list(): ...
    await store.delete("seg-….parquet")
    await store.sweep(older_than_s=600)                  # chunks of puts killed before their metadata

Layout (ADR-20): stream `OBJ_<bucket>` (file storage, discard new, rollups allowed, direct gets),
chunks on `$O.<bucket>.C.<nuid>` (a new nuid per put), the object's metadata (JSON: name, size,
chunks, `digest` = `SHA-256=<base64url of the SHA-256 of its bytes>`, nuid, mtime, options) on
`$O.<bucket>.M.<base64url of the name>` with `Nats-Rollup: sub`, so only the newest is kept.

Writes follow the log's durability: every chunk is a JetStream publish answered by its ack (the
server stored it, and synced it when `sync_interval: always`), and the metadata is written last,
after every chunk's ack: a put killed at any point leaves the object absent (or as it was before)
and at most chunks no metadata names, never a visible half object. A put over an existing name
writes new chunks, then the metadata, then purges the old chunks.

Reads are direct gets (any replica answers), in batches, in stream order. Errors: ObjectCorrupt
(the bytes or the metadata are not what they say), ObjectNotFound, BusUnavailable,
PermissionDenied, ConfigurationError (the bucket's stream cannot be made).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import msgspec
import nats.errors
from nats.js import api as js_api
from nats.js.errors import APIError
from nats.nuid import NUID

from bus.errors import BusUnavailable, ObjectCorrupt, ObjectNotFound
from bus.puback import parse_puback
from bus.topology import READ_ATTEMPT_S, ensure_stream, like_log, patiently, placement
from bus.transport import StoredMessage, Transport, translate

# ADR-20's default chunk size: well under the server's message limit (1 MiB by default).
CHUNK_BYTES = 128 * 1024
DIGEST_PREFIX = "SHA-256="
# A chunk publish or a metadata write waits this long for its ack (a replicated write on a
# loaded cluster takes a few ms; an election longer, then the put fails and is tried again).
WRITE_TIMEOUT_S = 10.0
# Chunks asked for per direct get (1 MiB of 128 KiB chunks).
READ_BATCH = 8
# Metadata larger than this is not an object's (a hostile message on a meta subject).
MAX_META_BYTES = 64 * 1024
_ROLLUP = {"Nats-Rollup": "sub"}


class ObjectOptions(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    max_chunk_size: int = 0


class ObjectInfo(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An object's metadata as ADR-20 stores it (`nats object info` shows the same fields)."""

    name: str
    bucket: str
    nuid: str
    size: int = 0
    mtime: str = ""
    chunks: int = 0
    digest: str = ""
    deleted: bool = False
    description: str = ""
    metadata: dict[str, str] = {}
    options: ObjectOptions | None = None

    @property
    def sha256(self) -> bytes | None:
        """The SHA-256 the digest names (None when it names none, or not SHA-256)."""
        return parse_digest(self.digest)


_info_decoder = msgspec.json.Decoder(ObjectInfo)


def digest_of(sha256: bytes) -> str:
    """The ADR-20 digest text of a SHA-256: `SHA-256=<base64url>`."""
    return DIGEST_PREFIX + base64.urlsafe_b64encode(sha256).decode()


def parse_digest(digest: str) -> bytes | None:
    """The 32 bytes of an ADR-20 digest (url-safe or standard base64, as clients wrote it), or
    None when `digest` is not a SHA-256 digest."""
    if not digest.upper().startswith(DIGEST_PREFIX):
        return None
    text = digest[len(DIGEST_PREFIX):]
    try:
        raw = base64.urlsafe_b64decode(text.replace("+", "-").replace("/", "_"))
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 32 else None


def object_store_config(
    bucket: str, replicas: int = 1, placement_: js_api.Placement | None = None
) -> js_api.StreamConfig:
    """The bucket's stream, as ADR-20 lays it out (what `nats object add` makes)."""
    return js_api.StreamConfig(
        name=stream_of(bucket),
        description="Continuum object store",
        subjects=[f"$O.{bucket}.C.>", f"$O.{bucket}.M.>"],
        retention=js_api.RetentionPolicy.LIMITS,
        storage=js_api.StorageType.FILE,
        discard=js_api.DiscardPolicy.NEW,
        num_replicas=replicas,
        placement=placement_,
        allow_rollup_hdrs=True,
        allow_direct=True,
        duplicate_window=120.0,
    )


def stream_of(bucket: str) -> str:
    return f"OBJ_{bucket}"


def meta_subject(bucket: str, name: str) -> str:
    """Where an object's metadata lives: its name in url-safe base64 (padded, as Go's and
    nats.py's clients write it)."""
    return f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"


def chunk_subject(bucket: str, nuid: str) -> str:
    return f"$O.{bucket}.C.{nuid}"


class ObjectStore:
    """One bucket (see the module docstring). Holds no connection of its own: it reads and
    writes through `transport`."""

    def __init__(self, transport: Transport, bucket: str) -> None:
        self._transport = transport
        self.bucket = bucket
        self.stream = stream_of(bucket)
        self._nuid = NUID()

    @classmethod
    async def open(cls, transport: Transport, bucket: str, *, like: str) -> ObjectStore:
        """The bucket, its stream made when missing with the replicas and placement of the live
        stream `like` (the log): an archive copy survives what the log survives. A live bucket
        is used as it is (`bus stream update` moves it with the log). Raises
        ConfigurationError, BusUnavailable, PermissionDenied."""
        info = await patiently(lambda: transport.js.stream_info(like), f"reading stream {like}", attempt_s=READ_ATTEMPT_S)
        settings = like_log(info)
        await transport.guarded("$JS.API.STREAM.", ensure_stream(
            transport.js, object_store_config(bucket, settings.replicas, placement(settings.placement_tags))
        ))
        return cls(transport, bucket)

    # -- writing ---------------------------------------------------------------------------------

    async def put(
        self, name: str, data: bytes, *, metadata: dict[str, str] | None = None, chunk_bytes: int = CHUNK_BYTES,
        description: str = "",
    ) -> ObjectInfo:
        """Store `data` as `name`: chunks, each acked, then the metadata (the module docstring).
        Returns the metadata written. Raises BusUnavailable (a write not acked: nothing of this
        put is visible, its chunks are purged when the server allows), PermissionDenied."""
        nuid = self._nuid.next().decode()
        chunks_at = chunk_subject(self.bucket, nuid)
        before = await self.info(name, trusted=False)
        digest = hashlib.sha256()
        count = 0
        try:
            for at in range(0, len(data), chunk_bytes):
                chunk = data[at:at + chunk_bytes]
                digest.update(chunk)
                await self._publish(chunks_at, chunk)
                count += 1
            info = ObjectInfo(
                name=name, bucket=self.bucket, nuid=nuid, size=len(data), chunks=count,
                mtime=datetime.now(UTC).isoformat().replace("+00:00", "Z"), digest=digest_of(digest.digest()),
                description=description, metadata=dict(metadata or {}), options=ObjectOptions(max_chunk_size=chunk_bytes),
            )
            await self._publish(meta_subject(self.bucket, name), msgspec.json.encode(info), headers=_ROLLUP)
        except BaseException:
            if count:
                try:
                    await self._purge(chunks_at)
                except BusUnavailable:
                    pass  # chunks no metadata names: invisible, swept later
            raise
        if before is not None and before.nuid and before.nuid != nuid:
            await self._purge(chunk_subject(self.bucket, before.nuid))
        return info

    async def delete(self, name: str) -> None:
        """Mark `name` deleted (its metadata says so, as ADR-20 does) and purge its chunks.
        Raises ObjectNotFound, BusUnavailable, PermissionDenied."""
        info = await self.info(name, trusted=False)
        if info is None:
            raise ObjectNotFound(f"{self.bucket}: no object {name}")
        gone = ObjectInfo(
            name=name, bucket=self.bucket, nuid=info.nuid, deleted=True,
            mtime=datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        )
        await self._publish(meta_subject(self.bucket, name), msgspec.json.encode(gone), headers=_ROLLUP)
        if info.nuid:
            await self._purge(chunk_subject(self.bucket, info.nuid))

    async def sweep(self, *, older_than_s: float) -> list[str]:
        """Purge the chunks no object's metadata names (a put killed before its metadata) whose
        newest chunk is older than `older_than_s` (so a put in progress elsewhere keeps its own).
        Returns the nuids purged. Raises ObjectCorrupt (a metadata message that is not an
        object's: what it names cannot be known, so nothing is purged), BusUnavailable."""
        named = {info.nuid for info in await self.list()}
        try:
            state = await patiently(
                lambda: self._transport.js.stream_info(self.stream, subjects_filter=f"$O.{self.bucket}.C.>"),
                f"reading stream {self.stream}",
            )
        except (APIError, nats.errors.Error, asyncio.TimeoutError) as exc:
            raise translate(exc, f"{self.bucket}: listing its chunks") from exc
        prefix = f"$O.{self.bucket}.C."
        cutoff_ns = int((datetime.now(UTC).timestamp() - older_than_s) * 1e9)
        purged: list[str] = []
        for subject in (state.state.subjects or {}):
            nuid = subject.removeprefix(prefix)
            if nuid in named:
                continue
            newest = await self._transport.direct_get_last(self.stream, subject)
            if newest is not None and newest.stored_ns <= cutoff_ns:
                await self._purge(subject)
                purged.append(nuid)
        return purged

    async def _publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> int:
        answer = await self._transport.request(subject, data, timeout_s=WRITE_TIMEOUT_S, headers=headers)
        return parse_puback(answer.data).seq

    async def _purge(self, subject: str) -> None:
        answer = await self._transport.request(
            f"$JS.API.STREAM.PURGE.{self.stream}", msgspec.json.encode({"filter": subject}), timeout_s=WRITE_TIMEOUT_S
        )
        reply = msgspec.json.decode(answer.data)
        if not isinstance(reply, dict) or not reply.get("success"):
            error = reply.get("error") if isinstance(reply, dict) else None
            why = (error or {}).get("description", reply)
            raise BusUnavailable(f"{self.bucket}: the purge of {subject} failed: {why}")

    # -- reading ---------------------------------------------------------------------------------

    async def info(self, name: str, *, trusted: bool = True) -> ObjectInfo | None:
        """The metadata of `name` (None: never put, or deleted). Raises ObjectCorrupt (metadata
        that is not an object's, or not this name's), BusUnavailable. `trusted=False` reads
        damaged metadata as absent (a put or delete replacing it)."""
        try:
            stored = await self._transport.direct_get_last(self.stream, meta_subject(self.bucket, name))
        except BusUnavailable as exc:
            raise BusUnavailable(f"{self.bucket}: cannot read the metadata of {name}: {exc}") from exc
        if stored is None:
            return None
        try:
            info = self._decode_meta(stored)
        except ObjectCorrupt:
            if trusted:
                raise
            return None
        if info.name != name:
            if trusted:
                raise ObjectCorrupt(f"{self.bucket}: the metadata stored for {name} names {info.name!r}")
            return None
        return None if info.deleted else info

    async def list(self) -> list[ObjectInfo]:
        """Every object's metadata (not the deleted), in the order last written. Raises
        ObjectCorrupt (a metadata message that is not an object's), BusUnavailable."""
        found: list[ObjectInfo] = []
        seq = 1
        while True:
            batch = await self._transport.direct_get_batch(
                self.stream, {"seq": seq, "next_by_subj": f"$O.{self.bucket}.M.>", "batch": 256}, limit=256
            )
            for stored in batch:
                info = self._decode_meta(stored)
                if not info.deleted:
                    found.append(info)
            if len(batch) < 256:
                return found
            seq = batch[-1].seq + 1

    async def chunks(self, info: ObjectInfo) -> AsyncIterator[bytes]:
        """The object's bytes, chunk by chunk in order. After the last one the digest and size are
        checked (and that no chunk follows): a caller must use what it read only once the
        iteration ended without an error. Raises ObjectCorrupt, BusUnavailable."""
        expected = info.sha256
        where = f"{self.bucket}: object {info.name}"
        if expected is None:
            raise ObjectCorrupt(f"{where}: its digest {info.digest!r} is not a SHA-256 digest")
        if info.size < 0 or info.chunks < 0 or (info.size > 0) != (info.chunks > 0):
            raise ObjectCorrupt(f"{where}: its metadata says {info.size} bytes in {info.chunks} chunks")
        subject = chunk_subject(self.bucket, info.nuid)
        digest = hashlib.sha256()
        size = read = 0
        seq = 1
        while read < info.chunks:
            want = min(READ_BATCH, info.chunks - read)
            batch = await self._transport.direct_get_batch(
                self.stream, {"seq": seq, "next_by_subj": subject, "batch": want}, limit=want
            )
            if not batch:
                raise ObjectCorrupt(f"{where}: {read} of its {info.chunks} chunks are stored (truncated)")
            for stored in batch:
                size += len(stored.data)
                if size > info.size:
                    raise ObjectCorrupt(f"{where}: its chunks hold more than the {info.size} bytes its metadata says")
                digest.update(stored.data)
                read += 1
                yield stored.data
            seq = batch[-1].seq + 1
        more = await self._transport.direct_get_batch(
            self.stream, {"seq": seq, "next_by_subj": subject, "batch": 1}, limit=1
        )
        if more:
            raise ObjectCorrupt(f"{where}: more chunks are stored than the {info.chunks} its metadata says")
        if size != info.size:
            raise ObjectCorrupt(f"{where}: its chunks hold {size} bytes, its metadata says {info.size}")
        if digest.digest() != expected:
            raise ObjectCorrupt(f"{where}: the digest of its bytes does not match its metadata's")

    async def read(self, name: str, *, max_bytes: int = 1 << 31) -> tuple[ObjectInfo, bytes]:
        """The object whole, checked (see `chunks`). Raises ObjectNotFound, ObjectCorrupt
        (also for an object over `max_bytes`), BusUnavailable."""
        info = await self.info(name)
        if info is None:
            raise ObjectNotFound(f"{self.bucket}: no object {name}")
        if info.size > max_bytes:
            raise ObjectCorrupt(f"{self.bucket}: object {name} says it holds {info.size} bytes, over {max_bytes}")
        parts = [chunk async for chunk in self.chunks(info)]
        return info, b"".join(parts)

    def _decode_meta(self, stored: StoredMessage) -> ObjectInfo:
        """Raises ObjectCorrupt for metadata that is not an object's of this bucket."""
        where = f"{self.bucket}: the metadata at seq {stored.seq} ({stored.subject})"
        if len(stored.data) > MAX_META_BYTES:
            raise ObjectCorrupt(f"{where} is {len(stored.data)} bytes, over {MAX_META_BYTES}")
        try:
            info = _info_decoder.decode(stored.data)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            raise ObjectCorrupt(f"{where} is not an object's: {str(exc)[:200]}") from exc
        if stored.subject and stored.subject != meta_subject(self.bucket, info.name):
            raise ObjectCorrupt(f"{where} names {info.name!r}, whose metadata lives elsewhere")
        if not info.deleted and ("." in info.nuid or "*" in info.nuid or ">" in info.nuid or not info.nuid):
            raise ObjectCorrupt(f"{where} has an unusable nuid {info.nuid!r}")
        return info
