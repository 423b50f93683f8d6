"""Private records and forgetting: a sealed payload, and the event that records a forget.

A private record (an agent's recall turns, model calls, step results, own state: see
`bus.privacy.sealing.PRIVATE_KINDS`) is stored with its payload sealed: the envelope (id, sender,
correlation, subject, sequence) stays readable, the payload becomes a `Sealed` whose `data` is
the original payload's JSON encrypted (AES-256-GCM) under the data subject's key. Whoever holds
that key (the owning agent's runtime, the projection service, the admin) opens it; anyone else
decodes a `sealed` payload and reads only which kind it hides and whose key it needs.
"""

from __future__ import annotations

from datetime import datetime

from schemas.envelope import Payload


class Sealed(Payload, frozen=True, kw_only=True, tag="sealed"):
    """A payload of kind `of`, encrypted under key `key` (generation `kid`).

    `nonce` (12 bytes) and `data` (ciphertext and 16-byte tag) are base64 in JSON. The envelope's
    id, the key id, the key generation and `of` are the associated data: a sealed payload cannot
    be moved to another envelope or relabelled without failing to open."""

    of: str
    key: str
    kid: str
    nonce: bytes
    data: bytes


class Forgotten(Payload, frozen=True, kw_only=True, omit_defaults=True, tag="privacy.forgotten"):
    """Data subject `subject` of `unit` (e.g. unit "agent", subject "alice": the agent's private
    records) was forgotten: key `key` (generations `kids`) was erased from the key store, so every
    record sealed under it is unreadable from now on, in the log, the archive and every copy.

    `actor` is the credential's name that did it, `why` the reason it gave, `at` when."""

    unit: str
    subject: str
    key: str
    why: str
    actor: str
    at: datetime
    kids: list[str] = []
