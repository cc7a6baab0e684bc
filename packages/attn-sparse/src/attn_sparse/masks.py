"""Token-level masks inside the tiles: causal, sliding windows and packed documents.

Every mask here keeps, for query ``i``, one interval of keys ``lo_i <= j <= hi_i``::

    lo_i = max(i - left, doc_start(i), 0)
    hi_i = min(i + right, doc_end(i) - 1, Nk - 1)

``window_size=(left, right)`` in tokens follows flash-attn (-1 = unbounded on that side, the term
is dropped); ``is_causal`` is the window's right side capped at 0 (top-left aligned, like SDPA);
``cu_seqlens`` (int32 (num_docs + 1,), B == 1, Nq == Nk) adds the document terms, so causal masks
and windows count inside each document. Seen from key ``j``, the queries that see it are the
interval ``max(j - right, doc_start(j)) <= i <= min(j + left, doc_end(j) - 1)``.

``lo_i`` and ``hi_i`` never decrease with ``i`` (nor do the key-side bounds with ``j``). So the keys
a tile of queries can see are one interval (its first row's ``lo`` to its last row's ``hi``), and the
keys every row of it sees are another (its last row's ``lo`` to its first row's ``hi``): the
kernels split each layout row into skipped, masked and unmasked tiles with four numbers, and only
the masked ones (the band's edges) evaluate the mask per element. :meth:`TokenMask.layout`
derives the tiles of a call that gives no layout: one interval of key blocks per query block.
"""

from __future__ import annotations

from typing import Any

import torch

from attn_core.memo import BoundedMemo, StorageMemo
from attn_core.packing import document_positions, host_offsets, host_to_device
from attn_core.validation import check_bool, check_cu_seqlens, check_window_size, cu_seqlens_on_host, indexed_device

from .csr import band_csr
from .flex_support import token_terms
from .layout import BlockLayout, check_block_size, check_geometry

__all__ = ["DERIVED_LAYOUTS", "DOCUMENT_BOUNDS", "TokenMask", "clear_derived_layouts"]

# Layouts derived from token masks (layout=None calls), kept per (mask, lengths, block size, device)
# so repeated calls reuse the layout and the launch data cached on it. BoundedMemo: under
# torch.compile a cached layout is read without a lock (no graph break once eager calls made it).
DERIVED_LAYOUTS = 16
_DERIVED = BoundedMemo(DERIVED_LAYOUTS)
# Per-token document bounds the kernels read, kept per (offsets, length, device): the layers of one
# step share them. Few: each is (2, N) int32, and packed training changes the offsets every step.
DOCUMENT_BOUNDS = 4
_BOUNDS = BoundedMemo(DOCUMENT_BOUNDS)
# The validated offsets of a cu_seqlens tensor (host copy, copy on the inputs' device), kept while
# the tensor is alive and unmodified: the layers of a step pass the same tensor, so only the first
# call reads it from the GPU (or copies it there).
_OFFSETS = StorageMemo(DERIVED_LAYOUTS, 1)


def clear_derived_layouts() -> None:
    """Drop every cached layout and document bounds derived from token masks (benchmarks time the
    uncached derivation)."""
    _DERIVED.clear()
    _BOUNDS.clear()


class TokenMask:
    """The token masks of one call (validated). Build with :meth:`TokenMask.build`.

    Attributes: ``causal`` (bool), ``window`` ((left, right) with -1 = unbounded, or None),
    ``cu_seqlens`` (int32 (num_docs + 1,) on the inputs' device, or None), ``host_cu_seqlens``
    (the same offsets on the CPU, read once, or None) and ``offsets_key`` (their int64 bytes, the
    cache key of what is derived from them, or None).
    """

    __slots__ = ("causal", "cu_seqlens", "host_cu_seqlens", "offsets_key", "window")

    def __init__(
        self,
        causal: bool,
        window: tuple[int, int] | None,
        cu_seqlens: torch.Tensor | None,
        host_cu_seqlens: torch.Tensor | None = None,
        offsets_key: bytes | None = None,
    ) -> None:
        self.causal = causal
        self.window = window
        self.cu_seqlens = cu_seqlens
        if cu_seqlens is not None and host_cu_seqlens is None:
            host_cu_seqlens = cu_seqlens.cpu()
        self.host_cu_seqlens = host_cu_seqlens
        if host_cu_seqlens is not None and offsets_key is None:
            offsets_key = host_offsets(host_cu_seqlens)
        self.offsets_key = offsets_key

    @classmethod
    def causal_only(cls, is_causal: bool) -> TokenMask:
        """The mask of a call that has at most ``is_causal`` (no window, no documents)."""
        return cls(bool(is_causal), None, None)

    @classmethod
    def build(
        cls,
        *,
        is_causal: object = False,
        window_size: object = None,
        cu_seqlens: object = None,
        batch: int,
        seq_len_q: int,
        seq_len_k: int,
        device: torch.device,
    ) -> TokenMask:
        """Validate the mask arguments of a call with q (batch, seq_len_q, ...), k (batch, seq_len_k, ...).

        ValueError/TypeError name the bad value: window_size must be (left, right) ints >= -1;
        cu_seqlens int32 (num_docs + 1,) from 0 to N, non-decreasing, with B == 1 and Nq == Nk.
        Offsets on a GPU are read to the host once per tensor (validated there, then used for the
        tiles and cache keys without another read; a later call with the same, unmodified tensor
        reads nothing); offsets on the CPU go to the inputs' device without a wait.
        """
        causal = check_bool("is_causal", is_causal)
        window = None if window_size is None else check_window_size(window_size)
        if window == (-1, -1):
            window = None  # unbounded on both sides: no mask
        if cu_seqlens is None:
            return cls(causal, window, None)
        if seq_len_q != seq_len_k:
            raise ValueError(
                f"cu_seqlens describes one packed sequence for queries and keys; got Nq={seq_len_q}, Nk={seq_len_k}"
            )

        device = indexed_device(device)
        given = cu_seqlens if isinstance(cu_seqlens, torch.Tensor) else None

        def read() -> tuple[torch.Tensor, torch.Tensor, bytes]:
            # validated on the host copy attn_core keeps per tensor (a GPU tensor is read once, also
            # across dilated and block-sparse calls); offsets on the CPU go to the inputs' device
            checked = check_cu_seqlens(cu_seqlens, batch=batch, seq_len=seq_len_q, device=device)
            host = cu_seqlens_on_host(checked)
            docs = checked if checked.device == device else host_to_device(host, device)
            return host, docs, host_offsets(host)

        # the key bytes are memoised with the copies: the later layers' calls make none of them
        memo = None if given is None else _OFFSETS.memo_for((given,), (batch, seq_len_q, str(device)))
        host, docs, key = read() if memo is None else memo("offsets", read)
        return cls(causal, window, docs, host, key)

    # ------------------------------------------------------------------ the interval form
    @property
    def banded(self) -> bool:
        """True when some key before Nk is masked for some query (any mask at all)."""
        return self.causal or self.window is not None or self.cu_seqlens is not None

    def sides(self) -> tuple[int, int]:
        """(left, right) with causal folded in: right = min(right, 0) under causal; -1 = unbounded."""
        left, right = self.window if self.window is not None else (-1, -1)
        if self.causal:
            right = 0
        return left, right

    def kernel_sides(self, seq_len_q: int, seq_len_k: int) -> tuple[int, int]:
        """(left, right) as the kernels take them: unbounded sides become seq_len_q + seq_len_k
        (no term can then bind), so the kernels need no special case."""
        left, right = self.sides()
        far = seq_len_q + seq_len_k
        return (far if left < 0 else min(left, far)), (far if right < 0 else min(right, far))

    def document_bounds(self, seq_len: int) -> torch.Tensor | None:
        """(2, seq_len) int32: the start and the end (exclusive) of every token's document; None
        without cu_seqlens. Vectorised on cu_seqlens' device, no host reads; kept for the next
        calls with these offsets (at most :data:`DOCUMENT_BOUNDS`; shared, do not modify)."""
        if self.cu_seqlens is None:
            return None
        cu = self.cu_seqlens

        def build() -> torch.Tensor:
            c = cu.to(torch.int64)
            doc, _ = document_positions(c, seq_len)
            return torch.stack([c[doc], c[doc + 1]]).to(torch.int32)

        result: torch.Tensor = _BOUNDS.get((self.cache_key(), seq_len, str(cu.device)), build)
        return result

    def key_intervals(
        self, seq_len_q: int, seq_len_k: int, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) int64 (seq_len_q,): query i sees keys lo[i] <= j <= hi[i] (empty when hi < lo).

        On ``device`` (default: cu_seqlens' device, else the CPU)."""
        if device is None:
            device = self.cu_seqlens.device if self.cu_seqlens is not None else torch.device("cpu")
        i = torch.arange(seq_len_q, device=device)
        left, right = self.sides()
        lo = torch.zeros_like(i) if left < 0 else (i - left).clamp(min=0)
        hi = torch.full_like(i, seq_len_k - 1) if right < 0 else (i + right).clamp(max=seq_len_k - 1)
        bounds = self.document_bounds(seq_len_q)
        if bounds is not None:
            bounds = bounds.to(device)
            lo = torch.maximum(lo, bounds[0].long())
            hi = torch.minimum(hi, bounds[1].long() - 1)
        return lo, hi

    def mask_mod(self, seq_len_q: int, seq_len_k: int) -> Any:
        """A FlexAttention mask_mod of these masks alone (no tiles) for q (.., seq_len_q, ..),
        k (.., seq_len_k, ..): for ``flex_attention.create_block_mask`` (the benchmarks' anchor) or
        a dense check. Equal to ``self.dense(seq_len_q, seq_len_k)`` at every (q_idx, kv_idx)."""
        return token_terms(
            seq_len_q, seq_len_k, is_causal=self.causal, window_size=self.window, cu_seqlens=self.cu_seqlens
        ).mask_mod()

    def dense(self, seq_len_q: int, seq_len_k: int, device: torch.device | None = None) -> torch.Tensor:
        """(seq_len_q, seq_len_k) bool, True where query i sees key j (tests and small references)."""
        lo, hi = self.key_intervals(seq_len_q, seq_len_k, device)
        j = torch.arange(seq_len_k, device=lo.device)
        return (j[None, :] >= lo[:, None]) & (j[None, :] <= hi[:, None])

    # ------------------------------------------------------------------ derived tiles
    def block_intervals(
        self, seq_len_q: int, seq_len_k: int, block_size: tuple[int, int], device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) int64 (num_query_blocks,): query block r needs key blocks lo[r] <= c < hi[r].

        From the block's first row's lo and last row's hi (lo, hi never decrease), so it holds
        every key any row of the block sees. Both never decrease with r; a block whose rows see
        nothing (queries past the last key) gets lo == hi == num_key_blocks. O(num_query_blocks)
        on ``device`` (default the CPU, where it reads nothing from a GPU: the offsets' host copy).
        """
        bq, bk = block_size
        device = torch.device("cpu") if device is None else device
        first = torch.arange(0, seq_len_q, bq, device=device)
        last = (first + (bq - 1)).clamp(max=seq_len_q - 1)
        left, right = self.sides()
        lo = torch.zeros_like(first) if left < 0 else (first - left).clamp(min=0)
        hi = torch.full_like(last, seq_len_k - 1) if right < 0 else (last + right).clamp(max=seq_len_k - 1)
        docs = self.host_cu_seqlens if device.type == "cpu" else self.cu_seqlens
        if docs is not None:
            offsets = docs.to(device, torch.int64)
            ends = offsets[1:]  # token i is in the document d with offsets[d] <= i < ends[d]
            lo = torch.maximum(lo, offsets[torch.searchsorted(ends, first, right=True)])
            hi = torch.minimum(hi, ends[torch.searchsorted(ends, last, right=True)] - 1)
        # Every token's interval holds it or ends at the last key, so a block sees nothing only
        # when its first row's lo is past the keys: such blocks are the last ones, and sending
        # them to num_key_blocks keeps both bounds non-decreasing.
        nkb = -(-seq_len_k // bk)
        seen = hi >= lo
        return torch.where(seen, lo // bk, nkb), torch.where(seen, hi // bk + 1, nkb)

    def cache_key(self) -> tuple[object, ...]:
        """A hashable description, equal for masks that keep the same tokens: the sides with causal
        folded in and the offsets' bytes (from their host copy: no device read)."""
        return (self.sides(), self.offsets_key)

    def layout(
        self, seq_len_q: int, seq_len_k: int, block_size: int | tuple[int, int], device: torch.device
    ) -> BlockLayout:
        """The tiles this mask needs (shared by all heads): per query block the interval of key
        blocks its rows can see, with the transposed CSR (the dk/dv kernels') attached.

        O(blocks) work on the host, then O(tiles) on ``device`` (one copy there, no read back
        from it, no sort). Cached per (mask, lengths, block size, device), at most
        :data:`DERIVED_LAYOUTS` layouts: windows and causal masks depend only on those, so a
        training run derives them once."""
        bs = check_block_size(block_size)
        nqb, nkb = -(-seq_len_q // bs[0]), -(-seq_len_k // bs[1])
        check_geometry(1, nqb, nkb)

        def build() -> BlockLayout:
            # on the host even for a GPU layout: 8K blocks a side at 1M tokens, and no read back
            lo, hi = self.block_intervals(seq_len_q, seq_len_k, bs)
            crow, col, ccol, rows = band_csr(lo, hi, nkb, device=device)
            derived = self.derivation_key(seq_len_q, seq_len_k)
            layout = BlockLayout.from_valid_csr(crow, col, bs, 1, nqb, nkb, derived_from=derived)
            return layout.with_transposed_csr(ccol, rows)

        key = (self.cache_key(), seq_len_q, seq_len_k, bs, str(device))
        layout: BlockLayout = _DERIVED.get(key, build)
        return layout

    def derivation_key(self, seq_len_q: int, seq_len_k: int) -> tuple[object, ...]:
        """What a layout :meth:`layout` derived for these lengths records as its
        ``BlockLayout.derived_from``: its tiles are exactly these masks' at these lengths."""
        return (self.cache_key(), seq_len_q, seq_len_k)

    def __repr__(self) -> str:
        docs = None if self.cu_seqlens is None else f"<{self.cu_seqlens.numel() - 1} documents>"
        return f"TokenMask(causal={self.causal}, window={self.window}, cu_seqlens={docs})"
