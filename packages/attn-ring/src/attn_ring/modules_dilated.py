"""Sequence-parallel drop-ins for attn_core's dilated attention modules.

- :class:`RingDilatedAttention`: like :class:`attn_core.DilatedAttention` (q, k, v already split
  into heads), but every rank passes its contiguous shard of the sequence and the attention runs
  across the ranks of ``group`` (:func:`attn_ring.ring_dilated.ring_dilated_attention`).
- :class:`RingMultiheadDilatedAttention`: :class:`attn_core.MultiheadDilatedAttention` (same
  projections, MAGNETO sub-LayerNorm, initialisation, state_dict keys and call convention) whose
  attention core is :class:`RingDilatedAttention`. Each rank calls it on its shard (B, n, E) and
  gets its shard of the output; parameter gradients are per rank (sum them across ranks, as
  DistributedDataParallel does, to get the full-sequence gradient).

Attention dropout is not supported across ranks (the modules have no dropout argument).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from attn_core.config import DilatedConfig
from attn_core.modules import MultiheadDilatedAttention
from attn_core.validation import resolve_softmax_scale

from .comm import check_timeout
from .exchange import DEFAULT_TIMEOUT_S
from .ring_dilated import ring_dilated_attention

__all__ = ["RingDilatedAttention", "RingMultiheadDilatedAttention"]


class RingDilatedAttention(nn.Module):
    """LongNet dilated attention over a sequence sharded across ranks (no parameters).

    forward(q (B, n, H, D), k (B, n, Hkv, D), v (B, n, Hkv, D), *, is_causal=False,
    key_padding_mask (B, n) bool, True = padding, cu_seqlens=None) -> (B, n, H, D): this rank's
    shard of dilated attention over the gathered sequence of n * W tokens. cu_seqlens: int32
    (num_docs + 1,) offsets of documents packed along the whole gathered sequence (B == 1, the
    same on every rank), passed on to :func:`attn_ring.ring_dilated_attention`.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        softmax_scale: float | None = None,
        head_mode: str = "all",
        group: dist.ProcessGroup | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        super().__init__()
        self.config = DilatedConfig(segment_lengths, dilation_rates, head_mode)  # fail at construction
        if softmax_scale is not None:
            resolve_softmax_scale(softmax_scale, 1)
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
        timeout_s = check_timeout(timeout_s)
        self.softmax_scale = softmax_scale
        self.group = group
        self.timeout_s = float(timeout_s)

    @property
    def segment_lengths(self) -> tuple[int, ...]:
        return self.config.segment_lengths

    @property
    def dilation_rates(self) -> tuple[int, ...]:
        return self.config.dilation_rates

    @property
    def head_mode(self) -> str:
        return self.config.head_mode

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
        return ring_dilated_attention(
            q,
            k,
            v,
            self.config.segment_lengths,
            self.config.dilation_rates,
            group=self.group,
            is_causal=is_causal,
            key_padding_mask=key_padding_mask,
            softmax_scale=self.softmax_scale,
            head_mode=self.config.head_mode,
            cu_seqlens=cu_seqlens,
            timeout_s=self.timeout_s,
        )

    def extra_repr(self) -> str:
        return (
            f"segment_lengths={list(self.segment_lengths)}, dilation_rates={list(self.dilation_rates)}, "
            f"head_mode={self.head_mode!r}"
        )


class RingMultiheadDilatedAttention(MultiheadDilatedAttention):
    """:class:`attn_core.MultiheadDilatedAttention` with its attention run across ranks.

    forward(query (B, n, E), key (B, n, E), value (B, n, E), *, is_causal=False,
    key_padding_mask (B, n) bool, cu_seqlens int32 (num_docs + 1,) of the whole gathered sequence
    or None) -> (out (B, n, E), None), each tensor this rank's shard.
    Same parameters and state_dict as the attn_core module, so weights move between the two.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        num_kv_heads: int | None = None,
        bias: bool = True,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        head_mode: str = "all",
        group: dist.ProcessGroup | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            embed_dim,
            num_heads,
            segment_lengths,
            dilation_rates,
            num_kv_heads=num_kv_heads,
            bias=bias,
            layer_norm=layer_norm,
            layer_norm_eps=layer_norm_eps,
            gamma_init=gamma_init,
            head_mode=head_mode,
            device=device,
            dtype=dtype,
        )
        # Same projections and norm; only the attention core is replaced (it holds no parameters).
        self.attention = RingDilatedAttention(  # type: ignore[assignment]
            segment_lengths, dilation_rates, head_mode=head_mode, group=group, timeout_s=timeout_s
        )
