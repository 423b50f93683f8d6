"""The NATS protocol spoken directly, for the hot paths (pull deliveries and their acks).

    protocol.py    frames as bytes: bulk parser of server frames, encoders of client frames,
                   status/header helpers (no I/O)
    address.py     server URLs and credentials (user/password, token, tls://)
    connection.py  WireConnection: handshake (TLS when asked), subscriptions, batched writes,
                   keepalive, reconnects; errors from bus.errors
    hpub.py        the publisher's HPUB frames: one message, or a whole atomic batch

The consumer engine's deliveries and settlements use a WireConnection of its own; the publisher
writes its HPUB frames and reads its acks on the Bus's publishing WireConnection (see
bus.publisher). Nothing here touches a library's private members.
"""

from bus.wire.address import (
    ServerAddress,
    parse_url,
    parse_urls,
    with_credentials,
)
from bus.wire.connection import WireConnection, WireSettings
from bus.wire.protocol import (
    FrameParser,
    MessageCallback,
    ProtocolViolation,
    header_value,
    parse_headers,
    parse_status,
    pub_frame,
)

__all__ = [
    "FrameParser",
    "MessageCallback",
    "ProtocolViolation",
    "ServerAddress",
    "WireConnection",
    "WireSettings",
    "header_value",
    "parse_headers",
    "parse_status",
    "parse_url",
    "parse_urls",
    "pub_frame",
    "with_credentials",
]
