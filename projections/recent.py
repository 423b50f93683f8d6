"""A bounded map that keeps the most recently used entries: what the query service remembers per
SQL text (clients repeat the same SQL with new parameters). Not thread-safe: the owner locks."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

_MISSING = object()


class Recent(Generic[K, V]):
    """At most `size` entries; looking one up or adding it makes it the newest, and the oldest
    goes when there are too many."""

    def __init__(self, size: int) -> None:
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._size = size

    def lookup(self, key: K) -> tuple[bool, V | None]:
        """`(True, value)` if `key` is held, else `(False, None)`."""
        value = self._entries.get(key, _MISSING)
        if value is _MISSING:
            return False, None
        self._entries.move_to_end(key)
        return True, value  # type: ignore[return-value]

    def add(self, key: K, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
