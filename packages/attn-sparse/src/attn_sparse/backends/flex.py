"""FlexAttention backend (torch.nn.attention.flex_attention), compiled, on CUDA.

The layout and the token masks become a ``BlockMask`` through
:meth:`BlockLayout.to_flex_block_mask` (built from the CSR directly, cached on the layout per
(Nq, Nk, token masks); tiles entirely inside the masks are flex's "full" blocks, the band's edges
"partial" ones evaluating a mask_mod of the tile lookup AND the token masks); flex_attention runs
through one ``torch.compile`` of it per process. It is also the benchmark anchor for our Triton kernel.
On CPU flex_attention would run uncompiled (a dense N x N score matrix), so this backend
declines non-CUDA devices.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from ..flex_support import flex_block_mask_class
from ..layout import BlockLayout
from ..masks import TokenMask

NAME = "flex"

_COMPILED: dict[str, Any] = {}
_COMPILED_LOCK = threading.Lock()


def unsupported_reasons(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, mask: TokenMask
) -> list[str]:
    reasons = []
    cls, why = flex_block_mask_class()
    if cls is None:
        reasons.append(why)
    if q.device.type != "cuda":
        reasons.append(
            f"needs a CUDA device, got {q.device.type} (uncompiled flex_attention materialises the N x N scores)"
        )
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"dtype {q.dtype} not supported (float16, bfloat16, float32)")
    D = q.shape[-1]
    if D < 16 or D & (D - 1):
        reasons.append(f"head dim D={D} must be a power of two >= 16")
    if layout.block_size[0] % 128 or layout.block_size[1] % 128:
        # flex's compiled kernels tile by up to 128 and need sparse blocks that are multiples of their tile
        reasons.append(
            f"block_size {layout.block_size}: this backend takes Bq, Bk multiples of 128 (flex's kernel tile)"
        )
    if not hasattr(torch, "compile"):
        reasons.append(f"torch {torch.__version__} has no torch.compile")
    return reasons


def _flex_fn() -> Any:
    """flex_attention compiled once per process (shapes recompile inside torch.compile's limits)."""
    with _COMPILED_LOCK:
        if "fn" not in _COMPILED:
            from torch.nn.attention.flex_attention import flex_attention

            _COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
        return _COMPILED["fn"]


def attention_with(
    flex_fn: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    mask: TokenMask,
    softmax_scale: float,
) -> torch.Tensor:
    """Run ``flex_fn`` (compiled or eager flex_attention) with the BlockMask of the layout and the
    token masks (cached on the layout per (Nq, Nk, mask)); returns (B, Nq, H, D)."""
    Nq, Nk = q.shape[1], k.shape[1]
    block_mask = layout.cached_derived(
        ("flex_block_mask", Nq, Nk, mask.cache_key()),
        lambda: layout.to_flex_block_mask(
            Nq, Nk, is_causal=mask.causal, window_size=mask.window, cu_seqlens=mask.cu_seqlens
        ),
    )
    out = flex_fn(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        block_mask=block_mask,
        scale=softmax_scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, mask: TokenMask, softmax_scale: float
) -> torch.Tensor:
    """out (B, Nq, H, D) in q's dtype through compiled flex_attention."""
    return attention_with(_flex_fn(), q, k, v, layout, mask, softmax_scale)
