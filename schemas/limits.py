"""What a decoder accepts, stated once and checked before anything recursive or expensive runs.

Any client can publish any bytes on any subject it may use, so every reader of the log (the
consumer engine, the projections, `bus tail`, the dead-letter watcher, the query service)
checks these limits first. msgspec decodes nested JSON recursively, even when it only skips a
value (`msgspec.Raw`): a payload nested 10,000 deep raises RecursionError from inside the
decoder. So the nesting depth is measured on the bytes first, without recursion.

    MAX_ENVELOPE_BYTES   8 MiB   the whole record (the server's max_payload in nats.conf)
    MAX_DEPTH            64      nested arrays/objects, the envelope's own object included
    MAX_NAME_CHARS       64      sender, to, tag, reply_to: one subject token (see bus.config);
                                 the characters are checked by the typed decoder (`Codec`), which
                                 every agent uses; the projections keep such records as they are
    MAX_ID_CHARS         128     id, correlation_id, causation_id; the typed decoder (`Codec`)
                                 takes only a UUID in lowercase text (`schemas.ids.is_id`); the
                                 projections keep other ids and report them (`integrity`)
    MAX_HEADERS          32      envelope headers; keys up to 128 and values up to 4096 chars
    MAX_KIND_CHARS       128     a payload kind as recorded about a message of unknown kind

The field limits are part of the envelope's type (`schemas.envelope`), so msgspec enforces them
in its one pass; a record over any limit is `invalid`, never retried.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

MAX_ENVELOPE_BYTES = 8 * 1024 * 1024
MAX_DEPTH = 64
MAX_NAME_CHARS = 64
MAX_ID_CHARS = 128
MAX_HEADERS = 32
MAX_HEADER_KEY_CHARS = 128
MAX_HEADER_VALUE_CHARS = 4096
MAX_KIND_CHARS = 128

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")

# A name becomes a NATS subject token, so no dots, spaces or wildcards. The type bounds its
# length (cheap, in msgspec's pass); its characters are checked by `misnamed` (a msgspec
# `pattern` would cost ~0.5 us per field on every decode, 4x this check).
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS)]
Ident = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
HeaderKey = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_HEADER_KEY_CHARS)]
HeaderValue = Annotated[str, msgspec.Meta(max_length=MAX_HEADER_VALUE_CHARS)]
Headers = Annotated[dict[HeaderKey, HeaderValue], msgspec.Meta(max_length=MAX_HEADERS)]

# JSON strings (which may hold brackets) are removed before counting brackets: escaped
# backslashes and quotes first, so that every quote left delimits a string (no backtracking).
_STRING = re.compile(rb'"[^"]*"')
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_AS_PARENS = bytes.maketrans(b"[{]}", b"(())")


def misnamed(sender: str, *others: str | None) -> str | None:
    """Which of these names (sender, then to, tag, reply_to: any may be None) is not one subject
    token of letters, digits, '_' and '-' (their length is the type's), or None when all are."""
    for name in (sender, *others):
        if name is not None and not (name.isascii() and (name.isalnum() or _NAME_CHARS.issuperset(name))):
            return name
    return None


def refusal(data: bytes, *, max_bytes: int = MAX_ENVELOPE_BYTES, max_depth: int = MAX_DEPTH) -> str | None:
    """Why `data` must not be decoded (too large, or nested too deep), or None when it may be.

    Costs two byte counts for any record with at most `max_depth` opening brackets (nearly
    all); a longer scan, still linear and without recursion, otherwise."""
    size = len(data)
    if size > max_bytes:
        return f"{size} bytes is over the limit of {max_bytes} bytes"
    if data.count(b"[") + data.count(b"{") <= max_depth:
        return None
    if nesting_exceeds(data, max_depth):
        return f"nested deeper than the limit of {max_depth} arrays or objects"
    return None


def nesting_exceeds(data: bytes, max_depth: int) -> bool:
    """True when JSON `data` nests arrays and objects deeper than `max_depth` (brackets inside
    strings do not count). Unbalanced text is judged by its open brackets, so `[[[` with no
    closing counts as three deep: a decoder would recurse that far before failing."""
    unescaped = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = _STRING.sub(b"", unescaped).translate(_AS_PARENS, _NOT_BRACKET)
    # Each pass removes the innermost pairs: after k passes, what nested k deep is gone.
    for peeled in range(max_depth):
        if not brackets:
            return False
        shorter = brackets.replace(b"()", b"")
        if len(shorter) == len(brackets):
            # No pair left: closers then openers. Each opener was nested in everything peeled.
            return peeled + brackets.count(b"(") > max_depth
        brackets = shorter
    # Any pair or opener left was nested inside `max_depth` peeled levels.
    return b"(" in brackets
