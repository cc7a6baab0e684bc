"""Small thread-safe LRU memos of derived data, bounded by their number of entries.

:class:`BoundedMemo` holds the package family's caches of plans and launch tables (the gathered
executor's plans, the ring's kernel tables, attn-sparse's layouts and their device data).
:class:`StorageMemo` keeps one per set of tensors, found from their storage (attn-sparse's launch
tables, the host copies of ``cu_seqlens``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ["MISSING", "BoundedMemo", "StorageMemo"]

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


class StorageMemo:
    """A :class:`BoundedMemo` of ``max_derived`` entries per set of tensors, for at most
    ``max_sets`` sets (least recently used dropped first).

    Keyed by the tensors' storage and view geometry, not by tensor objects: the compiled backward
    receives saved tensors as new tensor objects on every call, over the same storage. An entry is
    valid only while those storages are alive (weak references, so memory a freed tensor leaves to
    another never hits a stale entry) and unmodified (version counters, which views share).
    """

    def __init__(self, max_sets: int, max_derived: int) -> None:
        self.max_sets = max_sets
        self.max_derived = max_derived
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[Any, ...], tuple[tuple[Any, ...], tuple[int, ...], BoundedMemo]]
        self._entries = OrderedDict()

    def memo_for(
        self, tensors: tuple[torch.Tensor, ...], extra_key: tuple[Any, ...]
    ) -> Callable[[Any, Callable[[], Any]], Any] | None:
        """The (key, build) -> value memo of these tensors (and ``extra_key``); None under
        torch.compile (which cannot trace weak references or a lock: the ops look it up when they
        run). Inference tensors keep no version counter: they get a new memo, not stored here (a
        caller that keeps it, a layout, still memoises)."""
        if torch.compiler.is_compiling():
            return None
        try:
            versions = tuple(t._version for t in tensors)
        except RuntimeError:
            return BoundedMemo(self.max_derived).get
        refs = tuple(StorageWeakRef(t.untyped_storage()) for t in tensors)
        views = tuple((r.cdata, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype) for r, t in zip(refs, tensors))
        key = (*views, extra_key)
        with self._lock:
            entry = self._entries.get(key)
            # a live weak reference pins its storage's address, so a matching key is that storage
            if entry is None or entry[1] != versions or any(r.expired() for r in entry[0]):
                entry = (refs, versions, BoundedMemo(self.max_derived))
                self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_sets:
                self._entries.popitem(last=False)
        return entry[2].get

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
