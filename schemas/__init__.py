"""Wire types: the envelope, payload families, the codec and schema evolution."""

from schemas.codec import Codec, DecodeError, decode_loose, encode
from schemas.envelope import (
    PRIORITY_DEFAULT,
    PRIORITY_MAX,
    PRIORITY_MIN,
    Delivery,
    Envelope,
    Payload,
    payload_kind,
    utcnow,
)
from schemas.ids import derived_id, new_id, stable_id
from schemas.registry import PayloadRegistry, SchemaConflict

__all__ = [
    "PRIORITY_DEFAULT",
    "PRIORITY_MAX",
    "PRIORITY_MIN",
    "Codec",
    "DecodeError",
    "Delivery",
    "Envelope",
    "Payload",
    "PayloadRegistry",
    "SchemaConflict",
    "decode_loose",
    "derived_id",
    "encode",
    "new_id",
    "stable_id",
    "payload_kind",
    "utcnow",
]
