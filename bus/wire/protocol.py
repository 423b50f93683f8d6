"""The NATS client protocol as bytes: parse server frames in bulk, encode client frames.

No I/O here. `FrameParser.feed(chunk)` consumes every complete frame of a chunk and keeps a
trailing partial one for the next chunk, so frames may be split anywhere. A message frame
(`MSG`/`HMSG`) goes to the callback registered for its subscription id as four byte strings
(subject, reply, header block, payload); nothing is decoded that the receiver did not ask for:
JetStream puts the delivery facts in the reply subject, and a delivery's headers (message id,
batch id and position, ...) are handed over raw, unparsed. Control frames (`PING`, `PONG`,
`INFO`, `-ERR`, `+OK`) go to a `ControlHandler`.

Frames this module reads (server to client) and writes (client to server):
    MSG  <subject> <sid> [reply] <#payload>\\r\\n<payload>\\r\\n
    HMSG <subject> <sid> [reply] <#header> <#header+payload>\\r\\n<header><payload>\\r\\n
    PUB  <subject> [reply] <#payload>\\r\\n<payload>\\r\\n
    SUB  <subject> <sid>\\r\\n        UNSUB <sid>\\r\\n        CONNECT {json}\\r\\n
    PING / PONG / INFO {json} / -ERR '<text>' / +OK
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

from bus.errors import BusUnavailable

# (subject, reply, header block or b"", payload); called synchronously, must not block.
MessageCallback = Callable[[bytes, bytes, bytes, bytes], None]

CRLF = b"\r\n"
PING = b"PING\r\n"
PONG = b"PONG\r\n"
# A control line longer than this without its CRLF is garbage, not a slow frame.
MAX_CONTROL_LINE = 64 * 1024


class ProtocolViolation(BusUnavailable):
    """The server sent bytes that are not NATS protocol; the connection must be dropped."""


class ControlHandler(Protocol):
    """Receives the control frames a `FrameParser` reads."""

    def on_ping(self) -> None: ...

    def on_pong(self) -> None: ...

    def on_info(self, info: dict[str, Any]) -> None: ...

    def on_error(self, text: str) -> None: ...


class FrameParser:
    """Bulk parser of the server's side of one connection.

    `subscriptions` maps a subscription id (as ASCII bytes) to its callback; the dict is read
    on every message, so the owner may add and remove entries between chunks. A message for an
    unknown id (one just unsubscribed) is dropped. A callback that raises loses only its own
    message (the error goes to `on_callback_error`); parsing goes on.
    """

    __slots__ = ("_buf", "_control", "subscriptions", "on_callback_error")

    def __init__(
        self,
        subscriptions: dict[bytes, MessageCallback],
        control: ControlHandler,
        on_callback_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._buf = b""
        self._control = control
        self.subscriptions = subscriptions
        self.on_callback_error = on_callback_error

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame kept for the next chunk."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> None:
        """Consume every complete frame in the buffered bytes plus `chunk`.

        Raises ProtocolViolation for bytes that are not NATS protocol (the parser is then
        unusable: drop the connection).
        """
        buf = self._buf + chunk if self._buf else chunk
        size = len(buf)
        pos = 0
        subs = self.subscriptions
        try:
            while pos < size:
                eol = buf.find(CRLF, pos)
                if eol < 0:
                    if size - pos > MAX_CONTROL_LINE:
                        raise ProtocolViolation(f"a control line longer than {MAX_CONTROL_LINE} bytes")
                    break
                first = buf[pos]
                if first == 77 and buf.startswith(b"MSG ", pos):  # 77: "M"
                    parts = buf[pos + 4:eol].split(b" ")
                    start = eol + 2
                    end = start + int(parts[-1])
                    if end + 2 > size:
                        break
                    callback = subs.get(parts[1])
                    pos = end + 2
                    if callback is not None:
                        try:
                            callback(parts[0], parts[2] if len(parts) == 4 else b"", b"", buf[start:end])
                        except Exception as exc:  # noqa: BLE001 - one receiver's bug loses one message
                            self._callback_failed(exc)
                elif first == 72 and buf.startswith(b"HMSG ", pos):  # 72: "H"
                    parts = buf[pos + 5:eol].split(b" ")
                    start = eol + 2
                    end = start + int(parts[-1])
                    if end + 2 > size:
                        break
                    split = start + int(parts[-2])
                    callback = subs.get(parts[1])
                    pos = end + 2
                    if callback is not None:
                        try:
                            reply = parts[2] if len(parts) == 5 else b""
                            callback(parts[0], reply, buf[start:split], buf[split:end])
                        except Exception as exc:  # noqa: BLE001 - one receiver's bug loses one message
                            self._callback_failed(exc)
                else:
                    line = buf[pos:eol]
                    pos = eol + 2
                    self._control_line(line)
        except (ValueError, IndexError) as exc:
            self._buf = b""
            raise ProtocolViolation(f"unreadable frame from the server near {buf[pos:pos + 80]!r}") from exc
        self._buf = buf[pos:] if pos < size else b""

    def _control_line(self, line: bytes) -> None:
        op = line[:4].upper()
        if op == b"PING":
            self._control.on_ping()
        elif op == b"PONG":
            self._control.on_pong()
        elif op == b"INFO":
            try:
                info = json.loads(line[5:])
            except ValueError as exc:
                raise ProtocolViolation(f"unreadable INFO from the server: {line[:200]!r}") from exc
            self._control.on_info(info if isinstance(info, dict) else {})
        elif op == b"-ERR":
            self._control.on_error(line[4:].strip().strip(b"'").decode(errors="replace"))
        elif op == b"+OK":
            pass
        elif line:
            raise ProtocolViolation(f"unknown operation from the server: {line[:80]!r}")

    def _callback_failed(self, exc: BaseException) -> None:
        if self.on_callback_error is not None:
            self.on_callback_error(exc)


# -- client frames ---------------------------------------------------------------------------


def pub_frame(subject: bytes, payload: bytes, reply: bytes = b"") -> bytes:
    """A PUB frame. The subject and reply must be valid (no whitespace); see `check_subject`."""
    if reply:
        return b"PUB %b %b %d\r\n%b\r\n" % (subject, reply, len(payload), payload)
    return b"PUB %b %d\r\n%b\r\n" % (subject, len(payload), payload)


def sub_frame(subject: bytes, sid: bytes) -> bytes:
    return b"SUB %b %b\r\n" % (subject, sid)


def unsub_frame(sid: bytes) -> bytes:
    return b"UNSUB %b\r\n" % sid


def connect_frame(options: dict[str, Any]) -> bytes:
    return b"CONNECT " + json.dumps(options, separators=(",", ":")).encode() + CRLF


def check_subject(subject: str | bytes, what: str = "subject") -> bytes:
    """`subject` as bytes, or ValueError if it would break the frame (empty, whitespace)."""
    raw = subject.encode() if isinstance(subject, str) else subject
    if not raw or any(c <= 32 or c == 127 for c in raw):
        raise ValueError(f"invalid {what} {subject!r}: empty or containing whitespace/control bytes")
    return raw


# -- header blocks ---------------------------------------------------------------------------


def parse_status(header: bytes) -> tuple[str, str]:
    """(status code, description) from a header block's first line, e.g.
    b"NATS/1.0 408 Request Timeout\\r\\n..." -> ("408", "Request Timeout"); ("", "") if none."""
    first, _, _ = header.partition(CRLF)
    fields = first.split(b" ", 2)
    if len(fields) < 2 or not fields[0].startswith(b"NATS/"):
        return "", ""
    code = fields[1].decode(errors="replace")
    description = fields[2].decode(errors="replace").strip() if len(fields) == 3 else ""
    return code, description


def header_value(header: bytes, name: str) -> str | None:
    """The first value of header `name` (case-insensitive) in a raw header block, or None."""
    wanted = name.lower().encode()
    for line in header.split(CRLF)[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == wanted:
            return value.strip().decode(errors="replace")
    return None


def parse_headers(header: bytes) -> dict[str, str]:
    """Every header of a raw block as a dict (the last value wins for a repeated name)."""
    out: dict[str, str] = {}
    for line in header.split(CRLF)[1:]:
        key, sep, value = line.partition(b":")
        if sep:
            out[key.strip().decode(errors="replace")] = value.strip().decode(errors="replace")
    return out
