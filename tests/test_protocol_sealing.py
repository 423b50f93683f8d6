"""schemas/PROTOCOL.md §11 (sealed private records) followed by an agent that imports nothing of
Continuum: raw nats-py with its own agent credential, `cryptography` for AES-GCM. It makes its
key in the key store, seals a recall turn, and the projection service opens and folds it; and
the page is exact for the Python runtime too: the raw agent opens a turn its Python Bus sealed.
Real nats-server with authorization on, real projection service."""

from __future__ import annotations

import base64
import json
import os
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import nkeys
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bus import Bus, BusConfig
from bus.identity import CredentialRegistry, Role
from bus.server import EmbeddedServer, reload_config
from conftest import seed_of
from projections.config import ProjectionSettings
from projections.service import ProjectionService
from schemas.payloads import TurnRecorded
from test_protocol_conformance import NAME, NS, now, uuid7

BUCKET = f"CONTINUUM_KEYS_{NS.upper()}"
KEY_ID = f"agent.{NAME}"


@pytest.fixture
async def service(bus: Bus, tmp_path: Path) -> AsyncIterator[ProjectionService]:
    async with ProjectionService(bus, ProjectionSettings(db_path=str(tmp_path / "views.duckdb"))) as svc:
        yield svc


@pytest.fixture
async def poly_credentials(nats_server: EmbeddedServer, identity: CredentialRegistry) -> str:
    """poly's own agent credential, loaded by the server."""
    issued = identity.issue(NAME, Role.AGENT, namespace=NS)
    assert nats_server.pid is not None
    await reload_config(nats_server.pid, nats_server.settings.monitor_url)
    return str(issued.path)


# -- the agent's side, from §11 -----------------------------------------------------------------


async def connect_as(url: str, seed: str) -> Any:
    """A plain nats-py connection; replies come to `_INBOX.<public key>` (§10)."""
    public = nkeys.from_seed(bytearray(seed.encode())).public_key.decode()
    return await nats.connect(url, nkeys_seed_str=seed, inbox_prefix=f"_INBOX.{public}")


async def read_key(nc: Any) -> tuple[dict[str, Any] | None, int]:
    """(the key's value or None, the sequence the read saw: 0 for nothing stored)."""
    answer = await nc.request(f"$JS.API.DIRECT.GET.KV_{BUCKET}.$KV.{BUCKET}.{KEY_ID}", b"", timeout=5)
    headers = answer.headers or {}
    if headers.get("Status") == "404":
        return None, 0
    seq = int(headers["Nats-Sequence"])
    if headers.get("KV-Operation") in ("PURGE", "DEL") or not answer.data:
        return None, seq
    return json.loads(answer.data), seq


async def key_for_writing(nc: Any) -> dict[str, Any]:
    for _ in range(5):
        value, seen = await read_key(nc)
        if value is not None:
            return value
        made = {"kid": secrets.token_hex(8), "key": base64.b64encode(os.urandom(32)).decode()}
        ack = json.loads((await nc.request(
            f"$KV.{BUCKET}.{KEY_ID}", json.dumps(made).encode(), timeout=5,
            headers={"Nats-Expected-Last-Subject-Sequence": str(seen)},
        )).data)
        if "error" not in ack:
            return made
        assert ack["error"]["err_code"] == 10071, ack  # another writer made it first: read theirs
    raise AssertionError("the key kept changing")


def associated_data(envelope_id: str, key: dict[str, Any], kind: str) -> bytes:
    return f"{envelope_id}\n{KEY_ID}\n{key['kid']}\n{kind}".encode()


def seal(envelope_id: str, payload: dict[str, Any], key: dict[str, Any]) -> dict[str, Any]:
    nonce = os.urandom(12)
    data = AESGCM(base64.b64decode(key["key"])).encrypt(
        nonce, json.dumps(payload).encode(), associated_data(envelope_id, key, payload["kind"]),
    )
    return {"kind": "sealed", "of": payload["kind"], "key": KEY_ID, "kid": key["kid"],
            "nonce": base64.b64encode(nonce).decode(), "data": base64.b64encode(data).decode()}


def open_sealed(envelope: dict[str, Any], key: dict[str, Any]) -> dict[str, Any]:
    sealed = envelope["payload"]
    assert sealed["kind"] == "sealed" and sealed["kid"] == key["kid"], sealed
    plain = AESGCM(base64.b64decode(key["key"])).decrypt(
        base64.b64decode(sealed["nonce"]), base64.b64decode(sealed["data"]),
        associated_data(envelope["id"], key, sealed["of"]),
    )
    return json.loads(plain)


# -- the checks --------------------------------------------------------------------------------


async def test_a_record_sealed_from_the_page_is_opened_and_folded_by_the_bus(
    nats_server: EmbeddedServer, poly_credentials: str, bus: Bus, service: ProjectionService,
) -> None:
    """poly makes its key and seals a recall turn by §11 alone: the stored bytes hold no
    plaintext, the admin's Bus opens it, and the recall view holds the turn's text."""
    secret = f"poly private {secrets.token_hex(16)}"
    nc = await connect_as(nats_server.url, seed_of(poly_credentials))
    try:
        key = await key_for_writing(nc)
        assert await key_for_writing(nc) == key  # made once, then read
        envelope_id = uuid7()
        turn = {"kind": "memory.turn.recorded", "agent": NAME, "turn": 1, "role": "user", "at": now(), "text": secret}
        envelope = {"id": envelope_id, "sender": NAME, "payload": seal(envelope_id, turn, key),
                    "created_at": now(), "correlation_id": envelope_id}
        ack = await nc.jetstream().publish(
            f"{NS}.event.{NAME}.memory.turn.recorded", json.dumps(envelope).encode(),
            headers={"Nats-Msg-Id": envelope_id},
        )
    finally:
        await nc.close()

    stored = await bus.transport.direct_get(bus.subjects.stream, {"seq": ack.seq})
    assert stored is not None and secret.encode() not in stored.data
    opened = await bus.open_record(stored.data)
    assert isinstance(opened.payload, TurnRecorded) and opened.payload.text == secret
    assert opened.id == envelope_id and opened.sender == NAME
    rows = (await bus.query(
        "SELECT agent, turn, role, text FROM recall WHERE agent = ?", [NAME], min_seq=ack.seq,
    )).records()
    assert rows == [{"agent": NAME, "turn": 1, "role": "user", "text": secret}]
    kinds = (await bus.query("SELECT kind FROM events WHERE seq = ?", [ack.seq], min_seq=ack.seq)).records()
    assert kinds == [{"kind": "memory.turn.recorded"}]


async def test_the_page_opens_what_the_python_runtime_sealed(
    nats_server: EmbeddedServer, poly_credentials: str, bus: Bus,
) -> None:
    """A turn poly's Python Bus sealed opens with §11's recipe, with the key read the page's way;
    moved to another envelope id, it does not open. (`bus`, the admin, made the log and the key
    store.)"""
    secret = f"from python {secrets.token_hex(16)}"
    config = BusConfig(url=nats_server.url, monitor_url=nats_server.settings.monitor_url, name=NAME,
                       credentials=poly_credentials)
    async with Bus(config) as poly:
        sent = await poly.record(NAME, TurnRecorded(agent=NAME, turn=1, role="user", at=datetime.now(UTC), text=secret))
        stored = await poly.transport.direct_get(poly.subjects.stream, {"seq": sent.ack.seq})
    assert stored is not None
    envelope = json.loads(stored.data)
    nc = await connect_as(nats_server.url, seed_of(poly_credentials))
    try:
        key, _ = await read_key(nc)
    finally:
        await nc.close()
    assert key is not None
    opened = open_sealed(envelope, key)
    assert opened["kind"] == "memory.turn.recorded" and opened["text"] == secret and opened["agent"] == NAME
    moved = {**envelope, "id": uuid7()}
    with pytest.raises(InvalidTag):
        open_sealed(moved, key)
