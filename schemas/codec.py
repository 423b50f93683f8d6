"""Encoding and decoding envelopes: one typed pass, clear errors, never a crash.

`Codec.decode` validates the envelope and its payload together; anything wrong (bytes that are
not JSON, a missing field, an unknown kind) raises `DecodeError` whose message says what and
where. `decode_loose` keeps the payload undecoded (`msgspec.Raw`) for readers that must accept
every kind, such as projections and `bus tail`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.envelope import Envelope
from schemas.registry import PayloadRegistry


class DecodeError(ValueError):
    """Bytes that are not a valid envelope of a known kind. The message names the problem."""


_loose_decoder = msgspec.json.Decoder(Envelope[msgspec.Raw])
_encoder = msgspec.json.Encoder()


class Codec:
    """Encodes envelopes to JSON bytes and decodes them against a `PayloadRegistry`."""

    def __init__(self, registry: PayloadRegistry | None = None) -> None:
        self.registry = registry or PayloadRegistry.with_builtins()
        self._decoder = msgspec.json.Decoder(Envelope[self.registry.union()])  # type: ignore[misc]

    def encode(self, envelope: Envelope[Any]) -> bytes:
        """Encode an envelope as JSON bytes."""
        return _encoder.encode(envelope)

    def decode(self, data: bytes) -> Envelope[Any]:
        """Decode and validate bytes into an envelope with a typed payload.

        Raises DecodeError with the reason (not JSON, missing or wrong field, unknown kind).
        """
        try:
            envelope = self._decoder.decode(data)
        except msgspec.ValidationError as exc:
            raise DecodeError(f"invalid envelope: {exc}") from exc
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise DecodeError(f"undecodable bytes: {exc}") from exc
        if self.registry.has_upcasters:
            upcast = self.registry.apply_upcasters(envelope.payload)
            if upcast is not envelope.payload:
                envelope = msgspec.structs.replace(envelope, payload=upcast)
        return envelope


def encode(envelope: Envelope[Any]) -> bytes:
    """Encode an envelope as JSON bytes (the encoding does not depend on a registry)."""
    return _encoder.encode(envelope)


def decode_loose(data: bytes) -> Envelope[msgspec.Raw]:
    """Decode the envelope fields and keep the payload as raw JSON. Raises DecodeError."""
    try:
        return _loose_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise DecodeError(f"invalid envelope: {exc}") from exc
