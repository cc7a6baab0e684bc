"""Memos of derived data per set of tensors, found from their storage.

:class:`StorageMemo`: one :class:`attn_core.memo.BoundedMemo` per set of tensors (the kernels'
launch tables, which eager calls reach through the layout and the custom ops from the raw CSR
tensors they receive).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from attn_core.memo import BoundedMemo

__all__ = ["StorageMemo"]


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
