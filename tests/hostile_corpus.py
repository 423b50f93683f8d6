"""The committed corpus of hostile messages: what an outside tester (or a broken client) can put
on an agent's inbox subject, each with the one way it must end.

Every case is raw bytes published on `<ns>.inbox.<agent>.<from>`, bypassing the `Bus` that
would refuse most of them. `expect` is how the receiving agent must settle it:

    handled            the handler ran (the bytes are a valid envelope, however odd)
    expired            recorded as expired, the handler did not run
    dead:<reason>      dead-lettered at once (first delivery) with that reason

The large cases are built when asked for (a 7 MB random blob is not worth committing).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

from schemas.limits import MAX_DEPTH, MAX_HEADERS

MB = 1024 * 1024
_ID = "018f0000-0000-7b0c-9418-503cb4b2ee08"


@dataclass(frozen=True)
class HostileCase:
    """One hostile message: its name, how to build its bytes, and how it must end."""

    name: str
    build: Callable[[], bytes]
    expect: str


def envelope(**fields: object) -> dict[str, object]:
    """A valid note envelope to `greeter`, with `fields` replacing or adding fields (a value of
    ... removes the field)."""
    base: dict[str, object] = {
        "id": _ID,
        "sender": "tester",
        "payload": {"kind": "note", "text": "hello there"},
        "created_at": "2026-01-02T03:04:05.678901Z",
        "to": "greeter",
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def text(obj: object) -> bytes:
    return json.dumps(obj).encode()


def raw(template: str, **fields: object) -> Callable[[], bytes]:
    """An envelope with raw JSON text spliced in (for what `json.dumps` would not write)."""
    return lambda: template.format(**fields).encode()


def nested(depth: int, *, closed: bool = True) -> bytes:
    """A note whose `data` holds a list nested `depth` deep (not closed: truncated there)."""
    inner = b"[" * depth + (b"]" * depth if closed else b"")
    return b'{"id":"%s","sender":"tester","payload":{"kind":"note","text":"x","data":{"d":%s}},' \
        b'"created_at":"2026-01-02T03:04:05Z","to":"greeter"}' % (_ID.encode(), inner)


def random_bytes(size: int, seed: int) -> Callable[[], bytes]:
    return lambda: random.Random(seed).randbytes(size)


def note_of(size: int) -> Callable[[], bytes]:
    """A valid note whose text makes the whole envelope about `size` bytes."""
    return lambda: text(envelope(payload={"kind": "note", "text": "word " * (size // 5)}))


def unknown_kind_of(size: int) -> Callable[[], bytes]:
    return lambda: text(envelope(payload={"kind": "blob.uploaded", "blob": "x" * size}))


CASES: list[HostileCase] = [
    # -- reproduced in the issue -------------------------------------------------------------
    HostileCase("nested 10,000 deep", lambda: nested(10_000), "dead:invalid"),
    HostileCase("7 MB of random bytes", random_bytes(7 * MB, 1), "dead:undecodable"),
    HostileCase("6.5 MB envelope of an unknown kind", unknown_kind_of(int(6.5 * MB)), "dead:unknown_kind"),
    HostileCase("invalid reply_to", lambda: text(envelope(reply_to="not a name.*")), "dead:invalid"),
    HostileCase("sender with a dot", lambda: text(envelope(sender="tes.ter")), "dead:invalid"),
    HostileCase("to with a wildcard", lambda: text(envelope(to="greeter.>")), "dead:invalid"),
    HostileCase("tag with a space", lambda: text(envelope(tag="the team")), "dead:invalid"),
    HostileCase("sender with a non-ASCII letter", lambda: text(envelope(sender="tést")), "dead:invalid"),
    HostileCase("64 KB sender name", lambda: text(envelope(sender="s" * 65_536)), "dead:invalid"),
    HostileCase("1 MB sender name", lambda: text(envelope(sender="s" * MB)), "dead:invalid"),
    # -- fuzz categories ---------------------------------------------------------------------
    HostileCase("random bytes", random_bytes(512, 2), "dead:undecodable"),
    HostileCase("empty body", lambda: b"", "dead:undecodable"),
    HostileCase("invalid UTF-8 in an envelope field", lambda: text(envelope(sender="tes\u00e9ter")).replace(
        b"tes\\u00e9ter", b"tes\xff\xfeter"), "dead:undecodable"),
    # The payload stays raw until the kind is known: a known kind with bad text is invalid.
    HostileCase("invalid UTF-8 in the payload", lambda: text(envelope()).replace(b"hello", b"hel\xff\xfelo"),
                "dead:invalid"),
    HostileCase("non-object JSON: array", lambda: b"[1, 2, 3]", "dead:invalid"),
    HostileCase("non-object JSON: string", lambda: b'"an envelope"', "dead:invalid"),
    HostileCase("non-object JSON: null", lambda: b"null", "dead:invalid"),
    HostileCase("wrong type: priority as text", lambda: text(envelope(priority="high")), "dead:invalid"),
    HostileCase("wrong type: sender as number", lambda: text(envelope(sender=5)), "dead:invalid"),
    HostileCase("wrong type: payload text as list", lambda: text(envelope(payload={"kind": "note", "text": [1]})),
                "dead:invalid"),
    HostileCase("missing id", lambda: text(envelope(id=...)), "dead:invalid"),
    HostileCase("missing payload", lambda: text(envelope(payload=...)), "dead:invalid"),
    HostileCase("payload without kind", lambda: text(envelope(payload={"text": "x"})), "dead:unknown_kind"),
    HostileCase("unknown kind", lambda: text(envelope(payload={"kind": "no.such.kind"})), "dead:unknown_kind"),
    HostileCase("1 MB kind", lambda: text(envelope(payload={"kind": "k" * MB})), "dead:unknown_kind"),
    HostileCase("priority out of range", lambda: text(envelope(priority=40)), "dead:invalid"),
    HostileCase("negative priority", lambda: text(envelope(priority=-1)), "dead:invalid"),
    HostileCase("nested 1,000 deep", lambda: nested(1_000), "dead:invalid"),
    HostileCase("nested 100,000 deep", lambda: nested(100_000), "dead:invalid"),
    HostileCase("nested 100,000 deep, never closed", lambda: nested(100_000, closed=False), "dead:invalid"),
    HostileCase("nested just over the limit", lambda: nested(MAX_DEPTH), "dead:invalid"),
    HostileCase("nested just within the limit", lambda: nested(MAX_DEPTH - 3), "handled"),
    HostileCase("1 MB id", lambda: text(envelope(id="i" * MB)), "dead:invalid"),
    # Ids are UUIDs in lowercase text (PROTOCOL.md §2), every one of the three.
    HostileCase("id not a UUID", lambda: text(envelope(id="hostile-1")), "dead:invalid"),
    HostileCase("id an upper-case UUID", lambda: text(envelope(id=_ID.upper())), "dead:invalid"),
    HostileCase("request whose id is not a UUID", lambda: text(envelope(id="req-1", reply_to="tester")), "dead:invalid"),
    HostileCase("correlation id not a UUID", lambda: text(envelope(correlation_id="day-1")), "dead:invalid"),
    HostileCase("causation id not a UUID", lambda: text(envelope(causation_id=_ID.replace("-", ""))), "dead:invalid"),
    HostileCase("1 MB correlation id", lambda: text(envelope(correlation_id="c" * MB)), "dead:invalid"),
    HostileCase("1 MB header value", lambda: text(envelope(headers={"x": "v" * MB})), "dead:invalid"),
    HostileCase("too many headers", lambda: text(envelope(headers={f"h{i}": "v" for i in range(MAX_HEADERS + 1)})),
                "dead:invalid"),
    HostileCase("NaN", raw('{{"id":"{id}","sender":"t","payload":{{"kind":"note","text":"x","data":{{"v":NaN}}}},'
                           '"created_at":"2026-01-02T03:04:05Z","to":"greeter"}}', id=_ID), "dead:undecodable"),
    HostileCase("Infinity", raw('{{"id":"{id}","sender":"t","payload":{{"kind":"note","text":"x","data":{{"v":Infinity}}}},'
                                '"created_at":"2026-01-02T03:04:05Z","to":"greeter"}}', id=_ID), "dead:undecodable"),
    HostileCase("number out of range", raw('{{"id":"{id}","sender":"t","payload":{{"kind":"note","text":"x",'
                                           '"data":{{"v":1e400}}}},"created_at":"2026-01-02T03:04:05Z"}}', id=_ID),
                "dead:invalid"),
    HostileCase("duplicate keys", raw('{{"id":"{id}","id":"{id}","sender":"t","sender":"tester",'
                                      '"payload":{{"kind":"note","text":"x","text":"twice"}},'
                                      '"created_at":"2026-01-02T03:04:05Z","to":"greeter"}}', id=_ID), "handled"),
    HostileCase("created_at not a time", lambda: text(envelope(created_at="yesterday")), "dead:invalid"),
    HostileCase("created_at far in the future", lambda: text(envelope(created_at="9999-12-31T23:59:59Z")), "handled"),
    HostileCase("expires_at in the past", lambda: text(envelope(expires_at="2000-01-01T00:00:00Z")), "expired"),
    HostileCase("1 MB body", note_of(MB), "handled"),
    HostileCase("7 MB body", note_of(7 * MB), "handled"),
    HostileCase("huge string in data", lambda: text(envelope(payload={"kind": "note", "text": "x",
                                                                        "data": {"s": "z" * (2 * MB)}})), "handled"),
]
