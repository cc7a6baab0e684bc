"""RingAttention: an nn.Module around :func:`attn_ring.ring_attention` (no parameters)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from attn_core.validation import resolve_softmax_scale

from .comm import DEFAULT_TIMEOUT_S, BufferProvider, check_timeout
from .ring import ring_attention
from .sharding import check_layout

__all__ = ["RingAttention"]


class RingAttention(nn.Module):
    """Exact attention over a sequence sharded across ``group``; each rank calls it on its shard.

    forward(q (B, n, H, D), k (B, n, Hkv, D), v (B, n, Hkv, D), *, is_causal=False) -> (B, n, H, D),
    this rank's shard of dense attention over the gathered sequence (see :func:`ring_attention`).
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

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool = False) -> torch.Tensor:
        return ring_attention(
            q,
            k,
            v,
            group=self.group,
            is_causal=is_causal,
            layout=self.layout,
            softmax_scale=self.softmax_scale,
            timeout_s=self.timeout_s,
            buffers=self.buffer_provider,
        )

    def extra_repr(self) -> str:
        return f"layout={self.layout!r}, softmax_scale={self.softmax_scale}"
