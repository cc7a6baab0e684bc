"""Typed attention buffer managers on top of any buffer provider.

A provider is anything with ``acquire(shape, dtype, device) -> Tensor`` and
``release(tensor) -> None`` -- a :class:`~memory_runtime.pools.DeviceBufferPool`, a
:class:`~memory_runtime.pinned.PinnedHostArena`, or :class:`TorchProvider` (plain torch.empty).

- :class:`KVCacheBlocks`: a paged KV cache (fixed-size token blocks, per-sequence block tables).
- :class:`RingDoubleBuffers`: two slots of ring communication buffers (compute on one slot while
  the next block arrives in the other), swapped each step.
- :class:`Workspace`: named scratch buffers reused across calls, grown when a larger one is asked for.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from .checks import MAX_DIM, check_count, check_dtype, normalize_shape, request_nbytes, resolve_device

__all__ = ["BufferProvider", "KVCacheBlocks", "KVCacheFullError", "RingDoubleBuffers", "TorchProvider", "Workspace"]


@runtime_checkable
class BufferProvider(Protocol):
    """The provider protocol (attn-ring accepts the same)."""

    def acquire(self, shape: Sequence[int], dtype: torch.dtype, device: Any) -> torch.Tensor: ...

    def release(self, tensor: torch.Tensor) -> None: ...


class TorchProvider:
    """Provider backed by torch.empty (the caching allocator); release drops the reference."""

    def acquire(self, shape: Sequence[int], dtype: torch.dtype, device: Any) -> torch.Tensor:
        shape_t = normalize_shape(shape)
        dtype = check_dtype(dtype)
        request_nbytes(shape_t, dtype)  # bounded: a clear error instead of torch's overflow
        return torch.empty(shape_t, dtype=dtype, device=device)

    def release(self, tensor: torch.Tensor) -> None:
        return None


def _check_provider(provider: Any) -> Any:
    if provider is None:
        return TorchProvider()
    if not isinstance(provider, BufferProvider):
        raise TypeError(
            f"provider must have acquire(shape, dtype, device) and release(tensor), got {type(provider).__name__}"
        )
    return provider


class KVCacheFullError(MemoryError):
    """Not enough free KV blocks for the request."""


class KVCacheBlocks:
    """Paged KV cache: ``num_blocks`` blocks of ``block_size`` tokens shared by many sequences.

    Storage: ``k_cache``, ``v_cache`` of shape (num_layers, num_blocks, block_size, Hkv, D), taken
    from the provider once. Each sequence owns a list of block ids (its block table); token t of a
    sequence lives in block ``table[t // block_size]`` at row ``t % block_size``.
    Thread-safe bookkeeping (one lock); writes to the tensors are the caller's to order.
    """

    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
        num_layers: int = 1,
        provider: BufferProvider | None = None,
    ) -> None:
        self.num_blocks = check_count(num_blocks, "num_blocks", minimum=1, maximum=MAX_DIM)
        self.block_size = check_count(block_size, "block_size", minimum=1, maximum=MAX_DIM)
        self.num_kv_heads = check_count(num_kv_heads, "num_kv_heads", minimum=1, maximum=MAX_DIM)
        self.head_dim = check_count(head_dim, "head_dim", minimum=1, maximum=MAX_DIM)
        self.num_layers = check_count(num_layers, "num_layers", minimum=1, maximum=MAX_DIM)
        self.dtype = check_dtype(dtype)
        self.device = resolve_device(device)
        self._provider = _check_provider(provider)
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k_cache = self._provider.acquire(shape, dtype, self.device)
        self.v_cache = self._provider.acquire(shape, dtype, self.device)
        self._lock = threading.Lock()
        self._free = list(range(num_blocks - 1, -1, -1))  # stack: lowest ids handed out first
        self._tables: dict[Hashable, list[int]] = {}
        self._lengths: dict[Hashable, int] = {}
        self._closed = False

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def sequences(self) -> list[Hashable]:
        with self._lock:
            return list(self._tables)

    def _blocks_for(self, tokens: int) -> int:
        return (tokens + self.block_size - 1) // self.block_size

    def allocate(self, seq_id: Hashable, num_tokens: int) -> list[int]:
        """Start sequence ``seq_id`` with room for ``num_tokens`` tokens; returns its block ids."""
        num_tokens = check_count(num_tokens, "num_tokens", maximum=MAX_DIM)
        with self._lock:
            self._check_open()
            if seq_id in self._tables:
                raise ValueError(f"sequence {seq_id!r} is already allocated; extend() it or free() it first")
            need = self._blocks_for(num_tokens)
            self._reserve_locked(seq_id, need)
            self._tables[seq_id] = [self._free.pop() for _ in range(need)]
            self._lengths[seq_id] = num_tokens
            return list(self._tables[seq_id])

    def extend(self, seq_id: Hashable, num_tokens: int) -> list[int]:
        """Grow sequence ``seq_id`` by ``num_tokens`` tokens; returns the newly added block ids."""
        num_tokens = check_count(num_tokens, "num_tokens", maximum=MAX_DIM)
        with self._lock:
            self._check_open()
            table = self._table_locked(seq_id)
            new_len = self._lengths[seq_id] + num_tokens
            need = self._blocks_for(new_len) - len(table)
            self._reserve_locked(seq_id, need)
            added = [self._free.pop() for _ in range(need)]
            table.extend(added)
            self._lengths[seq_id] = new_len
            return added

    def free(self, seq_id: Hashable) -> None:
        """Return a sequence's blocks; ValueError if it is not allocated (e.g. freed twice)."""
        with self._lock:
            self._check_open()
            table = self._table_locked(seq_id)
            self._free.extend(reversed(table))
            del self._tables[seq_id]
            del self._lengths[seq_id]

    def length(self, seq_id: Hashable) -> int:
        with self._lock:
            self._table_locked(seq_id)
            return self._lengths[seq_id]

    def block_table(self, seq_id: Hashable) -> torch.Tensor:
        """Block ids of ``seq_id`` as an int32 tensor on the cache's device."""
        with self._lock:
            table = list(self._table_locked(seq_id))
        return torch.tensor(table, dtype=torch.int32, device=self.device)

    def _slots(self, seq_id: Hashable, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            self._check_open()
            table = self._table_locked(seq_id)
            length = self._lengths[seq_id]
            start = check_count(start, "start", maximum=MAX_DIM)
            if start + n > length:
                raise ValueError(
                    f"tokens [{start}, {start + n}) are outside sequence {seq_id!r} of length {length}; extend() first"
                )
            ids = torch.tensor(table, dtype=torch.long, device=self.device)
        pos = torch.arange(start, start + n, device=self.device)
        return ids[pos // self.block_size], pos % self.block_size

    def write(self, seq_id: Hashable, start: int, k: torch.Tensor, v: torch.Tensor, *, layer: int = 0) -> None:
        """Store ``k``, ``v`` of shape (n, Hkv, D) as tokens start..start+n-1 of ``seq_id``."""
        want = (self.num_kv_heads, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
            if t.dim() != 3 or tuple(t.shape[1:]) != want:
                raise ValueError(f"{name} must have shape (n, {want[0]}, {want[1]}), got {tuple(t.shape)}")
            if t.dtype != self.dtype:
                raise TypeError(f"{name} has dtype {t.dtype}; this cache holds {self.dtype}")
        if k.shape != v.shape:
            raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
        layer = self._check_layer(layer)
        blocks, rows = self._slots(seq_id, start, k.shape[0])
        self.k_cache[layer, blocks, rows] = k.to(self.device)
        self.v_cache[layer, blocks, rows] = v.to(self.device)

    def read(self, seq_id: Hashable, *, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather ``seq_id``'s keys and values as (length, Hkv, D) tensors (copies)."""
        layer = self._check_layer(layer)
        blocks, rows = self._slots(seq_id, 0, self.length(seq_id))
        return self.k_cache[layer, blocks, rows], self.v_cache[layer, blocks, rows]

    def close(self) -> None:
        """Give the cache tensors back to the provider."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._provider.release(self.k_cache)
            self._provider.release(self.v_cache)

    def _check_layer(self, layer: int) -> int:
        return check_count(layer, "layer", maximum=self.num_layers - 1)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("KVCacheBlocks is closed")

    def _table_locked(self, seq_id: Hashable) -> list[int]:
        table = self._tables.get(seq_id)
        if table is None:
            raise ValueError(f"sequence {seq_id!r} is not allocated (never allocated, or already freed)")
        return table

    def _reserve_locked(self, seq_id: Hashable, need: int) -> None:
        if need > len(self._free):
            raise KVCacheFullError(
                f"sequence {seq_id!r} needs {need} more block(s) of {self.block_size} tokens; "
                f"{len(self._free)} of {self.num_blocks} are free"
            )


class RingDoubleBuffers:
    """Two slots of ring buffers: at step i compute on (and send) slot i % 2 while slot (i+1) % 2 receives.

    Args:
        shapes: one shape per buffer in a slot, e.g. ``[(B, n, Hkv, D)] * 2`` for K and V.
    """

    def __init__(
        self,
        shapes: Sequence[Sequence[int]],
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
        *,
        provider: BufferProvider | None = None,
    ) -> None:
        if not isinstance(shapes, (list, tuple)) or not shapes:
            raise ValueError(f"shapes must be a non-empty list of shapes, got {shapes!r}")
        self.shapes = [normalize_shape(s) for s in shapes]
        self.dtype = check_dtype(dtype)
        self.device = resolve_device(device)
        self._provider = _check_provider(provider)
        self._slots = [tuple(self._provider.acquire(s, dtype, self.device) for s in self.shapes) for _ in range(2)]
        self.step = 0
        self._closed = False

    @property
    def current(self) -> tuple[torch.Tensor, ...]:
        """Buffers holding this step's block (compute on them, send them on)."""
        self._check_open()
        return self._slots[self.step % 2]

    @property
    def next(self) -> tuple[torch.Tensor, ...]:
        """Buffers receiving the next step's block."""
        self._check_open()
        return self._slots[(self.step + 1) % 2]

    def swap(self) -> None:
        """Advance one ring step: the received buffers become current."""
        self._check_open()
        self.step += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for slot in self._slots:
            for t in slot:
                self._provider.release(t)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("RingDoubleBuffers is closed")


class Workspace:
    """Named scratch buffers, reused across calls and grown (never shrunk) on demand.

    ``get(name, shape, dtype)`` returns a view of the byte buffer named ``name``; a later request
    under the same name reuses it if it is large enough. A view stays valid until the next
    ``get`` of the same name (which may move the buffer) or ``release_all()``; contents are
    undefined between calls.
    """

    def __init__(self, device: str | torch.device = "cpu", *, provider: BufferProvider | None = None) -> None:
        self.device = resolve_device(device)
        self._provider = _check_provider(provider)
        self._buffers: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._buffers.values())

    def get(self, name: str, shape: Sequence[int] | int, dtype: torch.dtype) -> torch.Tensor:
        if not isinstance(name, str) or not name:
            raise ValueError(f"workspace name must be a non-empty str, got {name!r}")
        shape_t = normalize_shape(shape)
        dtype = check_dtype(dtype)
        nbytes = request_nbytes(shape_t, dtype)
        with self._lock:
            buf = self._buffers.get(name)
            if buf is None or buf.numel() < nbytes:
                if buf is not None:
                    self._provider.release(buf)
                    del self._buffers[name]
                buf = self._buffers[name] = self._provider.acquire((max(nbytes, 1),), torch.uint8, self.device)
        return buf[:nbytes].view(dtype).view(shape_t)

    def release_all(self) -> None:
        """Give every buffer back to the provider."""
        with self._lock:
            for buf in self._buffers.values():
                self._provider.release(buf)
            self._buffers.clear()
