"""A bounded in-memory cache whose entries expire: the one mechanism behind the
DNS cache, the SPF result cache and the per-message memory.

Least recently used entries are evicted first once ``max_entries`` is reached;
expired entries are dropped when they are next looked at. The clock is
injectable so tests can move time instead of sleeping.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlLruCache(Generic[K, V]):
    """Mapping of key to (value, expiry) with an entry bound and LRU eviction."""

    __slots__ = ("_clock", "_data", "evictions", "expirations", "max_entries")

    def __init__(self, max_entries: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self.max_entries = max_entries
        self._clock = clock
        self._data: OrderedDict[K, tuple[V, float]] = OrderedDict()
        self.evictions = 0
        self.expirations = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: K) -> V | None:
        """The live value for ``key``, or None (expired entries are removed)."""
        item = self._data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires <= self._clock():
            del self._data[key]
            self.expirations += 1
            return None
        self._data.move_to_end(key)
        return value

    def remaining_ttl(self, key: K) -> float | None:
        """Seconds ``key`` stays valid, or None when absent or expired."""
        item = self._data.get(key)
        if item is None:
            return None
        left = item[1] - self._clock()
        return left if left > 0 else None

    def set(self, key: K, value: V, ttl: float) -> None:
        """Store ``value`` for ``ttl`` seconds; a ttl <= 0 stores nothing."""
        if ttl <= 0 or self.max_entries == 0:
            self._data.pop(key, None)
            return
        data = self._data
        data[key] = (value, self._clock() + ttl)
        data.move_to_end(key)
        while len(data) > self.max_entries:
            data.popitem(last=False)
            self.evictions += 1

    def pop(self, key: K) -> V | None:
        item = self._data.pop(key, None)
        return None if item is None else item[0]

    def clear(self) -> None:
        self._data.clear()
