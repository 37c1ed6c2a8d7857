"""Where cache entries live: a dict bounded by entries and by bytes, expiring per entry.

This replaces cachetools' ``TLRUCache``, which keeps a heap item, a second dict and a
size dict per key: about 300 bytes of bookkeeping per entry, more than a whole cached
A answer. Here the bookkeeping is the dict slot itself (about 50 bytes):

- **Per-entry expiry.** An entry is dropped once it is past its TTL plus the
  serve-stale window, lazily when it is looked up, and incrementally from the oldest
  end on every insert.
- **Eviction** is CLOCK (second chance), an LRU approximation: a hit sets the entry's
  ``referenced`` flag; the evictor walks from the oldest insertion, moving referenced
  entries to the young end (clearing the flag) and removing the first one that is not.
- **Bounds.** ``max_entries`` entries and ``max_bytes`` by each entry's estimated
  memory cost (:attr:`CacheEntry.size`); an entry larger than ``max_bytes`` is refused.
"""

from __future__ import annotations

from collections.abc import Iterator

from doqproxy.cache.entry import CacheEntry

_SWEEP = 2
"""Expired entries checked at the oldest end on each insert."""


class TooLarge(ValueError):
    """The entry alone is larger than the byte bound."""


class EntryStore:
    """Cache entries by key."""

    __slots__ = ("_data", "currsize", "keep", "max_bytes", "max_entries")

    def __init__(self, max_entries: int, max_bytes: int, keep: float) -> None:
        self._data: dict[bytes, CacheEntry] = {}
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.keep = keep
        """Seconds past its TTL an entry is kept (the serve-stale window)."""
        self.currsize = 0
        """Estimated bytes held."""

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: bytes) -> bool:
        return key in self._data

    def items(self) -> Iterator[tuple[bytes, CacheEntry]]:
        """Oldest insertion first."""
        return iter(list(self._data.items()))

    def get(self, key: bytes, now: float) -> CacheEntry | None:
        """The entry, fresh or within the serve-stale window, or ``None``."""
        entry = self._data.get(key)
        if entry is None:
            return None
        if now >= entry.stored_at + entry.ttl + self.keep:
            self._remove(key)
            return None
        entry.referenced = True
        return entry

    def put(self, key: bytes, entry: CacheEntry, now: float) -> None:
        """Store ``entry``, evicting as the bounds require; raises :class:`TooLarge`."""
        size = entry.size
        if size > self.max_bytes:
            raise TooLarge(f"entry of {size} bytes, the cache holds {self.max_bytes}")
        if key in self._data:
            self._remove(key)
        self._sweep(now)
        data = self._data
        while data and (len(data) >= self.max_entries or self.currsize + size > self.max_bytes):
            self._evict_one()
        data[key] = entry
        self.currsize += size

    def pop(self, key: bytes) -> CacheEntry | None:
        entry = self._data.get(key)
        if entry is not None:
            self._remove(key)
        return entry

    def clear(self) -> None:
        self._data.clear()
        self.currsize = 0

    def _remove(self, key: bytes) -> None:
        self.currsize -= self._data.pop(key).size

    def _sweep(self, now: float) -> None:
        keep = self.keep
        for key, entry in list(_first(self._data, _SWEEP)):
            if now >= entry.stored_at + entry.ttl + keep:
                self._remove(key)

    def _evict_one(self) -> None:
        data = self._data
        for _ in range(len(data)):
            key, entry = next(iter(data.items()))
            if not entry.referenced:
                self._remove(key)
                return
            entry.referenced = False
            del data[key]  # a second chance: to the young end
            data[key] = entry
        self._remove(next(iter(data)))


def _first(data: dict[bytes, CacheEntry], count: int) -> Iterator[tuple[bytes, CacheEntry]]:
    for index, item in enumerate(data.items()):
        if index >= count:
            return
        yield item
