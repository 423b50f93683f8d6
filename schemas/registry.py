"""The set of payload types a process understands, and the upcasters that keep old tags readable.

msgspec decodes a tagged union in one pass only when it knows every member up front, so each
process builds one `PayloadRegistry` at start (built-ins plus its own agents' types) and hands
it to the `Codec`. Registries are plain values: no global mutable state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Union

import msgspec

from schemas.envelope import Payload
from schemas.limits import MAX_KIND_CHARS
from schemas.payloads import BUILTIN_PAYLOADS

Upcaster = Callable[[Any], Any]


class SchemaConflict(ValueError):
    """Two different types claim the same `kind` tag, or a type has no tag."""


class PayloadRegistry:
    """Payload types by kind, plus upcasters from retired kinds to their replacements."""

    def __init__(self, types: Iterable[type] = ()) -> None:
        self._by_kind: dict[str, type] = {}
        self._upcasters: dict[type, Upcaster] = {}
        self.register(*types)

    @classmethod
    def with_builtins(cls, *extra: type) -> "PayloadRegistry":
        """A registry of the built-in payloads plus `extra`."""
        return cls((*BUILTIN_PAYLOADS, *extra))

    def register(self, *types: type) -> "PayloadRegistry":
        """Add payload types. Raises SchemaConflict on a missing tag or a reused one."""
        for typ in types:
            if not (isinstance(typ, type) and issubclass(typ, Payload)):
                raise SchemaConflict(f"{typ!r} is not a schemas.Payload subclass")
            tag = typ.__struct_config__.tag
            if not isinstance(tag, str):
                raise SchemaConflict(f"{typ.__name__} needs an explicit tag='...'")
            known = self._by_kind.get(tag)
            if known is not None and known is not typ:
                raise SchemaConflict(
                    f"kind {tag!r} is claimed by both {known.__qualname__} and {typ.__qualname__}"
                )
            self._by_kind[tag] = typ
        return self

    def upcast(self, old: type, to_new: Upcaster) -> "PayloadRegistry":
        """Register `to_new(old_payload) -> new_payload` for a retired type (registered too)."""
        self.register(old)
        self._upcasters[old] = to_new
        return self

    def apply_upcasters(self, payload: Any) -> Any:
        """Run the upcaster chain on `payload` until its type has none."""
        seen: set[type] = set()
        while (fn := self._upcasters.get(type(payload))) is not None:
            if type(payload) in seen:
                raise SchemaConflict(f"upcaster cycle at {type(payload).__qualname__}")
            seen.add(type(payload))
            payload = fn(payload)
        return payload

    @property
    def has_upcasters(self) -> bool:
        return bool(self._upcasters)

    def kinds(self) -> list[str]:
        """Every registered kind, sorted."""
        return sorted(self._by_kind)

    def type_for(self, kind: str) -> type | None:
        """The payload type registered for `kind`, or None."""
        return self._by_kind.get(kind)

    def types(self) -> list[type]:
        """Every registered payload type, in kind order."""
        return [self._by_kind[k] for k in self.kinds()]

    def union(self) -> Any:
        """The tagged union of every registered type, for `Envelope[...]`."""
        types = tuple(self.types())
        if not types:
            raise SchemaConflict("the registry is empty")
        return Union[types] if len(types) > 1 else types[0]  # noqa: UP007 - runtime union


def kind_of_raw(raw: bytes | msgspec.Raw) -> str | None:
    """The `kind` of an undecoded payload (cut to `MAX_KIND_CHARS`: it may come from anyone and
    ends up in records), or None when it has none."""
    try:
        kind = msgspec.json.decode(raw, type=_KindProbe).kind
    except (msgspec.DecodeError, RecursionError):
        return None
    return None if kind is None else kind[:MAX_KIND_CHARS]


class _KindProbe(msgspec.Struct):
    kind: str | None = None
