"""Envelope ids: time-ordered UUIDv7 strings, and deterministic ids derived from a parent.

A fresh id sorts by creation time (so the log, the DuckDB views and humans can order by id).
A derived id is a pure function of (parent id, name): a handler that is redelivered and publishes
"the same" outbound message again produces the same id, and JetStream's `Nats-Msg-Id` dedup
stores it once.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
import uuid

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
