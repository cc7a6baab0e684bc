"""BlockLayout: which (query block, key block) tiles are active, per head or shared, in CSR form.

A layout lives in *blocks*, not tokens: ``num_query_blocks`` rows of ``Bq`` tokens and
``num_key_blocks`` columns of ``Bk`` tokens (the last row/column may be partial). The sequence
lengths are checked when the layout is used (:meth:`BlockLayout.check_fits`).

Storage (the contract every backend reads, see :mod:`attn_sparse.backends`):

- ``crow_indices: (num_heads * num_query_blocks + 1,) int32`` row offsets; row
  ``h * num_query_blocks + i`` lists the active key blocks of query block ``i`` of head ``h``;
- ``col_indices: (nnz,) int32`` strictly increasing within each row, in ``[0, num_key_blocks)``;
- ``num_heads`` 1 means one layout shared by every query head.

Everything here is O(active blocks) and vectorised (no Python loop over blocks, never an
N x N token mask); the dense bool view (:meth:`BlockLayout.to_dense`) is only built on request.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from attn_core.memo import MISSING, BoundedMemo

from . import library_format
from .csr import crow_from_sorted_rows, expand_intervals, row_ids
from .flex_support import flex_block_mask_class, tile_mask_mod, token_terms
from .tile_index import INT32_MAX

__all__ = [
    "MAX_BLOCK_SIZE",
    "MAX_NUM_BLOCKS",
    "MAX_SEQ_LEN",
    "MIN_BLOCK_SIZE",
    "BlockLayout",
    "check_block_size",
    "check_device",
    "check_geometry",
    "check_seq_len",
]


# Bounds on a layout's geometry, checked by every constructor, pattern and the file loader, so that
# a hostile or mistyped size fails with a ValueError naming it instead of in an allocator.
MIN_BLOCK_SIZE = 16  # the kernels' smallest tile (tl.dot needs >= 16)
MAX_BLOCK_SIZE = 1024  # a tile's logits are Bq x Bk: 1024 x 1024 fp32 is 4 MiB, far above any kernel tile
# Token positions stay int32 (the index dtype of the kernels and of the CSR arrays).
MAX_SEQ_LEN = INT32_MAX
# Query/key blocks per side: row-level arrays (one entry per block row and interval) stay at most
# 128 MiB each (int64); 2**31 tokens at 128-token blocks, 2**28 tokens at 16-token blocks.
MAX_NUM_BLOCKS = 2**24


def check_seq_len(name: str, value: object) -> int:
    """Validate a sequence length in tokens: an int in [1, MAX_SEQ_LEN]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not 1 <= value <= MAX_SEQ_LEN:
        raise ValueError(f"{name} must be in [1, {MAX_SEQ_LEN}] tokens (int32 positions), got {value}")
    return int(value)


def check_geometry(num_heads: int, num_query_blocks: int, num_key_blocks: int) -> None:
    """Raise ValueError unless the block counts are within [1, MAX_NUM_BLOCKS] and the CSR row
    offsets of either orientation (num_heads * blocks + 1 entries) fit int32."""
    for name, value in (("num_query_blocks", num_query_blocks), ("num_key_blocks", num_key_blocks)):
        if not 1 <= value <= MAX_NUM_BLOCKS:
            raise ValueError(f"{name} must be in [1, {MAX_NUM_BLOCKS}], got {value}")
    rows = num_heads * max(num_query_blocks, num_key_blocks)
    if rows >= INT32_MAX:
        raise ValueError(
            f"num_heads={num_heads} x {max(num_query_blocks, num_key_blocks)} blocks = {rows} CSR rows; "
            f"at most {INT32_MAX - 1} (int32 offsets) are supported"
        )


def check_block_size(block_size: object) -> tuple[int, int]:
    """Validate ``block_size``: an int or a pair (Bq, Bk) of powers of two in
    [MIN_BLOCK_SIZE, MAX_BLOCK_SIZE]."""
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        pair: tuple[object, ...] = (block_size, block_size)
    elif isinstance(block_size, (tuple, list)) and len(block_size) == 2:
        pair = tuple(block_size)
    else:
        raise TypeError(f"block_size must be an int or a pair (Bq, Bk) of ints, got {block_size!r}")
    out = []
    for b in pair:
        if isinstance(b, bool) or not isinstance(b, int):
            raise TypeError(f"block_size entries must be ints, got {b!r} in {block_size!r}")
        if not MIN_BLOCK_SIZE <= b <= MAX_BLOCK_SIZE or b & (b - 1):
            raise ValueError(
                f"block sizes must be powers of two in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}] (64 and 128 are "
                f"typical), got {b} in {block_size!r}"
            )
        out.append(int(b))
    return out[0], out[1]


def _check_count(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > INT32_MAX:
        raise ValueError(f"{name} must fit in int32 (<= {INT32_MAX}), got {value}")
    return int(value)


def check_device(device: object) -> torch.device:
    """Validate the device of a layout (a torch.device or a string such as "cpu", "cuda", "cuda:1").

    Raises ValueError for a string that names no device, for the meta device (a layout's arrays
    hold values) and for a CUDA device this process does not have; TypeError for other types."""
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda:0', got {device!r}") from exc
    else:
        raise TypeError(f"device must be a torch.device or a str, got {device!r}")
    if dev.type == "meta":
        raise ValueError("a layout cannot live on the meta device: its CSR arrays must hold values")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise ValueError(f"device {device!r} is not available: this process sees {count} CUDA device(s)")
    return dev


# Derived data a layout keeps (device copies, transposed CSR, one flex BlockMask per (Nq, Nk, token masks)):
# bounded so that calls with many different sequence lengths cannot grow it without limit.
MAX_DERIVED_ENTRIES = 16


class BlockLayout:
    """Active (query block, key block) tiles of block-sparse attention, per head or shared.

    Build one with :meth:`from_dense`, :meth:`from_csr`, :meth:`from_flex_block_mask` or the
    functions of :mod:`attn_sparse.patterns`. Layouts are immutable; methods return new ones.

    Attributes: ``crow_indices`` (num_heads * num_query_blocks + 1,) int32, ``col_indices``
    (nnz,) int32, ``block_size`` (Bq, Bk), ``num_heads`` (1 = shared by all query heads),
    ``num_query_blocks``, ``num_key_blocks``; ``derived_from``: for a layout derived from token
    masks (``layout=None`` calls, :meth:`attn_sparse.masks.TokenMask.layout`), the masks and
    lengths whose tiles it is exactly (:meth:`~attn_sparse.masks.TokenMask.derivation_key`), else None.
    """

    __slots__ = (
        "_cache",
        "_col",
        "_crow",
        "block_size",
        "derived_from",
        "num_heads",
        "num_key_blocks",
        "num_query_blocks",
    )

    def __init__(
        self,
        crow_indices: torch.Tensor,
        col_indices: torch.Tensor,
        *,
        block_size: int | tuple[int, int],
        num_key_blocks: int,
        num_heads: int = 1,
    ) -> None:
        """Same as :meth:`from_csr` (validates everything)."""
        self.block_size = check_block_size(block_size)
        self.num_heads = _check_count("num_heads", num_heads)
        self.num_key_blocks = _check_count("num_key_blocks", num_key_blocks)
        crow, col = self._checked_csr(crow_indices, col_indices, self.num_heads, self.num_key_blocks)
        self.num_query_blocks = (crow.numel() - 1) // self.num_heads
        self._crow, self._col = crow, col
        self._cache = BoundedMemo(MAX_DERIVED_ENTRIES)
        self.derived_from: tuple[object, ...] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_valid_csr(
        cls,
        crow: torch.Tensor,
        col: torch.Tensor,
        block_size: tuple[int, int],
        num_heads: int,
        num_query_blocks: int,
        num_key_blocks: int,
        derived_from: tuple[object, ...] | None = None,
    ) -> BlockLayout:
        """Wrap CSR arrays that are valid by construction (internal builders only; no checks)."""
        self = cls.__new__(cls)
        self.derived_from = derived_from
        self._crow, self._col = crow, col
        self.block_size = block_size
        self.num_heads = num_heads
        self.num_query_blocks = num_query_blocks
        self.num_key_blocks = num_key_blocks
        self._cache = BoundedMemo(MAX_DERIVED_ENTRIES)
        return self

    @staticmethod
    def _checked_csr(
        crow: object, col: object, num_heads: int, num_key_blocks: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for name, t in (("crow_indices", crow), ("col_indices", col)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor of dtype int32 or int64, got {type(t).__name__}")
            if t.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"{name} must have dtype int32 or int64, got {t.dtype}")
            if t.dim() != 1:
                raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
        assert isinstance(crow, torch.Tensor) and isinstance(col, torch.Tensor)  # for mypy; checked above
        if crow.device != col.device:
            raise ValueError(f"crow_indices and col_indices must be on one device, got {crow.device} and {col.device}")
        check_device(crow.device)
        rows = crow.numel() - 1
        if rows < num_heads or rows % num_heads:
            raise ValueError(
                f"crow_indices must have num_heads * num_query_blocks + 1 entries with num_query_blocks >= 1; "
                f"got {crow.numel()} entries for num_heads={num_heads}"
            )
        check_geometry(num_heads, rows // num_heads, num_key_blocks)  # before any O(nnz) work
        c = crow.long()
        if int(c[0]) != 0:
            raise ValueError(f"crow_indices[0] must be 0, got {int(c[0])}")
        if bool((c[1:] < c[:-1]).any()):
            bad = int(torch.nonzero(c[1:] < c[:-1])[0, 0])
            raise ValueError(
                f"crow_indices must be non-decreasing, got crow_indices[{bad + 1}]={int(c[bad + 1])} "
                f"< crow_indices[{bad}]={int(c[bad])}"
            )
        nnz = col.numel()
        if int(c[-1]) != nnz:
            raise ValueError(f"crow_indices[-1] must equal the number of column indices {nnz}, got {int(c[-1])}")
        if nnz > INT32_MAX:
            raise ValueError(f"number of active tiles must fit in int32, got {nnz}")
        k = col.long()
        if nnz:
            lo, hi = int(k.min()), int(k.max())
            if lo < 0 or hi >= num_key_blocks:
                raise ValueError(
                    f"col_indices must lie in [0, num_key_blocks={num_key_blocks}), got values in [{lo}, {hi}]"
                )
            row = row_ids(c, nnz)
            same_row = row[1:] == row[:-1]
            if bool((same_row & (k[1:] <= k[:-1])).any()):
                bad = int(torch.nonzero(same_row & (k[1:] <= k[:-1]))[0, 0])
                raise ValueError(
                    f"col_indices must be strictly increasing within each row (sorted, no duplicates); "
                    f"row {int(row[bad])} has {int(k[bad])} then {int(k[bad + 1])}"
                )
        return c.to(torch.int32), k.to(torch.int32)

    @classmethod
    def from_csr(
        cls,
        crow_indices: torch.Tensor,
        col_indices: torch.Tensor,
        *,
        block_size: int | tuple[int, int],
        num_key_blocks: int,
        num_heads: int = 1,
    ) -> BlockLayout:
        """Layout from CSR arrays, validated: offsets start at 0, never decrease and end at nnz;
        columns in range, strictly increasing per row; int32/int64 dtypes (stored as int32)."""
        return cls(crow_indices, col_indices, block_size=block_size, num_key_blocks=num_key_blocks, num_heads=num_heads)

    @classmethod
    def from_dense(cls, block_mask: torch.Tensor, block_size: int | tuple[int, int] = (128, 128)) -> BlockLayout:
        """Layout from a bool block mask (H or 1, nq, nk) (or (nq, nk), shared by all heads)."""
        bs = check_block_size(block_size)
        if not isinstance(block_mask, torch.Tensor):
            raise TypeError(f"block_mask must be a bool torch.Tensor, got {type(block_mask).__name__}")
        if block_mask.dtype != torch.bool:
            raise TypeError(f"block_mask must have dtype torch.bool, got {block_mask.dtype}")
        check_device(block_mask.device)
        if block_mask.dim() == 2:
            block_mask = block_mask[None]
        if block_mask.dim() != 3 or min(block_mask.shape) == 0:
            raise ValueError(
                f"block_mask must have shape (H or 1, num_query_blocks, num_key_blocks) with no empty dim, "
                f"got {tuple(block_mask.shape)}"
            )
        hl, nq, nk = (int(s) for s in block_mask.shape)
        check_geometry(hl, nq, nk)
        idx = torch.nonzero(block_mask.reshape(hl * nq, nk))  # row-major: sorted by row, then column
        crow = crow_from_sorted_rows(idx[:, 0], hl * nq)
        return cls.from_valid_csr(crow, idx[:, 1].to(torch.int32).contiguous(), bs, hl, nq, nk)

    @classmethod
    def from_intervals(
        cls,
        lo: torch.Tensor,
        hi: torch.Tensor,
        *,
        block_size: tuple[int, int],
        num_heads: int,
        num_query_blocks: int,
        num_key_blocks: int,
        presorted: bool = False,
        clipped: bool = False,
        device: torch.device | None = None,
    ) -> BlockLayout:
        """Layout whose row r is the union of the column intervals ``[lo[r, t], hi[r, t])``.

        lo, hi: (num_heads * num_query_blocks, K) int64, any order, may overlap; empty when
        hi <= lo; clipped to [0, num_key_blocks). O(R * K log K + nnz): the pattern builders'
        one path to CSR (every pattern is a union of per-row column intervals).
        ``presorted``: the caller guarantees lo is non-decreasing along each row (skips the sort).
        ``clipped``: the caller guarantees 0 <= lo <= hi <= num_key_blocks (skips the clipping).
        ``device``: where the layout goes (default lo's device; the intervals are merged where
        they are, see :func:`attn_sparse.csr.row_work_device`).
        """
        if not clipped:
            lo = lo.clamp(0, num_key_blocks)
            hi = torch.maximum(hi.clamp(0, num_key_blocks), lo)
        if lo.shape[1] == 1:  # one interval per row: nothing to merge
            crow, col = expand_intervals(lo, hi - lo, lo.shape[0], device=device)
            return cls.from_valid_csr(crow, col, block_size, num_heads, num_query_blocks, num_key_blocks)
        if not presorted:
            lo, order = torch.sort(lo, dim=1)
            hi = torch.gather(hi, 1, order)
        # Coverage so far: since intervals are sorted by start, the columns of interval t not yet
        # covered by intervals < t are exactly [max(lo_t, max(hi_<t)), hi_t).
        reach = torch.cummax(hi, dim=1).values
        prev = torch.nn.functional.pad(reach[:, :-1], (1, 0))
        start = torch.maximum(lo, prev)
        length = (hi - start).clamp(min=0)
        crow, col = expand_intervals(start, length, lo.shape[0], device=device)
        return cls.from_valid_csr(crow, col, block_size, num_heads, num_query_blocks, num_key_blocks)

    def with_transposed_csr(self, ccol: torch.Tensor, rows: torch.Tensor) -> BlockLayout:
        """Attach the transposed CSR a pattern builder derived from the pattern's structure
        (so :meth:`transposed_csr` needs no sort); returns self. Internal: the caller guarantees it.
        A symmetric tile set (square, Bq == Bk) passes its own arrays."""
        self._cache.put("transposed", (ccol, rows))
        return self

    # ------------------------------------------------------------------ properties
    @property
    def crow_indices(self) -> torch.Tensor:
        """(num_heads * num_query_blocks + 1,) int32 row offsets."""
        return self._crow

    @property
    def col_indices(self) -> torch.Tensor:
        """(nnz,) int32 active key blocks, strictly increasing within each row."""
        return self._col

    @property
    def device(self) -> torch.device:
        return self._crow.device

    @property
    def nnz(self) -> int:
        """Number of active tiles (over all stored heads)."""
        return self._col.numel()

    @property
    def shape(self) -> tuple[int, int, int]:
        """(num_heads, num_query_blocks, num_key_blocks)."""
        return (self.num_heads, self.num_query_blocks, self.num_key_blocks)

    @property
    def density(self) -> float:
        """Active fraction of all tiles (tiles above a causal diagonal count as given)."""
        return self.nnz / (self.num_heads * self.num_query_blocks * self.num_key_blocks)

    @property
    def nbytes(self) -> int:
        """Bytes of memory the CSR arrays keep alive: their storages, each counted once (builders
        allocate both arrays in one buffer, bigbird's with room for an upper bound on the tiles);
        cached derived arrays not included."""
        held = {}
        for t in (self._crow, self._col):
            storage = t.untyped_storage()
            held[storage.data_ptr()] = storage.nbytes()
        return sum(held.values())

    def cached_derived(self, key: Any, build: Any) -> Any:
        """Derived data (device copies, transposed CSR, flex BlockMasks per sequence length), LRU-bounded
        (:class:`attn_core.memo.BoundedMemo`: under torch.compile a miss is built, not stored)."""
        return self._cache.get(key, build)

    def row_counts(self) -> torch.Tensor:
        """(num_heads, num_query_blocks) int32 number of active key blocks per query block."""
        return (self._crow[1:] - self._crow[:-1]).reshape(self.num_heads, self.num_query_blocks)

    def tile_rows(self) -> torch.Tensor:
        """(nnz,) int64 CSR row (head * num_query_blocks + query block) of every tile. Cached."""
        result: torch.Tensor = self.cached_derived("tile_rows", lambda: row_ids(self._crow, self.nnz))
        return result

    @property
    def max_blocks_per_row(self) -> int:
        """Largest number of active key blocks of one query block (0 for an empty layout)."""
        return int(self.cached_derived("max_row", lambda: int(self.row_counts().max())))

    @property
    def max_blocks_per_col(self) -> int:
        """Largest number of active query blocks of one key block (0 for an empty layout)."""
        ccol, _ = self.transposed_csr()
        return int(self.cached_derived("max_col", lambda: int((ccol[1:] - ccol[:-1]).max())))

    # ------------------------------------------------------------------ conversions
    def transposed_csr(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tiles grouped by key block: (ccol_indices (num_heads * num_key_blocks + 1,) int32,
        row_indices (nnz,) int32 query blocks, increasing within each column). Cached."""

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            nq, nk = self.num_query_blocks, self.num_key_blocks
            row = self.tile_rows()
            if self.num_heads == 1:
                qb, colkey = row, self._col
            else:
                head, qb = row // nq, row % nq
                colkey = head * nk + self._col.long()
                if self.num_heads * nk <= INT32_MAX:  # int32 keys sort about twice as fast
                    colkey = colkey.to(torch.int32)
            # tiles are stored row-major, so a *stable* sort by (head, column) keeps rows increasing
            keys, order = torch.sort(colkey, stable=True)
            ccol = crow_from_sorted_rows(keys, self.num_heads * nk)
            return ccol, qb[order].to(torch.int32)

        result: tuple[torch.Tensor, torch.Tensor] = self.cached_derived("transposed", build)
        return result

    def to_dense(self) -> torch.Tensor:
        """(num_heads, num_query_blocks, num_key_blocks) bool mask of the active tiles."""
        dense = torch.zeros(
            self.num_heads * self.num_query_blocks, self.num_key_blocks, dtype=torch.bool, device=self.device
        )
        dense[row_ids(self._crow, self.nnz), self._col.long()] = True
        return dense.reshape(self.shape)

    def to(self, device: torch.device | str) -> BlockLayout:
        """The layout on ``device`` (self if already there; copies are cached per device).

        Raises ValueError/TypeError for a bad device (see :func:`check_device`)."""
        if isinstance(device, torch.device) and device == self.device:  # every call's path: nothing to check
            return self
        dev = check_device(device)
        if dev.type == self.device.type and (dev.index is None or dev == self.device):
            return self

        def build() -> BlockLayout:
            out = BlockLayout.from_valid_csr(
                self._crow.to(dev),
                self._col.to(dev),
                self.block_size,
                self.num_heads,
                self.num_query_blocks,
                self.num_key_blocks,
                derived_from=self.derived_from,
            )
            known = {key: self._cache.peek(key) for key in ("max_row", "max_col", "transposed")}
            known = {key: value for key, value in known.items() if value is not MISSING}
            for key in ("max_row", "max_col"):  # host-side ints stay valid
                if key in known:
                    out._cache.put(key, known[key])
            if "transposed" in known:  # a copy is cheaper than sorting again on the device
                out._cache.put("transposed", tuple(t.to(dev) for t in known["transposed"]))
            return out

        result: BlockLayout = self.cached_derived(("device", str(dev)), build)
        return result

    def expand_heads(self, num_heads: int) -> BlockLayout:
        """A per-head layout with ``num_heads`` heads (a shared layout repeated; self if it matches)."""
        n = _check_count("num_heads", num_heads)
        if n == self.num_heads:
            return self
        check_geometry(n, self.num_query_blocks, self.num_key_blocks)
        if self.num_heads != 1:
            raise ValueError(
                f"cannot expand a layout with {self.num_heads} heads to {n}; only a shared (1-head) layout expands"
            )
        offsets = torch.arange(n, device=self.device, dtype=torch.int64)[:, None] * self.nnz
        crow = torch.cat(
            [torch.zeros(1, dtype=torch.int64, device=self.device), (self._crow[1:].long()[None] + offsets).reshape(-1)]
        )
        return BlockLayout.from_valid_csr(
            crow.to(torch.int32), self._col.repeat(n), self.block_size, n, self.num_query_blocks, self.num_key_blocks
        )

    # ------------------------------------------------------------------ algebra
    def _check_same_geometry(self, other: object, op: str) -> BlockLayout:
        if not isinstance(other, BlockLayout):
            raise TypeError(f"{op} needs another BlockLayout, got {type(other).__name__}")
        mine = (self.block_size, self.num_query_blocks, self.num_key_blocks)
        theirs = (other.block_size, other.num_query_blocks, other.num_key_blocks)
        if mine != theirs:
            raise ValueError(
                f"{op} needs layouts of the same geometry (block_size, num_query_blocks, num_key_blocks); "
                f"got {mine} and {theirs}"
            )
        if self.num_heads != other.num_heads and 1 not in (self.num_heads, other.num_heads):
            raise ValueError(
                f"{op} needs the same num_heads (or one shared layout), got {self.num_heads} and {other.num_heads}"
            )
        if other.device != self.device:
            raise ValueError(f"{op} needs layouts on one device, got {self.device} and {other.device}")
        return other

    def _keys(self, num_heads: int) -> torch.Tensor:
        lay = self.expand_heads(num_heads)
        return row_ids(lay._crow, lay.nnz) * self.num_key_blocks + lay._col.long()

    def _from_keys(self, keys: torch.Tensor, num_heads: int) -> BlockLayout:
        rows = keys // self.num_key_blocks
        crow = crow_from_sorted_rows(rows, num_heads * self.num_query_blocks)
        col = (keys % self.num_key_blocks).to(torch.int32)
        return BlockLayout.from_valid_csr(
            crow, col, self.block_size, num_heads, self.num_query_blocks, self.num_key_blocks
        )

    def union(self, other: BlockLayout) -> BlockLayout:
        """Tiles active in either layout (a shared layout broadcasts over the other's heads)."""
        self._check_same_geometry(other, "union")
        h = max(self.num_heads, other.num_heads)
        keys = torch.unique(torch.cat([self._keys(h), other._keys(h)]), sorted=True)
        return self._from_keys(keys, h)

    def intersection(self, other: BlockLayout) -> BlockLayout:
        """Tiles active in both layouts (a shared layout broadcasts over the other's heads)."""
        self._check_same_geometry(other, "intersection")
        h = max(self.num_heads, other.num_heads)
        both = torch.sort(torch.cat([self._keys(h), other._keys(h)])).values
        # each side has unique keys, so a key present in both appears exactly twice, adjacent
        dup = both[1:] == both[:-1]
        return self._from_keys(both[1:][dup], h)

    __or__ = union
    __and__ = intersection

    def tril(self) -> BlockLayout:
        """The tiles a causal (top-left aligned) call can use: those holding a key at or before
        some query of the tile, i.e. key block start <= query block end. For self-attention this
        equals ``self & patterns.causal(N)`` but costs O(nnz) without building the causal layout."""
        bq, bk = self.block_size
        qb = self.tile_rows() % self.num_query_blocks
        keep = self._col.long() * bk <= (qb + 1) * bq - 1
        return self if bool(keep.all()) else self._subset(keep)

    # ------------------------------------------------------------------ use
    def check_fits(self, seq_len_q: int, seq_len_k: int, num_heads: int) -> None:
        """Raise ValueError unless the layout covers exactly these lengths and heads.

        Needs num_query_blocks == ceil(seq_len_q / Bq), num_key_blocks == ceil(seq_len_k / Bk)
        and num_heads in (1, H)."""
        bq, bk = self.block_size
        want = (-(-seq_len_q // bq), -(-seq_len_k // bk))
        if (self.num_query_blocks, self.num_key_blocks) != want:
            raise ValueError(
                f"layout has {self.num_query_blocks} x {self.num_key_blocks} blocks of {self.block_size}, but "
                f"Nq={seq_len_q}, Nk={seq_len_k} need ceil(Nq/Bq) x ceil(Nk/Bk) = {want[0]} x {want[1]}"
            )
        if self.num_heads not in (1, num_heads):
            raise ValueError(
                f"layout has num_heads={self.num_heads}; the call has H={num_heads} query heads (allowed: 1 or H)"
            )

    # ------------------------------------------------------------------ flex attention
    def to_flex_block_mask(
        self,
        seq_len_q: int,
        seq_len_k: int,
        *,
        is_causal: bool = False,
        window_size: tuple[int, int] | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> Any:
        """torch FlexAttention ``BlockMask`` with these tiles and token masks (batch dim 1, heads = num_heads).

        The token masks are those of :func:`attn_sparse.block_sparse_attention` (``is_causal``,
        ``window_size=(left, right)``, ``cu_seqlens`` int32 (num_docs + 1,) with seq_len_q ==
        seq_len_k); its mask_mod is the tile lookup AND the token masks
        (:func:`attn_sparse.flex_support.tile_mask_mod`). Built from kv_num_blocks/kv_indices
        directly (O(active blocks) work; the index arrays, and the tile lookup its mask_mod reads,
        have flex's (1, heads, nq, nk) block shape). Active tiles entirely inside the token masks
        become "full" blocks (no mask_mod call), tiles the masks cut become "partial" blocks, and
        tiles entirely outside them are dropped (they attend nothing).
        Raises ValueError/TypeError for lengths that do not fit, bad masks, or no FlexAttention.
        """
        bm_cls, reason = flex_block_mask_class()
        if bm_cls is None:
            raise ValueError(f"FlexAttention BlockMask unavailable: {reason}")
        self.check_fits(seq_len_q, seq_len_k, self.num_heads)
        terms = token_terms(
            seq_len_q,
            seq_len_k,
            is_causal=is_causal,
            window_size=window_size,
            cu_seqlens=cu_seqlens,
            device=self.device,
        )
        full, partial = terms.split_tiles(
            self.tile_rows() % self.num_query_blocks, self._col.long(), self.block_size, seq_len_q
        )
        partial_l, full_l = self._subset(partial), self._subset(full)
        kv_num, kv_idx = partial_l._flex_indices(transpose=False)
        fkv_num, fkv_idx = full_l._flex_indices(transpose=False)
        q_num, q_idx = partial_l._flex_indices(transpose=True)
        fq_num, fq_idx = full_l._flex_indices(transpose=True)
        return bm_cls(
            seq_lengths=(seq_len_q, seq_len_k),
            kv_num_blocks=kv_num,
            kv_indices=kv_idx,
            full_kv_num_blocks=fkv_num,
            full_kv_indices=fkv_idx,
            q_num_blocks=q_num,
            q_indices=q_idx,
            full_q_num_blocks=fq_num,
            full_q_indices=fq_idx,
            BLOCK_SIZE=self.block_size,
            mask_mod=tile_mask_mod(self.to_dense(), self.block_size, terms.mask_mod()),
        )

    def _subset(self, keep: torch.Tensor) -> BlockLayout:
        row = row_ids(self._crow, self.nnz)[keep]
        crow = crow_from_sorted_rows(row, self.num_heads * self.num_query_blocks)
        return BlockLayout.from_valid_csr(
            crow,
            self._col[keep].contiguous(),
            self.block_size,
            self.num_heads,
            self.num_query_blocks,
            self.num_key_blocks,
        )

    def _flex_indices(self, *, transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(num (1, Hl, R), idx (1, Hl, R, C)) int32 in flex's ordered format (R rows of C blocks)."""
        hl, nq, nk = self.shape
        if transpose:
            crow, col = self.transposed_csr()
            rows, width = nk, nq
        else:
            crow, col = self._crow, self._col
            rows, width = nq, nk
        counts = (crow[1:] - crow[:-1]).reshape(hl, rows)
        row = row_ids(crow, col.numel())
        pos = torch.arange(col.numel(), device=self.device) - crow[:-1].long()[row]
        idx = torch.zeros(hl * rows, width, dtype=torch.int32, device=self.device)
        idx[row, pos] = col
        return counts[None].contiguous(), idx.reshape(1, hl, rows, width)

    @classmethod
    def from_flex_block_mask(cls, block_mask: Any) -> BlockLayout:
        """Layout of the tiles a FlexAttention ``BlockMask`` visits (partial and full blocks).

        The batch dim must be 1. A mask_mod inside tiles is not representable (only its tile
        structure is kept); pass ``is_causal=True`` at call time for a causal mask_mod.
        """
        names = ("kv_num_blocks", "kv_indices", "BLOCK_SIZE", "seq_lengths")
        if not all(hasattr(block_mask, n) for n in names):
            raise TypeError(f"expected a torch.nn.attention.flex_attention.BlockMask, got {type(block_mask).__name__}")
        bq, bk = check_block_size(tuple(int(b) for b in block_mask.BLOCK_SIZE))
        nqt, nkt = (check_seq_len(f"BlockMask seq_lengths[{i}]", int(s)) for i, s in enumerate(block_mask.seq_lengths))
        nq, nk = -(-nqt // bq), -(-nkt // bk)
        parts = [(block_mask.kv_num_blocks, block_mask.kv_indices)]
        if getattr(block_mask, "full_kv_num_blocks", None) is not None:
            parts.append((block_mask.full_kv_num_blocks, block_mask.full_kv_indices))
        los, his = [], []
        hl = int(block_mask.kv_num_blocks.shape[1])
        for num, idx in parts:
            if num.dim() != 3 or idx.dim() != 4 or num.shape[0] != 1 or idx.shape[:3] != num.shape:
                raise ValueError(
                    f"BlockMask must have batch dim 1 and kv_num_blocks (1, H, nq) / kv_indices (1, H, nq, K); "
                    f"got {tuple(num.shape)} and {tuple(idx.shape)}"
                )
            if num.shape[2] < nq:
                raise ValueError(f"BlockMask has {num.shape[2]} query blocks, its seq_lengths need {nq}")
            num = num[0, :, :nq].reshape(hl * nq, 1).long()
            idx = idx[0, :, :nq].reshape(hl * nq, -1).long()
            valid = torch.arange(idx.shape[1], device=idx.device) < num
            if bool((valid & ((idx < 0) | (idx >= nk))).any()):
                raise ValueError(f"BlockMask kv_indices must lie in [0, {nk}) for seq_lengths {(nqt, nkt)}")
            lo = torch.where(valid, idx, torch.zeros_like(idx))
            los.append(lo)
            his.append(torch.where(valid, idx + 1, torch.zeros_like(idx)))
        check_geometry(hl, nq, nk)
        return cls.from_intervals(
            torch.cat(los, dim=1),
            torch.cat(his, dim=1),
            block_size=(bq, bk),
            num_heads=hl,
            num_query_blocks=nq,
            num_key_blocks=nk,
        )

    # ------------------------------------------------------------------ files
    FILE_ENTRY_NAME = "layout"  # the entry :meth:`save` writes

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write this layout to ``path``: a pattern-library file (:mod:`attn_sparse.library_format`)
        holding one entry named "layout" (kind "custom"), with its digest, written atomically.
        Raises ValueError when ``path`` exists and is not a regular file."""
        entry = library_format.StoredEntry(
            self.FILE_ENTRY_NAME,
            library_format.CUSTOM_KIND,
            "{}",
            self.block_size,
            self.num_heads,
            self.num_query_blocks,
            self.num_key_blocks,
            self._crow,
            self._col,
        )
        library_format.write_file(path, [entry])

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        name: str | None = None,
        device: torch.device | str = "cpu",
        max_bytes: int = library_format.DEFAULT_MAX_BYTES,
    ) -> BlockLayout:
        """The layout stored in ``path`` (written by :meth:`save`, or the entry ``name`` of a
        :class:`attn_sparse.PatternLibrary` file; None: the file must hold exactly one entry),
        on ``device``. Reads with the library's bounded, digest-checked reader; raises ValueError
        for a path that is not a regular file, a file above ``max_bytes``, a format 1 file (no
        digests: read it with ``PatternLibrary.load(path, verify="rebuild")``) and any invalid,
        truncated or tampered content."""
        dev = check_device(device)
        e = library_format.read_entry(path, name=name, max_bytes=max_bytes)
        try:
            layout = cls.from_csr(
                e.crow_indices,
                e.col_indices,
                block_size=e.block_size,
                num_key_blocks=e.num_key_blocks,
                num_heads=e.num_heads,
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid layout file {str(path)!r}: entry {e.name!r}: {exc}") from None
        return layout.to(dev)

    # ------------------------------------------------------------------ dunder
    def __copy__(self) -> BlockLayout:
        return self  # immutable

    def __deepcopy__(self, memo: dict[int, Any]) -> BlockLayout:
        return self  # immutable: modules holding a layout deep-copy cheaply (e.g. cloned encoder layers)

    def __getstate__(self) -> tuple[Any, ...]:
        # the cache is rebuilt on demand
        return (self._crow, self._col, self.block_size, self.num_heads, self.num_query_blocks, self.num_key_blocks)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self._crow, self._col, self.block_size, self.num_heads, self.num_query_blocks, self.num_key_blocks = state
        self._cache = BoundedMemo(MAX_DERIVED_ENTRIES)
        self.derived_from = None  # a loaded layout is a given one

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockLayout):
            return NotImplemented
        if (self.block_size, self.shape, self.nnz) != (other.block_size, other.shape, other.nnz):
            return False
        return bool(torch.equal(self._crow.cpu(), other._crow.cpu()) and torch.equal(self._col.cpu(), other._col.cpu()))

    __hash__ = None  # type: ignore[assignment]  # mutable-free but tensor-backed: compare, do not hash

    def __repr__(self) -> str:
        return (
            f"BlockLayout(num_heads={self.num_heads}, blocks={self.num_query_blocks}x{self.num_key_blocks}, "
            f"block_size={self.block_size}, nnz={self.nnz}, density={self.density:.4f}, device={self.device})"
        )
