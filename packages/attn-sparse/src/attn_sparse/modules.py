"""nn.Module wrappers of :func:`attn_sparse.block_sparse_attention`."""

from __future__ import annotations

import torch
from torch import nn

from attn_core.validation import check_window_size, resolve_softmax_scale

from .api import BACKENDS, block_sparse_attention
from .layout import BlockLayout

__all__ = ["BlockSparseAttention", "MultiheadBlockSparseAttention"]


class BlockSparseAttention(nn.Module):
    """Block-sparse attention over (B, N, H, D) tensors with a fixed or per-call layout and token masks.

    forward(q (B, Nq, H, D), k, v (B, Nk, Hkv, D), *, layout=None, is_causal=False,
    window_size=None, cu_seqlens=None, key_padding_mask=None (B, Nk) bool) -> (B, Nq, H, D);
    the masks are those of :func:`attn_sparse.block_sparse_attention`. ``layout``: forward's,
    else the constructor's, else None (the tiles are then derived from the token masks, which
    must include at least one). ``window_size`` (left, right): forward's, else the
    constructor's default (pass (-1, -1) to forward for no window over a default).
    """

    def __init__(
        self,
        layout: BlockLayout | None = None,
        *,
        window_size: tuple[int, int] | None = None,
        softmax_scale: float | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if layout is not None and not isinstance(layout, BlockLayout):
            raise TypeError(f"layout must be a BlockLayout or None, got {type(layout).__name__}")
        if softmax_scale is not None:
            resolve_softmax_scale(softmax_scale, 1)  # fail at construction, not at the first forward
        if not isinstance(backend, str) or backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {backend!r}")
        self.layout = layout
        self.window_size = None if window_size is None else check_window_size(window_size)
        self.softmax_scale = softmax_scale
        self.backend = backend

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        layout: BlockLayout | None = None,
        is_causal: bool = False,
        window_size: tuple[int, int] | None = None,
        cu_seqlens: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return block_sparse_attention(
            q,
            k,
            v,
            layout if layout is not None else self.layout,
            is_causal=is_causal,
            window_size=window_size if window_size is not None else self.window_size,
            cu_seqlens=cu_seqlens,
            key_padding_mask=key_padding_mask,
            softmax_scale=self.softmax_scale,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"layout={self.layout!r}, window_size={self.window_size}, backend={self.backend!r}"


class MultiheadBlockSparseAttention(nn.Module):
    """Batch-first multi-head attention (projections + block-sparse core), like nn.MultiheadAttention.

    forward(query (B, Nq, E), key, value (B, Nk, E), *, layout=None, is_causal=False,
    window_size=None, cu_seqlens=None, key_padding_mask=None) -> (out (B, Nq, E), None): the
    layout and masks of :class:`BlockSparseAttention` (``window_size`` here is its default).
    ``num_kv_heads`` < num_heads gives grouped-query attention.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        layout: BlockLayout | None = None,
        window_size: tuple[int, int] | None = None,
        num_kv_heads: int | None = None,
        bias: bool = True,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        kv = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(kv, bool) or not isinstance(kv, int) or kv <= 0 or num_heads % kv:
            raise ValueError(f"num_kv_heads must be a positive divisor of num_heads={num_heads}, got {num_kv_heads!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, kv
        self.head_dim = embed_dim // num_heads
        kw = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(embed_dim, kv * self.head_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(embed_dim, kv * self.head_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.attention = BlockSparseAttention(layout, window_size=window_size, backend=backend)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        layout: BlockLayout | None = None,
        is_causal: bool = False,
        window_size: tuple[int, int] | None = None,
        cu_seqlens: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[-1] != self.embed_dim:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be (B, N, embed_dim={self.embed_dim}), got {got}")
        B, Nq, _ = query.shape
        Nk = key.shape[1]
        if key.shape[:2] != value.shape[:2] or key.shape[0] != B:
            raise ValueError(
                f"query (B={B}), key {tuple(key.shape)} and value {tuple(value.shape)} need one batch size, "
                "and key and value one length"
            )
        weight_dtype, weight_device = self.q_proj.weight.dtype, self.q_proj.weight.device
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.dtype != weight_dtype:
                raise TypeError(f"{name} dtype {t.dtype} differs from the module's parameters ({weight_dtype})")
            if t.device != weight_device:
                raise ValueError(
                    f"{name} is on {t.device}, the module's parameters on {weight_device}: move one of them"
                )
        q = self.q_proj(query).reshape(B, Nq, self.num_heads, self.head_dim)
        k = self.k_proj(key).reshape(B, Nk, self.num_kv_heads, self.head_dim)
        v = self.v_proj(value).reshape(B, Nk, self.num_kv_heads, self.head_dim)
        out = self.attention(
            q,
            k,
            v,
            layout=layout,
            is_causal=is_causal,
            window_size=window_size,
            cu_seqlens=cu_seqlens,
            key_padding_mask=key_padding_mask,
        )
        return self.out_proj(out.reshape(B, Nq, self.embed_dim)), None
