"""Envelope ids: time-ordered UUIDv7 strings, and deterministic ids derived from a parent.

A fresh id sorts by creation time (so the log, the DuckDB views and humans can order by id).
A derived id is a pure function of (parent id, name): a handler that is redelivered and publishes
"the same" outbound message again produces the same id, and JetStream's `Nats-Msg-Id` dedup
stores it once.

Every id is a UUID in lowercase text (`is_id`): the protocol requires it of an envelope's `id`,
`correlation_id` and `causation_id`, and the typed decoder refuses an envelope that breaks it.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
import uuid

# The protocol's id (schemas/PROTOCOL.md §2): a UUID as lowercase text, 8-4-4-4-12 hex digits.
# `id`, `correlation_id` and `causation_id` are all such ids; the typed decoder (`Codec`) and
# `Bus.envelope` refuse anything else. Any version: fresh ids are v7, derived ones v7, stable v8.
ID_CHARS = 36
ID_PATTERN = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"  # for SQL and Arrow
_EXAMPLE_ID = "018f0000-0000-7000-8000-000000000001"
# Checked on every decode, so not with a regex (~0.25 us an id): each character is mapped to its
# class in one C pass (a lowercase hex digit to 'x', '-' to itself, anything else to '?') and the
# result compared with the shape, all of an envelope's ids at once (~0.08 us each).
_AS_SHAPE = bytes(
    ord("x") if chr(byte) in "0123456789abcdef" else byte if byte == ord("-") else ord("?") for byte in range(256)
)
_SHAPE = b"xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
_SHAPES = (b"", _SHAPE, _SHAPE * 2, _SHAPE * 3)

_lock = threading.Lock()
# SystemRandom draws from os.urandom; ids must not be predictable across processes.
_random_bits = random.SystemRandom().getrandbits
_last_ms = 0
_counter = 0


def new_id() -> str:
    """Return a new UUIDv7 string, monotonically increasing within this process."""
    global _last_ms, _counter
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            # Same (or a backwards) millisecond: keep order with a 12-bit counter.
            ms = _last_ms
            _counter += 1
            if _counter > 0xFFF:
                ms += 1
                _counter = 0
        else:
            _counter = 0
        _last_ms = ms
        counter = _counter
    rand = _random_bits(62)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | rand
    return _format(value)


def _format(value: int) -> str:
    # Same text as str(uuid.UUID(int=value)), without building a UUID object (hot path).
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def derived_id(parent_id: str, name: str) -> str:
    """Return a deterministic UUIDv7-shaped id for `name` under `parent_id`.

    It keeps the parent's timestamp (so it still sorts near its cause) and fills the rest from a
    SHA-256 of both inputs. Raises ValueError if `parent_id` is not a UUID.
    """
    parent = uuid.UUID(parent_id)
    digest = int.from_bytes(hashlib.sha256(f"{parent_id}\x00{name}".encode()).digest()[:10], "big")
    ms = parent.int >> 80
    value = ms << 80 | 0x7 << 76 | (digest >> 68 & 0xFFF) << 64 | 0b10 << 62 | (digest & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


def id_time_ms(envelope_id: str) -> int:
    """Return the millisecond timestamp carried by a UUIDv7 id. Raises ValueError if malformed."""
    return uuid.UUID(envelope_id).int >> 80


def stable_id(*parts: str | int) -> str:
    """A deterministic UUID-shaped id from `parts` (e.g. stream name and sequence), for records
    that must be written at most once whoever writes them (dead letters from advisories)."""
    digest = hashlib.sha256("\x00".join(str(p) for p in parts).encode()).digest()[:16]
    value = int.from_bytes(digest, "big")
    value = (value & ~(0xF << 76)) | 0x8 << 76  # version 8: custom
    value = (value & ~(0b11 << 62)) | 0b10 << 62
    return str(uuid.UUID(int=value))


def is_id(text: str) -> bool:
    """True when `text` is an id as the protocol spells it: a lowercase, hyphenated UUID."""
    # Non-ASCII characters become '?' (one byte each), so the shape also fixes the length.
    return len(text) == ID_CHARS and text.encode("ascii", "replace").translate(_AS_SHAPE) == _SHAPE


def id_problem(field: str, value: str) -> str:
    """The one-line reason `value` cannot be the envelope's `field` (the runtime's dead letter and
    the CLI say the same)."""
    shown = value if len(value) <= 80 else value[:80] + "..."
    return f"{field} {shown!r} is not a UUID in lowercase text (8-4-4-4-12 hex digits, e.g. {_EXAMPLE_ID})"


def unidentified(id: str, correlation_id: str | None, causation_id: str | None) -> str | None:
    """Why an envelope's ids break the protocol (the first that is not an id), or None. A hot
    path: the ids are checked in one pass over their concatenation, a correlation id equal to
    the id (a new conversation) only once."""
    if correlation_id == id:
        correlation_id = None
    text = id
    if correlation_id is not None:
        text += correlation_id
    if causation_id is not None:
        text += causation_id
    # Each length first: then the concatenation's shape is each id's shape in turn.
    if (
        len(id) == ID_CHARS
        and (correlation_id is None or len(correlation_id) == ID_CHARS)
        and (causation_id is None or len(causation_id) == ID_CHARS)
        and text.encode("ascii", "replace").translate(_AS_SHAPE) == _SHAPES[len(text) // ID_CHARS]
    ):
        return None
    for field, value in (("id", id), ("correlation_id", correlation_id), ("causation_id", causation_id)):
        if value is not None and not is_id(value):
            return id_problem(field, value)
    return None  # pragma: no cover - some id failed the check above
