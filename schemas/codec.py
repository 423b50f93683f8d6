"""Encoding and decoding envelopes: one typed pass, clear errors, never a crash.

`Codec.decode` validates the envelope and its payload together; anything wrong (bytes that are
not JSON, a missing field, an unknown kind, a limit of `schemas.limits` exceeded) raises
`DecodeError` whose message says what and where. `decode_loose` keeps the payload undecoded
(`msgspec.Raw`) for readers that must accept every kind, such as projections and `bus tail`; it
also keeps names and ids that break the protocol's rules (the log may hold them), which only
`Codec.decode` refuses (the projections report such ids in the `integrity` view).
Both check the size and nesting limits on the bytes before msgspec (which recurses) sees them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import msgspec

from schemas.envelope import Envelope
from schemas.ids import unidentified
from schemas.limits import MAX_NAME_CHARS, misnamed, refusal
from schemas.payloads.privacy import Sealed
from schemas.registry import PayloadRegistry

# "undecodable": not JSON (or not UTF-8); "invalid": JSON that is not a valid envelope, or is
# over a limit. Either way permanent: the same bytes never decode on a later attempt.
DecodeProblem = Literal["undecodable", "invalid"]


class DecodeError(ValueError):
    """Bytes that are not a valid envelope of a known kind. The message names the problem;
    `problem` says whether the bytes were JSON at all."""

    def __init__(self, message: str, *, problem: DecodeProblem = "invalid") -> None:
        super().__init__(message)
        self.problem: DecodeProblem = problem


_loose_decoder = msgspec.json.Decoder(Envelope[msgspec.Raw])
_encoder = msgspec.json.Encoder()


class Codec:
    """Encodes envelopes to JSON bytes and decodes them against a `PayloadRegistry`."""

    def __init__(self, registry: PayloadRegistry | None = None) -> None:
        self.registry = registry or PayloadRegistry.with_builtins()
        self._decoder = msgspec.json.Decoder(Envelope[self.registry.union()])  # type: ignore[misc]
        self._payload_decoder = msgspec.json.Decoder(self.registry.union())  # type: ignore[arg-type]
        self._opener: Callable[[Envelope[Sealed]], bytes | None] | None = None

    def use_opener(self, opener: Callable[[Envelope[Sealed]], bytes | None] | None) -> None:
        """Open sealed payloads while decoding: `opener(envelope)` returns the payload JSON a
        sealed envelope hides, or None when it cannot (the payload then stays `Sealed`)."""
        self._opener = opener

    def encode(self, envelope: Envelope[Any]) -> bytes:
        """Encode an envelope as JSON bytes."""
        return _encoder.encode(envelope)

    def decode(self, data: bytes) -> Envelope[Any]:
        """Decode and validate bytes into an envelope with a typed payload.

        Raises DecodeError with the reason (not JSON, missing or wrong field, unknown kind, a
        name that is not one subject token, an id that is not a lowercase UUID).
        """
        envelope = _decode_within_limits(self._decoder, data, "undecodable bytes")
        bad = misnamed(envelope.sender, envelope.to, envelope.tag, envelope.reply_to)
        if bad is not None:
            raise DecodeError(
                f"invalid envelope: {bad[:80]!r} is not a name (1-{MAX_NAME_CHARS} letters, digits, '_' or '-')"
            )
        wrong = unidentified(envelope.id, envelope.correlation_id, envelope.causation_id)
        if wrong is not None:
            raise DecodeError(f"invalid envelope: {wrong}")
        if self._opener is not None and type(envelope.payload) is Sealed:
            opened = self._opener(envelope)
            if opened is not None:
                try:
                    payload = self._payload_decoder.decode(opened)
                except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                    raise DecodeError(f"invalid envelope: its sealed payload: {exc}") from exc
                envelope = msgspec.structs.replace(envelope, payload=payload)
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
    return _decode_within_limits(_loose_decoder, data, "invalid envelope")


def _decode_within_limits(decoder: msgspec.json.Decoder[Any], data: bytes, not_json: str) -> Any:
    why = refusal(data)
    if why is not None:
        # Over a limit; but bytes that are not even text (random bytes have brackets too) are
        # first of all not JSON.
        try:
            data.decode()
        except UnicodeDecodeError as exc:
            raise DecodeError(f"{not_json}: {exc}", problem="undecodable") from exc
        raise DecodeError(f"invalid envelope: {why}")
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise DecodeError(f"invalid envelope: {exc}") from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise DecodeError(f"{not_json}: {exc}", problem="undecodable") from exc
    except RecursionError as exc:  # pragma: no cover - refusal() measures the depth first
        raise DecodeError(f"invalid envelope: nested too deep ({exc})") from exc
