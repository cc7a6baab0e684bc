"""RingAttention: an nn.Module around :func:`attn_ring.ring_attention` (no parameters); UlyssesAttention and
HybridAttention around :func:`attn_ring.ulysses_attention` and :func:`attn_ring.hybrid_attention`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from attn_core.config import DilatedConfig
from attn_core.validation import resolve_softmax_scale

from .comm import DEFAULT_TIMEOUT_S, BufferProvider, check_timeout
from .hybrid import HYBRID_KINDS, hybrid_attention
from .ring import ring_attention
from .sharding import check_layout
from .ulysses import inner_attention, ulysses_with

__all__ = ["HybridAttention", "RingAttention", "UlyssesAttention"]


class RingAttention(nn.Module):
    """Exact attention over a sequence sharded across ``group``; each rank calls it on its shard.

    forward(q (B, n, H, D), k (B, n, Hkv, D), v (B, n, Hkv, D), *, is_causal=False,
    cu_seqlens (num_docs + 1,) int32 of the whole packed sequence or None) -> (B, n, H, D), this
    rank's shard of dense attention over the gathered sequence (see :func:`ring_attention`).
    """

    def __init__(
        self,
        *,
        layout: str = "contiguous",
        softmax_scale: float | None = None,
        group: dist.ProcessGroup | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        buffers: BufferProvider | None = None,
    ) -> None:
        super().__init__()
        self.layout = check_layout(layout)
        if softmax_scale is not None:
            resolve_softmax_scale(softmax_scale, 1)  # validates: finite and > 0
        self.softmax_scale = softmax_scale
        self.group = group
        self.timeout_s = check_timeout(timeout_s)
        self.buffer_provider = buffers

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return ring_attention(
            q,
            k,
            v,
            group=self.group,
            is_causal=is_causal,
            layout=self.layout,
            softmax_scale=self.softmax_scale,
            cu_seqlens=cu_seqlens,
            timeout_s=self.timeout_s,
            buffers=self.buffer_provider,
        )

    def extra_repr(self) -> str:
        return f"layout={self.layout!r}, softmax_scale={self.softmax_scale}"


class UlyssesAttention(nn.Module):
    """Head-parallel attention over a sequence sharded across ``group`` (:func:`attn_ring.ulysses_attention`).

    forward(q (B, n, H, D), k (B, n, Hkv, D), v (B, n, Hkv, D), *, is_causal=False,
    key_padding_mask (B, n) bool or None, cu_seqlens (num_docs + 1,) int32 of the whole packed
    sequence or None, window_size (left, right) or None (block_sparse only)) -> (B, n, H, D): this
    rank's shard of the attention over the gathered sequence. attention: "dense", "dilated"
    (segment_lengths, dilation_rates, head_mode) or "block_sparse" (layout: an
    attn_sparse.BlockLayout of the whole sequence, or None: tiles from the token masks).
    """

    def __init__(
        self,
        attention: str = "dense",
        *,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        head_mode: str = "all",
        layout: Any = None,
        softmax_scale: float | None = None,
        group: dist.ProcessGroup | None = None,
        backend: str = "auto",
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        super().__init__()
        # validates the kind and its options at construction (raises like the functional form)
        self.inner = inner_attention(
            attention,
            segment_lengths=segment_lengths,
            dilation_rates=dilation_rates,
            head_mode=head_mode,
            layout=layout,
            backend=backend,
        )
        if softmax_scale is not None:
            resolve_softmax_scale(softmax_scale, 1)
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
        self.softmax_scale = softmax_scale
        self.group = group
        self.timeout_s = check_timeout(timeout_s)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        window_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        return ulysses_with(
            self.inner,
            q,
            k,
            v,
            group=self.group,
            is_causal=is_causal,
            softmax_scale=self.softmax_scale,
            key_padding_mask=key_padding_mask,
            cu_seqlens=cu_seqlens,
            window_size=window_size,
            timeout_s=self.timeout_s,
        )

    def extra_repr(self) -> str:
        cfg = self.inner.config
        extra = "" if cfg is None else f", segment_lengths={list(cfg.segment_lengths)}, "
        if cfg is not None:
            extra += f"dilation_rates={list(cfg.dilation_rates)}, head_mode={cfg.head_mode!r}"
        return f"attention={self.inner.kind!r}{extra}, softmax_scale={self.softmax_scale}"


class HybridAttention(nn.Module):
    """All-to-all inside ``a2a_group``, ring across ``ring_group`` (:func:`attn_ring.hybrid_attention`).

    forward(q (B, n, H, D), k (B, n, Hkv, D), v (B, n, Hkv, D), *, is_causal=False,
    key_padding_mask (B, n) bool or None, dilated only; cu_seqlens (num_docs + 1,) int32 of the
    whole packed sequence or None) -> (B, n, H, D): this rank's tokens
    (see :func:`attn_ring.hybrid_positions`) of the attention over the whole sequence.
    Build the groups with :func:`attn_ring.hybrid_mesh`.
    """

    def __init__(
        self,
        *,
        a2a_group: dist.ProcessGroup | None,
        ring_group: dist.ProcessGroup | None,
        attention: str = "dense",
        layout: str = "contiguous",
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        head_mode: str = "all",
        softmax_scale: float | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        super().__init__()
        if attention not in HYBRID_KINDS:
            raise ValueError(f"hybrid attention must be one of {HYBRID_KINDS}, got {attention!r}")
        self.config = None
        if attention == "dilated":
            if segment_lengths is None or dilation_rates is None:
                raise ValueError("attention='dilated' needs segment_lengths and dilation_rates")
            self.config = DilatedConfig(segment_lengths, dilation_rates, head_mode)
        elif segment_lengths is not None or dilation_rates is not None or head_mode != "all":
            raise ValueError("segment_lengths, dilation_rates and head_mode belong to attention='dilated'")
        for name, g in (("a2a_group", a2a_group), ("ring_group", ring_group)):
            if g is not None and not isinstance(g, dist.ProcessGroup):
                raise TypeError(f"{name} must be a torch.distributed.ProcessGroup or None, got {type(g).__name__}")
        if softmax_scale is not None:
            resolve_softmax_scale(softmax_scale, 1)
        self.attention = attention
        self.layout = check_layout(layout)
        self.a2a_group, self.ring_group = a2a_group, ring_group
        self.softmax_scale = softmax_scale
        self.timeout_s = check_timeout(timeout_s)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.config
        return hybrid_attention(
            q,
            k,
            v,
            a2a_group=self.a2a_group,
            ring_group=self.ring_group,
            attention=self.attention,
            is_causal=is_causal,
            softmax_scale=self.softmax_scale,
            layout=self.layout,
            key_padding_mask=key_padding_mask,
            cu_seqlens=cu_seqlens,
            segment_lengths=None if cfg is None else cfg.segment_lengths,
            dilation_rates=None if cfg is None else cfg.dilation_rates,
            head_mode="all" if cfg is None else cfg.head_mode,
            timeout_s=self.timeout_s,
        )

    def extra_repr(self) -> str:
        return f"attention={self.attention!r}, layout={self.layout!r}, softmax_scale={self.softmax_scale}"
