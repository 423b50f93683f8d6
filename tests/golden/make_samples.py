"""Write one golden encoded envelope for every registered payload kind that has none yet.

    .venv/bin/python tests/golden/make_samples.py          # then commit the new files

A sample records what this version puts on the wire; tests/test_schema_golden.py checks that
every sample still decodes, forever. So this script never touches an existing file: a sample,
once committed, is never edited or regenerated (a breaking change gets a new kind and an
upcaster instead). Values are fixed and fill every field, optional ones included, so a sample
exercises the whole type. The test does not import this script.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from schemas import Codec, PayloadRegistry, derived_id  # noqa: E402

BASE_ID = "018f0000-0000-7000-8000-000000000000"
WHEN = "2026-01-02T03:04:05.678901Z"


class CannotFill(Exception):
    """A field type this generic filler cannot produce a value for."""


def sample_value(info: mi.Type, hint: str) -> Any:
    """A JSON-ready value valid for `info` (a msgspec.inspect type); `hint` names the field."""
    match info:
        case mi.StrType(min_length=lo, pattern=pattern):
            if pattern is not None:
                raise CannotFill(f"{hint}: string with a pattern {pattern!r}")
            text = f"example {hint}"
            return text if lo is None or len(text) >= lo else text.ljust(lo, "x")
        case mi.BoolType():
            return True
        case mi.IntType(ge=ge, gt=gt, le=le, lt=lt):
            return int(_in_range(ge, gt, le, lt, preferred=3, step=1))
        case mi.FloatType(ge=ge, gt=gt, le=le, lt=lt):
            return float(_in_range(ge, gt, le, lt, preferred=0.5, step=0.25))
        case mi.BytesType() | mi.ByteArrayType() | mi.MemoryViewType():
            return base64.b64encode(f"golden bytes of {hint}".encode()).decode()
        case mi.DateTimeType(tz=tz):
            return WHEN if tz is not False else WHEN.removesuffix("Z")
        case mi.DateType():
            return WHEN[:10]
        case mi.TimeType():
            return WHEN[11:26]
        case mi.TimeDeltaType():
            return "PT1.5S"
        case mi.UUIDType():
            return derived_id(BASE_ID, hint)
        case mi.DecimalType():
            return "1.25"
        case mi.NoneType():
            return None
        case mi.AnyType():
            return {"example": hint, "n": 1}
        case mi.RawType():
            return {"raw": hint}
        case mi.LiteralType(values=values):
            return values[0]
        case mi.EnumType(cls=cls):
            return next(iter(cls)).value
        case mi.UnionType(types=types):
            concrete = [t for t in types if not isinstance(t, mi.NoneType)]
            return sample_value(concrete[0], hint) if concrete else None
        case mi.ListType(item_type=item) | mi.SetType(item_type=item) | mi.FrozenSetType(item_type=item) | mi.VarTupleType(item_type=item):
            return [sample_value(item, hint)]
        case mi.TupleType(item_types=items):
            return [sample_value(t, f"{hint}[{i}]") for i, t in enumerate(items)]
        case mi.DictType(key_type=key, value_type=value):
            return {str(sample_value(key, f"{hint} key")): sample_value(value, f"{hint} value")}
        case mi.StructType() | mi.DataclassType() | mi.TypedDictType() | mi.NamedTupleType():
            return struct_sample(info)
    raise CannotFill(f"{hint}: {type(info).__name__}")


def struct_sample(info: Any) -> dict[str, Any]:
    """Every field of a struct-like type filled in, with its tag when it has one."""
    obj: dict[str, Any] = {}
    if getattr(info, "tag_field", None) and getattr(info, "tag", None) is not None:
        obj[info.tag_field] = info.tag
    for field in info.fields:
        obj[getattr(field, "encode_name", field.name)] = sample_value(field.type, field.name)
    return obj


def _in_range(ge: Any, gt: Any, le: Any, lt: Any, *, preferred: float, step: float) -> float:
    low = ge if ge is not None else (gt + step if gt is not None else None)
    high = le if le is not None else (lt - step if lt is not None else None)
    if low is not None and high is not None:
        middle = (low + high) / 2
        return round(middle) if step == 1 else middle
    if low is not None:
        return max(preferred, low)
    if high is not None:
        return min(preferred, high)
    return preferred


def envelope_json(kind: str, payload_type: type) -> bytes:
    """The encoded envelope carrying a full sample of `payload_type`."""
    envelope = {
        "id": derived_id(BASE_ID, kind),
        "sender": "golden-sender",
        "payload": struct_sample(mi.type_info(payload_type)),
        "created_at": WHEN,
        "to": "golden-agent",
        "correlation_id": derived_id(BASE_ID, f"{kind}/correlation"),
        "causation_id": derived_id(BASE_ID, f"{kind}/cause"),
        "reply_to": "golden-requester",
        "priority": 7,
        "expires_at": "2026-01-03T03:04:05.678901Z",
        "headers": {"x-golden": kind},
        "v": 1,
    }
    return msgspec.json.encode(envelope)


def main() -> int:
    registry = PayloadRegistry.with_builtins()
    codec = Codec(registry)
    written, failed = [], []
    for kind in registry.kinds():
        path = HERE / f"{kind}.json"
        if path.exists():
            continue  # committed samples are never rewritten
        try:
            data = envelope_json(kind, registry.type_for(kind))  # type: ignore[arg-type]
        except CannotFill as exc:
            failed.append(f"{kind}: cannot fill {exc}; write {path.name} by hand")
            continue
        envelope = codec.decode(data)  # must be valid today, or it is no sample
        if envelope.kind != kind:
            failed.append(f"{kind}: decoded as {envelope.kind}")
            continue
        path.write_bytes(msgspec.json.format(codec.encode(envelope), indent=2) + b"\n")
        written.append(path.name)
    for name in written:
        print(f"wrote tests/golden/{name}")
    for line in failed:
        print(f"error: {line}", file=sys.stderr)
    if not written and not failed:
        print("every registered kind already has a golden sample")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
