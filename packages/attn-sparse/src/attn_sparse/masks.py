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

import threading
from collections import OrderedDict

import torch

from attn_core.packing import document_positions
from attn_core.validation import check_bool, check_cu_seqlens, check_window_size

from .layout import BlockLayout, check_block_size

__all__ = ["DERIVED_LAYOUTS", "TokenMask", "clear_derived_layouts"]

# Layouts derived from token masks (layout=None calls), kept per (mask, lengths, block size, device)
# so repeated calls reuse the layout and the launch data cached on it.
DERIVED_LAYOUTS = 16
_DERIVED: OrderedDict[tuple[object, ...], BlockLayout] = OrderedDict()
_DERIVED_LOCK = threading.Lock()


def clear_derived_layouts() -> None:
    """Drop every cached layout derived from token masks (benchmarks time the uncached derivation)."""
    with _DERIVED_LOCK:
        _DERIVED.clear()


class TokenMask:
    """The token masks of one call (validated). Build with :meth:`TokenMask.build`.

    Attributes: ``causal`` (bool), ``window`` ((left, right) with -1 = unbounded, or None),
    ``cu_seqlens`` (int32 (num_docs + 1,) on the inputs' device, or None).
    """

    __slots__ = ("causal", "cu_seqlens", "window")

    def __init__(self, causal: bool, window: tuple[int, int] | None, cu_seqlens: torch.Tensor | None) -> None:
        self.causal = causal
        self.window = window
        self.cu_seqlens = cu_seqlens

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
        """
        causal = check_bool("is_causal", is_causal)
        window = None if window_size is None else check_window_size(window_size)
        if window == (-1, -1):
            window = None  # unbounded on both sides: no mask
        docs = None
        if cu_seqlens is not None:
            if seq_len_q != seq_len_k:
                raise ValueError(
                    f"cu_seqlens describes one packed sequence for queries and keys; got Nq={seq_len_q}, Nk={seq_len_k}"
                )
            docs = check_cu_seqlens(cu_seqlens, batch=batch, seq_len=seq_len_q, device=device).to(device)
        return cls(causal, window, docs)

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
        without cu_seqlens. Vectorised on cu_seqlens' device, no host reads."""
        if self.cu_seqlens is None:
            return None
        c = self.cu_seqlens.to(torch.int64)
        doc, _ = document_positions(c, seq_len)
        return torch.stack([c[doc], c[doc + 1]]).to(torch.int32)

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

    def dense(self, seq_len_q: int, seq_len_k: int, device: torch.device | None = None) -> torch.Tensor:
        """(seq_len_q, seq_len_k) bool, True where query i sees key j (tests and small references)."""
        lo, hi = self.key_intervals(seq_len_q, seq_len_k, device)
        j = torch.arange(seq_len_k, device=lo.device)
        return (j[None, :] >= lo[:, None]) & (j[None, :] <= hi[:, None])

    # ------------------------------------------------------------------ derived tiles
    def block_intervals(
        self, seq_len_q: int, seq_len_k: int, block_size: tuple[int, int], device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) int64 (num_query_blocks, 1): query block r needs key blocks [lo[r], hi[r]).

        From the block's first row's lo and last row's hi (lo, hi never decrease), so it holds
        every key any row of the block sees; a block whose rows see nothing gets hi == lo.
        """
        bq, bk = block_size
        lo, hi = self.key_intervals(seq_len_q, seq_len_k, device)
        first = torch.arange(0, seq_len_q, bq, device=lo.device)
        last = (first + bq).clamp(max=seq_len_q) - 1
        lo_first, hi_last = lo[first], hi[last]
        blk_lo = lo_first // bk
        blk_hi = torch.where(hi_last >= lo_first, hi_last // bk + 1, blk_lo)
        return blk_lo[:, None], blk_hi[:, None]

    def cache_key(self) -> tuple[object, ...]:
        """A hashable description (reads cu_seqlens to the host: num_docs + 1 ints)."""
        docs = None if self.cu_seqlens is None else tuple(self.cu_seqlens.tolist())
        return (self.causal, self.window, docs)

    def layout(
        self, seq_len_q: int, seq_len_k: int, block_size: int | tuple[int, int], device: torch.device
    ) -> BlockLayout:
        """The tiles this mask needs (shared by all heads): per query block the interval of key
        blocks its rows can see. O(tiles); cached (at most :data:`DERIVED_LAYOUTS` layouts)."""
        bs = check_block_size(block_size)
        key = (self.cache_key(), seq_len_q, seq_len_k, bs, str(device))
        with _DERIVED_LOCK:
            hit = _DERIVED.get(key)
            if hit is not None:
                _DERIVED.move_to_end(key)
                return hit
        nqb, nkb = -(-seq_len_q // bs[0]), -(-seq_len_k // bs[1])
        lo, hi = self.block_intervals(seq_len_q, seq_len_k, bs, device)
        built = BlockLayout.from_intervals(
            lo,
            hi,
            block_size=bs,
            num_heads=1,
            num_query_blocks=nqb,
            num_key_blocks=nkb,
            presorted=True,
            clipped=True,
        )
        with _DERIVED_LOCK:
            _DERIVED[key] = built
            while len(_DERIVED) > DERIVED_LAYOUTS:
                _DERIVED.popitem(last=False)
        return built

    def __repr__(self) -> str:
        docs = None if self.cu_seqlens is None else f"<{self.cu_seqlens.numel() - 1} documents>"
        return f"TokenMask(causal={self.causal}, window={self.window}, cu_seqlens={docs})"
