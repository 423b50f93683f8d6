"""Publish frames (HPUB) for the publisher's units: one message, or a whole JetStream atomic
batch, encoded into one buffer.

nats-py has no batch helper, and its per-call `publish` (header dict, validation, a coroutine
per message) costs more than the server's share of a batched message. A unit is encoded here
as HPUB frames in one buffer and handed to a `WireConnection.write` in one call.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

from bus.errors import ConfigurationError

HEADER_KEY = re.compile(r"[!-9;-~]+")  # printable ASCII except ':'
SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")


class Framed(Protocol):
    """What a frame is made of: subject, header block (see `header_block`) and payload."""

    @property
    def subject(self) -> bytes: ...

    @property
    def hdr(self) -> bytes: ...

    @property
    def data(self) -> bytes: ...


def header_block(headers: dict[str, str]) -> bytes:
    """`NATS/1.0` and the header lines, without the blank line that ends the block.

    Raises ConfigurationError for a name or value that would corrupt the protocol.
    """
    lines = [b"NATS/1.0\r\n"]
    for key, value in headers.items():
        if not HEADER_KEY.fullmatch(key):
            raise ConfigurationError(f"invalid header name {key!r}: use printable ASCII without ':' or spaces")
        if "\r" in value or "\n" in value:
            raise ConfigurationError(f"invalid value for header {key!r}: it contains a line break")
        lines.append(f"{key}: {value}\r\n".encode())
    return b"".join(lines)


def encode_single(entry: Framed, reply: bytes) -> bytes:
    """One message as an HPUB frame with a reply subject (its PubAck goes there)."""
    hlen = len(entry.hdr) + 2
    return b"HPUB %b %b %d %d\r\n%b\r\n%b\r\n" % (
        entry.subject, reply, hlen, hlen + len(entry.data), entry.hdr, entry.data
    )


def encode_batch(entries: Sequence[Framed], batch_id: bytes, reply: bytes) -> tuple[bytes, bytes]:
    """An atomic batch as (staged frames, commit frame). Every message carries the batch id and
    its position; only the last commits and carries a reply subject (the server answers the
    commit, with the last sequence and the count)."""
    seq_prefix = b"Nats-Batch-Id: " + batch_id + b"\r\nNats-Batch-Sequence: "
    fixed = len(seq_prefix) + 4
    parts: list[bytes] = []
    add = parts.append
    last = len(entries)
    for position, entry in enumerate(entries[:-1], 1):
        pos = b"%d" % position
        hlen = len(entry.hdr) + fixed + len(pos)
        add(b"HPUB %b %d %d\r\n%b%b%b\r\n\r\n%b\r\n" % (
            entry.subject, hlen, hlen + len(entry.data), entry.hdr, seq_prefix, pos, entry.data
        ))
    tail = entries[-1]
    hdr = b"%b%b%d\r\nNats-Batch-Commit: 1\r\n\r\n" % (tail.hdr, seq_prefix, last)
    commit = b"HPUB %b %b %d %d\r\n%b%b\r\n" % (
        tail.subject, reply, len(hdr), len(hdr) + len(tail.data), hdr, tail.data
    )
    return b"".join(parts), commit
