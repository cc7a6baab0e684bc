"""Explicit per-query key intervals: the token masks of one (query rows, key range) call, in local positions.

A sharded call (ring attention) attends a shard of queries to one received set of keys at a
time. The token masks of the whole sequence (:class:`attn_sparse.masks.TokenMask`: causal,
windows, documents) still give each query one interval of *global* key positions; over the keys
of one call, in the order they sit in its buffer (sorted global positions, not necessarily
contiguous), that interval is again one interval of local positions. :class:`KeyIntervals` holds
those local intervals, ``bounds`` (2, Nq) = [lo, hi) per query, and offers what the block-sparse
backends read:

- :meth:`KeyIntervals.key_intervals`: (lo, hi) inclusive, the form ``TokenMask.key_intervals``
  has (the reference backend's gathered attention reads it);
- ``bounds`` itself and :meth:`KeyIntervals.query_bounds` (the same mask seen from the keys:
  [first, end) of the queries that see each key): the two arrays the Triton kernels take
  (:class:`attn_sparse.kernels.KernelMask` ``docs`` and ``key_docs``).

Both rows of ``bounds`` never decrease with the query (as for every TokenMask), so the queries that
see a key are one interval too, and the kernels can split tiles into skipped, masked and unmasked
ones from a tile's first and last rows.
"""

from __future__ import annotations

import torch

from .masks import TokenMask
from .tile_index import INT32_MAX

__all__ = ["KeyIntervals"]


class KeyIntervals:
    """Query i of a call sees its keys ``bounds[0, i] <= j < bounds[1, i]`` (local positions).

    bounds: (2, Nq) integer tensor, 0 <= lo <= hi <= num_keys (lo == hi: the query sees no key),
    both rows non-decreasing; stored as contiguous int32 on its device. num_keys: the call's key
    count Nk (< 2**31). The constructor validates (one host read of four numbers; more only to
    name a bad value); :meth:`from_global` and :meth:`for_shard` build valid intervals without
    host reads.
    """

    __slots__ = ("bounds", "num_keys")

    bounds: torch.Tensor
    num_keys: int

    def __init__(self, bounds: torch.Tensor, num_keys: int) -> None:
        if isinstance(num_keys, bool) or not isinstance(num_keys, int) or not 0 <= num_keys <= INT32_MAX:
            raise ValueError(f"num_keys must be an int in [0, 2**31 - 1], got {num_keys!r}")
        if not isinstance(bounds, torch.Tensor):
            raise TypeError(f"bounds must be a (2, Nq) integer torch.Tensor, got {type(bounds).__name__}")
        if bounds.dtype == torch.bool or bounds.is_floating_point() or bounds.is_complex():
            raise TypeError(f"bounds must be an integer tensor, got dtype {bounds.dtype}")
        if bounds.dim() != 2 or bounds.shape[0] != 2:
            raise ValueError(f"bounds must have shape (2, Nq) ([lo, hi) per query), got {tuple(bounds.shape)}")
        if bounds.shape[1] > 0:
            b = bounds.to(torch.int64)
            lo, hi = b[0], b[1]
            falls = (b[:, 1:] < b[:, :-1]).sum(dim=1)
            lowest, narrowest, highest, lo_falls, hi_falls = torch.stack(
                [lo.min(), (hi - lo).min(), hi.max(), falls[0], falls[1]]
            ).tolist()
            if lowest < 0 or narrowest < 0 or highest > num_keys:
                bad = int(torch.nonzero((lo < 0) | (hi < lo) | (hi > num_keys))[0, 0])
                raise ValueError(
                    f"bounds must hold 0 <= lo <= hi <= num_keys={num_keys} for every query; query {bad} has "
                    f"[lo, hi) = [{int(lo[bad])}, {int(hi[bad])})"
                )
            for row, name, count in ((0, "lo", lo_falls), (1, "hi", hi_falls)):
                if count:
                    bad = int(torch.nonzero(b[row, 1:] < b[row, :-1])[0, 0]) + 1
                    raise ValueError(
                        f"bounds' {name} must be non-decreasing along the queries; query {bad} has {name}="
                        f"{int(b[row, bad])} after {int(b[row, bad - 1])}"
                    )
        self.bounds = bounds.to(torch.int32).contiguous()
        self.num_keys = num_keys

    @classmethod
    def _unchecked(cls, bounds: torch.Tensor, num_keys: int) -> KeyIntervals:
        # bounds valid by construction (int32, contiguous): no validation pass, no host read
        made = cls.__new__(cls)
        made.bounds = bounds
        made.num_keys = num_keys
        return made

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_global(cls, lo: torch.Tensor, hi: torch.Tensor, key_positions: torch.Tensor) -> KeyIntervals:
        """The local intervals of queries whose *global* keys are lo[i] <= p <= hi[i], over the keys
        at global positions ``key_positions``.

        lo, hi: int64 (Nq,), inclusive, both non-decreasing, empty where hi < lo (the form of
        :meth:`TokenMask.key_intervals`, sliced to the call's query rows). key_positions: int64
        (Nk,) strictly increasing global positions of the call's keys, in buffer order. These
        orders are the caller's to keep (they hold for a TokenMask's intervals and any sorted set
        of key blocks; checking them would read the device). Vectorised, no host reads.
        """
        for name, t in (("lo", lo), ("hi", hi), ("key_positions", key_positions)):
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.int64:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a 1-D int64 tensor, got {got}")
        if lo.shape != hi.shape:
            raise ValueError(
                f"lo and hi must have one entry per query, got shapes {tuple(lo.shape)} and {tuple(hi.shape)}"
            )
        if key_positions.numel() > INT32_MAX:
            raise ValueError(f"at most 2**31 - 1 keys per call, got {key_positions.numel()}")
        if not (lo.device == hi.device == key_positions.device):
            raise ValueError(
                f"lo, hi and key_positions must be on one device, got {lo.device}, {hi.device}, {key_positions.device}"
            )
        first = torch.searchsorted(key_positions, lo)  # the first key at or after lo
        end = torch.searchsorted(key_positions, hi, right=True)  # past the last key at or before hi
        # an empty global interval (hi < lo) gives end <= first: clamp to an empty local one
        bounds = torch.stack([torch.minimum(first, end), end]).to(torch.int32)
        return cls._unchecked(bounds, int(key_positions.numel()))

    @classmethod
    def for_shard(
        cls, mask: TokenMask, seq_len: int, query_start: int, num_queries: int, key_positions: torch.Tensor
    ) -> KeyIntervals:
        """The intervals of query rows [query_start, query_start + num_queries) of ``mask`` over a global
        sequence of ``seq_len`` tokens (queries and keys), against the keys at ``key_positions``
        (int64 (Nk,), strictly increasing global positions in buffer order; see :meth:`from_global`).

        Computes the mask's intervals on key_positions' device (O(seq_len), no host reads): a
        caller that builds many calls for the same rows can slice ``mask.key_intervals`` once and
        use :meth:`from_global`.
        """
        if not isinstance(mask, TokenMask):
            raise TypeError(f"mask must be an attn_sparse.masks.TokenMask, got {type(mask).__name__}")
        for name, val in (("seq_len", seq_len), ("query_start", query_start), ("num_queries", num_queries)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                raise ValueError(f"{name} must be an int >= 0, got {val!r}")
        if query_start + num_queries > seq_len:
            raise ValueError(
                f"query rows [{query_start}, {query_start + num_queries}) do not fit a sequence of {seq_len} tokens"
            )
        if not isinstance(key_positions, torch.Tensor):
            raise TypeError(f"key_positions must be a 1-D int64 torch.Tensor, got {type(key_positions).__name__}")
        lo, hi = mask.key_intervals(seq_len, seq_len, key_positions.device)
        rows = slice(query_start, query_start + num_queries)
        return cls.from_global(lo[rows], hi[rows], key_positions)

    # ------------------------------------------------------------------ what the backends read
    @property
    def banded(self) -> bool:
        """Always True: explicit intervals mask per element (the attribute TokenMask offers too)."""
        return True

    @property
    def num_queries(self) -> int:
        return int(self.bounds.shape[1])

    @property
    def device(self) -> torch.device:
        return self.bounds.device

    def check_fits(self, seq_len_q: int, seq_len_k: int) -> None:
        """ValueError unless these intervals describe a call with ``seq_len_q`` queries and at most
        ``seq_len_k`` keys (no interval reaches past them)."""
        if self.num_queries != seq_len_q or self.num_keys > seq_len_k:
            raise ValueError(
                f"key intervals for {self.num_queries} queries over {self.num_keys} keys do not fit a call with "
                f"Nq={seq_len_q} queries and Nk={seq_len_k} keys (need Nq queries and at most Nk keys)"
            )

    def to(self, device: torch.device) -> KeyIntervals:
        """These intervals on ``device`` (self when already there)."""
        if self.bounds.device == device:
            return self
        return KeyIntervals._unchecked(self.bounds.to(device), self.num_keys)

    def key_intervals(
        self, seq_len_q: int, seq_len_k: int, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) int64 (seq_len_q,): query i sees keys lo[i] <= j <= hi[i] (empty when hi < lo), on
        ``device`` (default: the bounds' device); the form of :meth:`TokenMask.key_intervals`."""
        self.check_fits(seq_len_q, seq_len_k)
        b = self.bounds.to(device if device is not None else self.bounds.device, torch.int64)
        return b[0], b[1] - 1

    def query_bounds(self, seq_len_k: int) -> torch.Tensor:
        """(2, seq_len_k) int32 contiguous: key j is seen by queries first[j] <= i < end[j].

        first = the queries whose hi <= j (they end before j), end = the queries whose lo <= j:
        exact because lo and hi never decrease. Keys past num_keys are seen by none. Both rows are
        non-decreasing (the kernels' key-side bounds). Vectorised, no host reads."""
        if isinstance(seq_len_k, bool) or not isinstance(seq_len_k, int) or seq_len_k < self.num_keys:
            raise ValueError(f"seq_len_k must be an int >= num_keys={self.num_keys}, got {seq_len_k!r}")
        b = self.bounds.to(torch.int64)
        j = torch.arange(seq_len_k, device=b.device)
        first = torch.searchsorted(b[1].contiguous(), j, right=True)
        end = torch.searchsorted(b[0].contiguous(), j, right=True)
        return torch.stack([first, end]).to(torch.int32)

    def with_causal(self) -> KeyIntervals:
        """These intervals with the causal mask folded in: query i also sees no key after local
        position i (hi = min(hi, i + 1), top-left aligned). Vectorised, no host reads."""
        lo, hi = self.bounds[0], self.bounds[1]
        hi = torch.minimum(hi, torch.arange(1, self.num_queries + 1, device=hi.device, dtype=hi.dtype))
        return KeyIntervals._unchecked(torch.stack([torch.minimum(lo, hi), hi]).contiguous(), self.num_keys)

    def dense(self, seq_len_k: int | None = None) -> torch.Tensor:
        """(Nq, seq_len_k) bool, True where query i sees key j (tests and small references);
        seq_len_k defaults to num_keys."""
        nk = self.num_keys if seq_len_k is None else seq_len_k
        lo, hi = self.key_intervals(self.num_queries, nk)
        j = torch.arange(nk, device=lo.device)
        return (j[None, :] >= lo[:, None]) & (j[None, :] <= hi[:, None])

    def __repr__(self) -> str:
        return f"KeyIntervals(num_queries={self.num_queries}, num_keys={self.num_keys}, device={self.device})"
