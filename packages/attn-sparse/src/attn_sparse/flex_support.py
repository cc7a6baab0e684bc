"""FlexAttention support shared by the layout (BlockMask conversion), the "flex" backend and the
benchmarks: the BlockMask class check and the mask_mods of tiles and token masks."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from attn_core.packing import document_positions
from attn_core.validation import check_bool, check_cu_seqlens, check_window_size

__all__ = ["TokenTerms", "flex_block_mask_class", "tile_mask_mod", "token_terms"]


@functools.lru_cache(maxsize=1)
def flex_block_mask_class() -> tuple[Any, str]:
    """(BlockMask class or None, reason it is unavailable); checked once per process."""
    try:
        from torch.nn.attention import flex_attention as fa
    except ImportError as exc:  # torch without FlexAttention
        return None, f"torch {torch.__version__} has no torch.nn.attention.flex_attention ({exc})"
    import inspect

    params = inspect.signature(fa.BlockMask.__init__).parameters
    needed: Sequence[str] = ("seq_lengths", "full_q_indices", "BLOCK_SIZE", "mask_mod")
    missing = [n for n in needed if n not in params]
    if missing:
        return None, f"torch {torch.__version__} BlockMask lacks constructor arguments {missing} (needs torch >= 2.6)"
    return fa.BlockMask, ""


class TokenTerms:
    """The token masks of a call in the terms flex compares: query i sees key j when
    ``j < seq_len_k``, ``i - left <= j <= i + right`` (-1 = that side unbounded; causal is
    right = 0) and, with documents, ``doc_ids[i] == doc_ids[j]`` (int32 (N,) document index of
    every token). Build with :func:`token_terms`."""

    __slots__ = ("doc_ids", "left", "right", "seq_len_k")

    def __init__(self, left: int, right: int, doc_ids: torch.Tensor | None, seq_len_k: int) -> None:
        self.left, self.right, self.doc_ids, self.seq_len_k = left, right, doc_ids, seq_len_k

    def mask_mod(self) -> Any:
        """mask_mod(b, h, q_idx, kv_idx) -> bool tensor of these masks (flex's idiom: index
        comparisons, and the document ids read from a captured tensor)."""
        left, right, docs, seq_len_k = self.left, self.right, self.doc_ids, self.seq_len_k

        def token_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            keep = kv_idx < seq_len_k
            if left >= 0:
                keep = keep & (q_idx - kv_idx <= left)
            if right >= 0:
                keep = keep & (kv_idx - q_idx <= right)
            if docs is not None:
                keep = keep & (docs[q_idx] == docs[kv_idx])
            return keep

        return token_mod

    def split_tiles(
        self, row: torch.Tensor, col: torch.Tensor, block_size: tuple[int, int], seq_len_q: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(full, partial) bool (T,) for tiles at query block ``row``, key block ``col`` (int64 (T,)):
        full = every (query, key) pair of the tile passes these masks (flex skips its mask_mod);
        partial = some pair may. Tiles that are neither attend nothing. O(T), exact for full."""
        bq, bk = block_size
        # token corners of each tile; a ragged last key block stays "partial" (mask_mod
        # evaluated), so keys past Nk are masked by our mask_mod too, not only by flex's bounds checks
        i0, i1 = row * bq, torch.clamp((row + 1) * bq, max=seq_len_q) - 1
        j0, j1 = col * bk, (col + 1) * bk - 1
        j_last = torch.clamp(j1, max=self.seq_len_k - 1)
        full = j1 < self.seq_len_k
        some = torch.ones_like(full)
        # i - j <= left (j - i <= right) holds for every pair of the tile at its far corner, for
        # some pair at its near corner
        if self.left >= 0:
            full &= i1 - j0 <= self.left
            some &= i0 - j_last <= self.left
        if self.right >= 0:
            full &= j1 - i0 <= self.right
            some &= j0 - i1 <= self.right
        if self.doc_ids is not None:  # document ids never decrease along the sequence
            d = self.doc_ids.long()
            full &= (d[i0] == d[i1]) & (d[j0] == d[j_last]) & (d[i0] == d[j0])
            some &= (d[i0] <= d[j_last]) & (d[j0] <= d[i1])
        return full, some & ~full


def token_terms(
    seq_len_q: int,
    seq_len_k: int,
    *,
    is_causal: object = False,
    window_size: object = None,
    cu_seqlens: object = None,
    device: torch.device | None = None,
) -> TokenTerms:
    """Validate token masks given as in :func:`attn_sparse.block_sparse_attention` and return
    their :class:`TokenTerms` (document ids on ``device``, default cu_seqlens' device).

    ValueError/TypeError name the bad value: window_size (left, right) ints >= -1; cu_seqlens
    int32 (num_docs + 1,) from 0 to N, non-decreasing, with seq_len_q == seq_len_k.
    """
    causal = check_bool("is_causal", is_causal)
    left, right = (-1, -1) if window_size is None else check_window_size(window_size)
    if causal:  # top-left aligned: key j <= query i
        right = 0
    docs = None
    if cu_seqlens is not None:
        if seq_len_q != seq_len_k:
            raise ValueError(
                f"cu_seqlens describes one packed sequence for queries and keys; got Nq={seq_len_q}, Nk={seq_len_k}"
            )
        own = cu_seqlens.device if isinstance(cu_seqlens, torch.Tensor) else torch.device("cpu")
        c = check_cu_seqlens(cu_seqlens, batch=1, seq_len=seq_len_q, device=own)
        ids, _ = document_positions(c if device is None else c.to(device), seq_len_q)
        docs = ids.to(torch.int32)
    return TokenTerms(left, right, docs, seq_len_k)


def tile_mask_mod(tiles: torch.Tensor, block_size: tuple[int, int], token_mod: Any) -> Any:
    """A mask_mod equal to the tile structure AND ``token_mod`` (the token masks, key length
    included): flex's uncompiled path and its partial blocks evaluate mask_mod, so it must agree
    with the block lists (full blocks never call it). tiles: (Hl, nq, nk) bool, Hl 1 or H."""
    bq, bk = block_size
    per_head = tiles.shape[0] > 1
    shared = tiles[0]

    def tile_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        tile = tiles[h, q_idx // bq, kv_idx // bk] if per_head else shared[q_idx // bq, kv_idx // bk]
        return tile & token_mod(b, h, q_idx, kv_idx)

    return tile_mod
