"""A bounded in-memory cache whose entries expire: the one mechanism behind the
DNS cache, the SPF result cache, the per-message memory and the verdict memo.

Least recently used entries are evicted first once ``max_entries`` is reached;
expired entries are dropped when they are next looked at. The clock is
injectable so tests can move time instead of sleeping.

Memory matters here (the DNS cache holds 100,000 entries by default):
- the entries live in a plain dict, whose insertion order is the recency
  order: a hit moves its entry to the end by taking it out and putting it
  back. An OrderedDict does the same with about twice the bytes per entry
  (a linked list node and an index slot on top of the dict's own);
- every removal, and every such move, leaves a freed slot in the dict's
  table, and when those run out CPython rebuilds the table for three times
  the live entries: a cache churning at its bound would sit in a table twice
  the size it needs, and briefly hold two of them while it is rebuilt. So
  once removals reach half the live entries the cache copies its dict, which
  packs the table for the live entries alone;
- how an entry is held is left to three small methods, so a subclass can
  pack its values (``dns.DnsCache`` does).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from itertools import islice
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlLruCache(Generic[K, V]):
    """Mapping of key to (value, expiry) with an entry bound and LRU eviction."""

    __slots__ = ("_batch", "_clock", "_data", "_freed", "evictions", "expirations", "max_entries")

    def __init__(self, max_entries: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self.max_entries = max_entries
        self._clock = clock
        self._data: dict[Hashable, Any] = {}
        self._freed = 0  # slots freed in the dict's table since it was packed
        # The oldest entries are found by iterating the dict from its start,
        # past the slots freed there since it was last packed: a full cache
        # evicts 1/256 of its bound at a time, so it walks those once per
        # batch rather than once per entry.
        self._batch = max(1, max_entries >> 8)
        self.evictions = 0
        self.expirations = 0

    # -- how an entry is held: (value, expiry) unless a subclass packs it ------

    def _slot(self, key: K) -> Hashable:
        return key

    def _pack(self, value: V, expires: float) -> Any:
        return (value, expires)

    def _unpack(self, item: Any) -> tuple[V, float]:
        return item

    # -- the mapping ---------------------------------------------------------

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: K) -> V | None:
        """The live value for ``key``, or None (expired entries are removed)."""
        data = self._data
        slot = self._slot(key)
        item = data.pop(slot, None)
        if item is None:
            return None
        self._freed += 1
        value, expires = self._unpack(item)
        if expires <= self._clock():
            self.expirations += 1
            return None
        data[slot] = item  # now the most recently used
        if self._freed > len(data) >> 1:
            self._pack_table()
        return value

    def remaining_ttl(self, key: K) -> float | None:
        """Seconds ``key`` stays valid, or None when absent or expired."""
        item = self._data.get(self._slot(key))
        if item is None:
            return None
        left = self._unpack(item)[1] - self._clock()
        return left if left > 0 else None

    def set(self, key: K, value: V, ttl: float) -> None:
        """Store ``value`` for ``ttl`` seconds; a ttl <= 0 stores nothing."""
        data = self._data
        slot = self._slot(key)
        if data.pop(slot, None) is not None:
            self._freed += 1
        if ttl <= 0 or self.max_entries == 0:
            return
        data[slot] = self._pack(value, self._clock() + ttl)
        excess = len(data) - self.max_entries
        if excess > 0:
            oldest = list(islice(data, max(excess, self._batch)))
            for old in oldest:
                del data[old]
            self.evictions += len(oldest)
            self._freed += len(oldest)
        if self._freed > len(data) >> 1:
            self._pack_table()

    def pop(self, key: K) -> V | None:
        item = self._data.pop(self._slot(key), None)
        if item is None:
            return None
        self._freed += 1
        return self._unpack(item)[0]

    def clear(self) -> None:
        self._data = {}
        self._freed = 0

    def _pack_table(self) -> None:
        # dict(d) sizes the copy's table for len(d) entries (CPython 3.11:
        # 2^18 slots for 100,000 string keys, 3.8 MB, where the churned
        # original reaches 2^19, 7.7 MB).
        self._data = dict(self._data)
        self._freed = 0
