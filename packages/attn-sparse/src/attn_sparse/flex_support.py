"""FlexAttention support shared by the layout (BlockMask conversion) and the "flex" backend."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["flex_block_mask_class", "tile_mask_mod"]


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


def tile_mask_mod(tiles: torch.Tensor, block_size: tuple[int, int], seq_len_k: int, is_causal: bool) -> Any:
    """A mask_mod equal to the tile structure, the key length and causality: flex's uncompiled path
    and its partial blocks evaluate mask_mod, so it must agree with the block lists (full blocks
    never call it)."""
    bq, bk = block_size
    per_head = tiles.shape[0] > 1
    shared = tiles[0]

    def tile_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        keep = (tiles[h, q_idx // bq, kv_idx // bk] if per_head else shared[q_idx // bq, kv_idx // bk]) & (
            kv_idx < seq_len_k
        )
        return keep & (q_idx >= kv_idx) if is_causal else keep

    return tile_mod
