"""nn.Module wrappers of :func:`attn_sparse.block_sparse_attention`."""

from __future__ import annotations

import torch
from torch import nn

from attn_core.validation import resolve_softmax_scale

from .api import BACKENDS, block_sparse_attention
from .layout import BlockLayout

__all__ = ["BlockSparseAttention", "MultiheadBlockSparseAttention"]


def _pick_layout(default: BlockLayout | None, given: BlockLayout | None) -> BlockLayout:
    layout = given if given is not None else default
    if layout is None:
        raise ValueError("no layout: pass layout= to the constructor or to forward()")
    return layout


class BlockSparseAttention(nn.Module):
    """Block-sparse attention over (B, N, H, D) tensors with a fixed or per-call layout.

    forward(q (B, Nq, H, D), k, v (B, Nk, Hkv, D), *, layout=None, is_causal=False,
    key_padding_mask=None (B, Nk) bool) -> (B, Nq, H, D).
    """

    def __init__(
        self, layout: BlockLayout | None = None, *, softmax_scale: float | None = None, backend: str = "auto"
    ) -> None:
        super().__init__()
        if layout is not None and not isinstance(layout, BlockLayout):
            raise TypeError(f"layout must be a BlockLayout or None, got {type(layout).__name__}")
        if softmax_scale is not None:
            resolve_softmax_scale(softmax_scale, 1)  # fail at construction, not at the first forward
        if not isinstance(backend, str) or backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {backend!r}")
        self.layout = layout
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
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return block_sparse_attention(
            q,
            k,
            v,
            _pick_layout(self.layout, layout),
            is_causal=is_causal,
            key_padding_mask=key_padding_mask,
            softmax_scale=self.softmax_scale,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"layout={self.layout!r}, backend={self.backend!r}"


class MultiheadBlockSparseAttention(nn.Module):
    """Batch-first multi-head attention (projections + block-sparse core), like nn.MultiheadAttention.

    forward(query (B, Nq, E), key, value (B, Nk, E), *, layout=None, is_causal=False,
    key_padding_mask=None) -> (out (B, Nq, E), None). ``num_kv_heads`` < num_heads gives grouped-query attention.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        layout: BlockLayout | None = None,
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
        self.attention = BlockSparseAttention(layout, backend=backend)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        layout: BlockLayout | None = None,
        is_causal: bool = False,
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
        out = self.attention(q, k, v, layout=layout, is_causal=is_causal, key_padding_mask=key_padding_mask)
        return self.out_proj(out.reshape(B, Nq, self.embed_dim)), None
