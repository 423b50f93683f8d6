"""The bus's NATS Object Store client (bus.object_store): ADR-20's layout, so NATS's own object
store clients read what it writes and it reads theirs; chunked puts whose metadata comes last;
reads that check the digest and size; hostile objects refused with one clear error.

Real nats-server; nats-py's own object store client is the other side of the interoperability
checks (the `nats object` tooling reads the same layout).
"""

from __future__ import annotations

import hashlib
import os

import msgspec
import nats
import pytest

from bus import Bus
from bus.errors import ObjectCorrupt, ObjectNotFound
from bus.object_store import ObjectInfo, ObjectStore, chunk_subject, digest_of, meta_subject
from bus.server import EmbeddedServer

from conftest import seed_of

BUCKET = "CONTINUUM_ARCHIVE_TEST"


async def open_store(bus: Bus) -> ObjectStore:
    return await ObjectStore.open(bus.transport, BUCKET, like=bus.subjects.stream)


async def test_put_get_info_list_delete_round_trip_in_adr20_layout(bus: Bus) -> None:
    """A put of several chunks reads back byte for byte; its metadata says the size, the chunk
    count and `SHA-256=<base64url>` of its bytes; list shows it; a put over the name replaces it
    and purges the old chunks; delete hides it and purges its chunks; an empty object works."""
    store = await open_store(bus)
    data = os.urandom(3 * 128 * 1024 + 777)
    info = await store.put("seg-a.parquet", data, metadata={"k": "v"})
    assert (info.size, info.chunks) == (len(data), 4)
    assert info.digest == digest_of(hashlib.sha256(data).digest()) and info.digest.startswith("SHA-256=")
    got_info, got = await store.read("seg-a.parquet")
    assert got == data and got_info == info and got_info.metadata == {"k": "v"}
    assert [i.name for i in await store.list()] == ["seg-a.parquet"]
    stream = (await bus.js.stream_info(store.stream)).config
    assert stream.name == f"OBJ_{BUCKET}" and sorted(stream.subjects) == [f"$O.{BUCKET}.C.>", f"$O.{BUCKET}.M.>"]
    assert stream.allow_rollup_hdrs and stream.allow_direct

    replaced = await store.put("seg-a.parquet", b"short")
    assert (await store.read("seg-a.parquet"))[1] == b"short"
    old = await bus.transport.direct_get(store.stream, {"last_by_subj": chunk_subject(BUCKET, info.nuid)})
    assert old is None  # the replaced object's chunks were purged
    empty = await store.put("empty", b"")
    assert (await store.read("empty"))[1] == b"" and empty.chunks == 0
    await store.delete("seg-a.parquet")
    assert await store.info("seg-a.parquet") is None
    assert await bus.transport.direct_get(store.stream, {"last_by_subj": chunk_subject(BUCKET, replaced.nuid)}) is None
    with pytest.raises(ObjectNotFound):
        await store.read("seg-a.parquet")
    assert [i.name for i in await store.list()] == ["empty"]


async def test_nats_own_object_store_client_reads_ours_and_we_read_its(
    bus: Bus, nats_server: EmbeddedServer, admin_credentials: str
) -> None:
    """nats-py's object store (ADR-20, as `nats object get` reads) gets our object with its
    digest checked, and we read an object it put, digest and all."""
    store = await open_store(bus)
    data = os.urandom(300_000)
    await store.put("ours.parquet", data)
    nc = await nats.connect(nats_server.url, nkeys_seed_str=seed_of(admin_credentials))
    try:
        theirs = await nc.jetstream().object_store(BUCKET)
        result = await theirs.get("ours.parquet")
        assert result.data == data and result.info.size == len(data)
        await theirs.put("theirs.bin", data[:200_000])
    finally:
        await nc.close()
    assert (await store.read("theirs.bin"))[1] == data[:200_000]


async def test_hostile_objects_give_one_clear_error_and_lose_nothing(bus: Bus) -> None:
    """Metadata with a wrong digest, a wrong size, chunks missing (truncated), an extra chunk,
    or garbage on a metadata subject: reading raises ObjectCorrupt naming the bucket and the
    object; other objects still read."""
    store = await open_store(bus)
    data = os.urandom(200_000)
    good = await store.put("good", data)

    async def forge(name: str, info: ObjectInfo | bytes) -> None:
        raw = info if isinstance(info, bytes) else msgspec.json.encode(info)
        await bus.transport.request(meta_subject(BUCKET, name), raw, headers={"Nats-Rollup": "sub"})

    base = await store.put("victim", data)
    cases = {
        "wrong digest": msgspec.structs.replace(base, digest=digest_of(hashlib.sha256(b"x").digest())),
        "wrong size": msgspec.structs.replace(base, size=base.size - 1),
        "truncated": msgspec.structs.replace(base, chunks=base.chunks + 1, size=base.size + 10),
        "extra chunk": msgspec.structs.replace(base, chunks=base.chunks - 1, size=128 * 1024),
        "bad digest text": msgspec.structs.replace(base, digest="MD5=abc"),
    }
    for what, forged in cases.items():
        await forge("victim", forged)
        with pytest.raises(ObjectCorrupt) as caught:
            await store.read("victim")
        assert f"{BUCKET}: " in str(caught.value) and "\n" not in str(caught.value), what
    await forge("victim", b"{not json")
    with pytest.raises(ObjectCorrupt, match="is not an object's"):
        await store.info("victim")
    with pytest.raises(ObjectCorrupt):
        await store.list()
    assert (await store.read("good"))[1] == data and (await store.info("good")) == good
    # A put over garbage metadata replaces it.
    await store.put("victim", b"again")
    assert (await store.read("victim"))[1] == b"again"


async def test_sweep_purges_only_old_chunks_no_object_names(bus: Bus) -> None:
    """Chunks a put killed before its metadata left (no metadata names their nuid) are purged by
    a sweep once older than its age; an object's own chunks, and young orphans (a put in
    progress elsewhere), are kept."""
    store = await open_store(bus)
    kept = await store.put("kept", os.urandom(300_000))
    for chunk in (b"a" * 1000, b"b" * 1000):  # a put that died after two chunks
        await bus.transport.request(chunk_subject(BUCKET, "orphanNUID"), chunk)
    assert await store.sweep(older_than_s=3600) == []
    assert await bus.transport.direct_get(store.stream, {"last_by_subj": chunk_subject(BUCKET, "orphanNUID")})
    assert await store.sweep(older_than_s=0) == ["orphanNUID"]
    assert await bus.transport.direct_get(store.stream, {"last_by_subj": chunk_subject(BUCKET, "orphanNUID")}) is None
    assert (await store.read("kept"))[0] == kept
