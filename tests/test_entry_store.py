"""Unit tests for doqproxy.cache.store.EntryStore (no sockets)."""

from __future__ import annotations

import pytest

from doqproxy.cache.entry import CacheEntry
from doqproxy.cache.store import EntryStore, TooLarge


def entry(ttl: int = 60, stored_at: float = 0.0, size: int = 0) -> CacheEntry:
    return CacheEntry(
        head=b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00",
        template=b"x" * size,
        ttl_offsets=(),
        opt=b"",
        ttl=ttl,
        stored_at=stored_at,
        nx_by_name=False,
    )


def test_get_keeps_entries_through_the_stale_window_then_drops_them() -> None:
    store = EntryStore(max_entries=10, max_bytes=10**6, keep=100)
    store.put(b"k", entry(ttl=60), now=0)
    assert store.get(b"k", now=59) is not None
    assert store.get(b"k", now=159) is not None  # stale but kept
    assert store.get(b"k", now=160) is None
    assert len(store) == 0 and store.currsize == 0


def test_clock_gives_referenced_entries_a_second_chance() -> None:
    store = EntryStore(max_entries=3, max_bytes=10**6, keep=0)
    for key in (b"a", b"b", b"c"):
        store.put(key, entry(), now=0)
    assert store.get(b"a", now=1) is not None  # a is referenced
    store.put(b"d", entry(), now=1)  # evicts b, not a
    assert b"a" in store and b"b" not in store
    store.put(b"e", entry(), now=1)  # a lost its flag when it was passed; c goes first
    assert b"c" not in store and b"a" in store


def test_byte_bound_and_too_large() -> None:
    one = entry(size=100).size
    store = EntryStore(max_entries=100, max_bytes=3 * one, keep=0)
    for index in range(10):
        store.put(bytes([index]), entry(size=100), now=0)
        assert store.currsize <= 3 * one
    assert len(store) == 3
    with pytest.raises(TooLarge):
        store.put(b"big", entry(size=10 * one), now=0)


def test_insert_sweeps_expired_entries_at_the_old_end() -> None:
    store = EntryStore(max_entries=100, max_bytes=10**6, keep=0)
    store.put(b"old1", entry(ttl=1), now=0)
    store.put(b"old2", entry(ttl=1), now=0)
    store.put(b"new", entry(ttl=60), now=5)
    assert len(store) == 1 and b"new" in store


def test_replacing_keeps_the_byte_count_right() -> None:
    store = EntryStore(max_entries=10, max_bytes=10**6, keep=0)
    store.put(b"k", entry(size=10), now=0)
    store.put(b"k", entry(size=50), now=0)
    assert store.currsize == entry(size=50).size
    assert store.pop(b"k") is not None and store.currsize == 0
