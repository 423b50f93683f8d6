"""Which records are private, and sealing/opening their payloads (AES-256-GCM). Pure: no I/O.

The unit of forgetting is an agent's private memory: every record of a kind in `PRIVATE_KINDS`
is about one agent (its payload's `agent` field) and sealed under that agent's key, `agent.<name>`
(`key_id`). A sealed envelope keeps its id, sender, recipient, correlation, causation, headers
and subject in the clear (order, integrity chains, the messages view and everyone else's views
need them); only the payload is replaced by a `Sealed` one.
"""

from __future__ import annotations

import os
from typing import Any

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from schemas.envelope import Envelope
from schemas.payloads.privacy import Sealed

# What an agent keeps to itself (the query scopes' private views hold the same): its conversation
# (recall turns and summaries), its model calls, its step results (tool outputs, model answers)
# and its own state. Shared memory (blocks several agents hold, the team's facts) and messages
# between agents (the other party has them too) are not sealed.
PRIVATE_KINDS = frozenset({
    "memory.turn.recorded",
    "memory.conversation.summarised",
    "llm.call.completed",
    "llm.call.failed",
    "agent.step",
    "agent.state",
})
KEY_BYTES = 32
NONCE_BYTES = 12

_encoder = msgspec.json.Encoder()


class KeyEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One key generation as the key store holds it: `kid` names the generation (a key made
    again after a forget is another generation; records of the old one stay unreadable)."""

    kid: str
    key: bytes


class CannotOpen(Exception):
    """A sealed payload that this key does not open (another generation, or altered bytes)."""


def key_id(agent: str) -> str:
    """The key id of an agent's private records (a KV key: `agent.<name>`)."""
    return f"agent.{agent}"


def agent_of_key(key: str) -> str | None:
    """The agent a key id belongs to, or None for a key id of another unit."""
    unit, _, name = key.partition(".")
    return name if unit == "agent" and name else None


def new_key() -> KeyEntry:
    """A fresh random key generation."""
    return KeyEntry(kid=os.urandom(8).hex(), key=AESGCM.generate_key(bit_length=KEY_BYTES * 8))


def data_subject(payload: Any) -> str | None:
    """The agent whose key seals `payload`, or None when it is not private (or not a payload
    Struct: a loose envelope's raw payload is published as it is)."""
    config = getattr(type(payload), "__struct_config__", None)
    tag = config.tag if config is not None else None
    if tag not in PRIVATE_KINDS:
        return None
    agent = getattr(payload, "agent", None)
    return agent if isinstance(agent, str) and agent else None


def _aad(envelope_id: str, key: str, kid: str, of: str) -> bytes:
    return f"{envelope_id}\n{key}\n{kid}\n{of}".encode()


def seal(envelope: Envelope[Any], key: str, entry: KeyEntry) -> Envelope[Sealed]:
    """`envelope` with its payload encrypted under `entry` (a fresh nonce each time)."""
    of = type(envelope.payload).__struct_config__.tag
    nonce = os.urandom(NONCE_BYTES)
    data = AESGCM(entry.key).encrypt(nonce, _encoder.encode(envelope.payload), _aad(envelope.id, key, entry.kid, of))
    sealed = Sealed(of=of, key=key, kid=entry.kid, nonce=nonce, data=data)
    return msgspec.structs.replace(envelope, payload=sealed)


def open_payload(envelope_id: str, sealed: Sealed, entry: KeyEntry) -> bytes:
    """The payload JSON a sealed payload hides. Raises CannotOpen (another key generation, or
    bytes that were altered)."""
    if sealed.kid != entry.kid:
        raise CannotOpen(f"sealed under key generation {sealed.kid} of {sealed.key}, which no longer exists")
    try:
        return AESGCM(entry.key).decrypt(sealed.nonce, sealed.data, _aad(envelope_id, sealed.key, sealed.kid, sealed.of))
    except (InvalidTag, ValueError) as exc:
        raise CannotOpen(f"the sealed payload does not open with key {sealed.key} ({type(exc).__name__})") from exc
