"""A small thread-safe LRU memo of derived data, bounded by its number of entries.

:class:`BoundedMemo` holds the package family's caches of plans and launch tables (the gathered
executor's plans, the ring's kernel tables, attn-sparse's layouts and their device data).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["MISSING", "BoundedMemo"]

# what peek returns for an absent key (None can be a memoised value)
MISSING = object()


class BoundedMemo:
    """At most ``max_entries`` values, least recently used dropped first.

    :meth:`get` builds a missing value outside the lock (other lookups proceed; when two threads
    build the same key, the first stored value wins). Under torch.compile, which cannot trace a
    lock, a hit is read without it (values are only ever replaced whole, under it) and a miss is
    built in the graph and not stored: eager calls fill the memo.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, build: Callable[[], Any]) -> Any:
        """The value under ``key``, built by ``build()`` and stored on a miss."""
        if torch.compiler.is_compiling():
            hit = self._items.get(key, MISSING)
            return build() if hit is MISSING else hit
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = build()
        with self._lock:
            value = self._items.setdefault(key, value)
            self._items.move_to_end(key)
            self._evict()
            return value

    def peek(self, key: Any) -> Any:
        """The value under ``key`` or :data:`MISSING` (nothing built, no LRU update)."""
        if torch.compiler.is_compiling():
            return self._items.get(key, MISSING)
        with self._lock:
            return self._items.get(key, MISSING)

    def put(self, key: Any, value: Any) -> None:
        """Store ``value`` under ``key`` (replacing any)."""
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            self._evict()

    def clear(self) -> None:
        """Drop every value."""
        with self._lock:
            self._items.clear()

    def _evict(self) -> None:
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return self.peek(key) is not MISSING

    def __getitem__(self, key: Any) -> Any:
        value = self.peek(key)
        if value is MISSING:
            raise KeyError(key)
        return value

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
